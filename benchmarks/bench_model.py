"""Times one training step and one any-to-any generation turn of the tiny model, and prints the achieved FLOP/s
as a fraction of this machine's dense fp32 matmul throughput, measured in the same run.

    python benchmarks/bench_model.py [--repeats 5] [--threads N]

FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions, attention); elementwise work is not
counted, so the fraction is a lower bound on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from xvila.config import XVilaConfig  # noqa: E402
from xvila.conversation import Message, MediaItem, collate  # noqa: E402
from xvila.generation import GenerationConfig  # noqa: E402
from xvila.losses import LossWeights  # noqa: E402
from xvila.model import XVilaModel  # noqa: E402
from xvila.trainability import TrainabilitySpec, apply_trainability  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flops_of(fn, model=None, no_grad: bool = False) -> int:
    """FLOPs of one call. For no-grad work, parameters are frozen while counting: torch's module tracker
    otherwise trips over parameters that require grad inside torch.no_grad()."""
    frozen = [p for p in model.parameters() if p.requires_grad] if no_grad else []
    for p in frozen:
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from test_model import training_conversations  # the same tiny any-to-any batch the tests use

    model = XVilaModel(XVilaConfig.tiny())
    apply_trainability(model, TrainabilitySpec({"llm": "lora", "token_rows": "full", "input_projections": "full",
                                                "output_projections": "full", "decoders": "full", "highway": "full"}))
    batch = collate(training_conversations(model), model.tokenizer, model.config.llm.template)
    weights = LossWeights(lm=1, align=1, denoise=1, highway=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(batch, weights).loss.backward()
        optimizer.step()

    msgs = [Message("user", "Make a video and a sound of this.", [MediaItem("image", batch.media["image"][0])])]
    gen_cfg = GenerationConfig(max_new_tokens=16, outputs=("video", "audio"))

    def turn():
        model.generate(msgs, gen_cfg)

    peak = matmul_peak()
    results = {"matmul_peak_gflops": peak / 1e9, "threads": torch.get_num_threads()}
    for name, fn, no_grad in (("train_step", train_step, False), ("generation_turn", turn, True)):
        seconds = timed(fn, args.repeats)
        flops = flops_of(fn, model, no_grad)
        results[name] = {"seconds": round(seconds, 4), "gflop": round(flops / 1e9, 3),
                         "gflops_per_s": round(flops / seconds / 1e9, 2),
                         "fraction_of_matmul_peak": round(flops / seconds / peak, 4)}
    results["train_step"]["samples_per_s"] = round(batch.input_ids.shape[0] / results["train_step"]["seconds"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
