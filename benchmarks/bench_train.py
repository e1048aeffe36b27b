"""Training throughput of every phase of a recipe on the tiny model, as samples/s and achieved FLOP/s against this
machine's dense fp32 matmul throughput (measured in the same run), and the speed-up from the frozen-feature cache.

    python benchmarks/bench_train.py [--recipe recipes/smoke.yaml] [--steps 8] [--batch-size 4] [--threads N]
    python benchmarks/bench_train.py --profile alignment     # torch.profiler table of that phase's steps

Method: the recipe runs once with every phase at ``--steps`` steps (timings from its metrics.jsonl: the median
step time after the first, warm-up, step); each phase then runs again alone from the same starting weights under
torch.utils.flop_counter (matmuls, convolutions, attention; elementwise work is not counted, so the fraction is a
lower bound), which sees the same batches because the data is a pure function of (seed, step). Phases with a
frozen encoder run three more times back to back: without the cache, filling it, reading it
(``data.cache_features``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_model import matmul_peak  # noqa: E402
from xvila.train.loop import train  # noqa: E402
from xvila.train.recipe import read_recipe  # noqa: E402


def step_times(out: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == "step":
            times.setdefault(r["phase"], []).append(r["step_time_s"])
    return times


def steady(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smoke.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="skip the feature-cache measurement")
    parser.add_argument("--profile", metavar="PHASE", help="print a torch.profiler table of this phase and stop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    overrides = [f"phases.{i}.{k}={v}" for i in range(len(read_recipe(args.recipe).phases))
                 for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("checkpoint_every", 0),
                              ("log_every", 1))]

    def recipe(out: Path, *more: str):
        return read_recipe(args.recipe, [*overrides, f"output_dir={out}", *more])

    base = recipe(work / "timed")
    if args.profile:
        return profile(base, args.profile, work)
    peak = matmul_peak()
    train(base)
    times = step_times(work / "timed")
    results = {"matmul_peak_gflops": round(peak / 1e9, 1), "threads": torch.get_num_threads(),
               "steps": args.steps, "batch_size": args.batch_size, "phases": {}}
    for i, phase in enumerate(base.phases):
        init = None if i == 0 else work / "timed" / f"phase-{base.phases[i - 1].name}"
        counter = FlopCounterMode(display=False)
        with counter:
            train(recipe(work / f"flops-{phase.name}"), phase=phase.name, init=init)
        flops_per_step = counter.get_total_flops() / phase.steps
        seconds = steady(times[phase.name])
        row = {"step_s": round(seconds, 4), "samples_per_s": round(phase.batch_size / seconds, 2),
               "gflop_per_step": round(flops_per_step / 1e9, 3),
               "gflops_per_s": round(flops_per_step / seconds / 1e9, 2),
               "fraction_of_matmul_peak": round(flops_per_step / seconds / peak, 4)}
        if not args.no_cache and phase.objective == "xvila" and phase.trainable.mode("encoders") == "frozen":
            # back to back, so that the load of other jobs drifts as little as possible between them
            cache = [f"phases.{i}.data.cache_features=true", f"phases.{i}.data.cache_dir={work / 'cache'}"]
            train(recipe(work / f"plain-{phase.name}"), phase=phase.name, init=init)
            for run in ("cache-cold", "cache-warm"):
                train(recipe(work / f"{run}-{phase.name}", *cache), phase=phase.name, init=init)
            plain = steady(step_times(work / f"plain-{phase.name}")[phase.name])
            warm = steady(step_times(work / f"cache-warm-{phase.name}")[phase.name])
            row["uncached_step_s"] = round(plain, 4)
            row["cached_step_s"] = round(warm, 4)
            row["cache_speedup"] = round(plain / warm, 2)
        results["phases"][phase.name] = row
    print(json.dumps(results, indent=2))


def profile(recipe, name: str, work: Path) -> None:
    """Run the recipe up to ``name`` plainly, then ``name`` under torch.profiler."""
    index = recipe.phase_index(name)
    if index > 0:
        train(recipe.replace(phases=recipe.phases[:index]))
    init = None if index == 0 else work / "timed" / f"phase-{recipe.phases[index - 1].name}"
    with torch.profiler.profile(record_shapes=False) as prof:
        train(recipe.replace(output_dir=str(work / "profiled")), phase=name, init=init)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
