"""What a run tells its user: a progress bar, a JSONL log of metrics, TensorBoard event files, phase summaries.

Only the main process reports. The JSONL log (``<output_dir>/metrics.jsonl``) has one object per line: a ``step``
record every ``log_every`` steps (``loss``, every named loss, ``lr`` per component group, ``grad_norm``,
``samples_per_s``, ``skipped``), ``eval`` records, and one ``summary`` record at the end of each phase.
Each phase's summary line (its time, throughput and final losses) is printed as the phase ends.
TensorBoard event files go to ``<output_dir>/tensorboard/`` when the ``tensorboard`` package is installed
(``pip install tensorboard``); without it the run logs a note and writes the JSONL log only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PhaseSummary:
    phase: str
    steps: int  # optimizer steps run in this session (a resumed phase counts from where it resumed)
    final_step: int
    time_s: float
    samples: int
    samples_per_s: float
    final_losses: dict[str, float] = field(default_factory=dict)  # mean over the last logged steps
    skipped_steps: int = 0
    output: str | None = None
    setup_s: float = 0.0  # before the first step: loading the start model, setting up the data (the projections
    # objective's collection from the LLM included)

    def line(self) -> str:
        losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(self.final_losses.items()) if "/" not in k)
        return (f"phase {self.phase}: {self.steps} steps (to step {self.final_step}) in {self.time_s:.1f} s "
                f"(+{self.setup_s:.1f} s setting up), {self.samples_per_s:.2f} samples/s; final {losses}"
                + (f"; {self.skipped_steps} steps skipped (non-finite)" if self.skipped_steps else ""))


class Reporter:
    """Progress bar + JSONL + TensorBoard for the main process; a no-op on the others."""

    def __init__(self, output_dir: Path, *, enabled: bool, progress: bool):
        self.enabled = enabled
        self.progress = progress and enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")

    def start_phase(self, phase: str, total: int, initial: int) -> None:
        self.phase = phase
        self.recent: list[dict[str, float]] = []
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"phase {phase}", dynamic_ncols=True)

    def step(self, record: dict[str, Any], log: bool) -> None:
        if not self.enabled:
            return
        if not record.get("skipped"):
            self.recent = (self.recent + [{"loss": record["loss"], **record["losses"]}])[-10:]
        if self.bar is not None:
            self.bar.update(1)
            lr = max(record["lr"].values()) if record["lr"] else 0.0
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}", refresh=False)
        if log:
            self.write({"event": "step", "phase": self.phase, **record})
            if self.tb is not None:
                s = record["step"]
                self.tb.add_scalar(f"{self.phase}/loss", record["loss"], s)
                for k, v in record["losses"].items():
                    self.tb.add_scalar(f"{self.phase}/loss/{k}", v, s)
                for k, v in record["lr"].items():
                    self.tb.add_scalar(f"{self.phase}/lr/{k}", v, s)
                self.tb.add_scalar(f"{self.phase}/grad_norm", record["grad_norm"], s)
                self.tb.add_scalar(f"{self.phase}/samples_per_s", record["samples_per_s"], s)

    def eval(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.write({"event": "eval", "phase": self.phase, "step": step, "losses": losses})
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"{self.phase}/eval/{k}", v, step)
        logger.info("eval at step %d: %s", step, _fmt(losses))

    def note(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else logger.warning)(message)

    def final_losses(self) -> dict[str, float]:
        if not self.recent:
            return {}
        keys = set().union(*self.recent)
        return {k: sum(r[k] for r in self.recent if k in r) / sum(k in r for r in self.recent) for k in keys}

    def end_phase(self, summary: PhaseSummary) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        self.write({"event": "summary", **asdict(summary)})
        print(summary.line(), flush=True)  # as each phase ends: a long recipe shows its phase times on the way

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(record, default=str) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items()))
