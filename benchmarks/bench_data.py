"""Data pipeline throughput beside the tiny model's training step rate.

    python benchmarks/bench_data.py [--n 200] [--batch-size 8] [--steps 10] [--workers 0] [--threads N]

Prints, as JSON: toy-world generation (scenes/s, rendering plus writing shards), loader throughput per phase
(batches/s and conversations/s of model-ready batches, a whole epoch, nothing precomputed), the tiny model's
training steps/s on phase-3 batches (one AdamW step, LoRA on the LLM, full output projections, losses lm + align +
denoise; mean over ``--steps`` batches after two warm-up steps), and the ratio of the slowest unpacked loader's
batches/s to the training steps/s (must be >= 5; packed batches hold several conversations per row and are
compared by conversations/s instead). On a shared machine use ``--threads 1``: with 2 threads and other
processes on the cores, step times swing by 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from xvila.config import XVilaConfig  # noqa: E402
from xvila.data.loader import Loader  # noqa: E402
from xvila.data.world import write_world  # noqa: E402
from xvila.losses import LossWeights  # noqa: E402
from xvila.model import XVilaModel  # noqa: E402
from xvila.trainability import TrainabilitySpec, apply_trainability  # noqa: E402


def loader_rate(make, epochs: int = 2) -> dict:
    """Batches/s over whole epochs (the first epoch included: nothing is precomputed)."""
    loader = make()
    count, rows, start = 0, 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            count += 1
            rows += batch.input_ids.shape[0]
    seconds = time.perf_counter() - start
    out = {"batches": count, "rows": rows, "seconds": round(seconds, 3), "batches_per_s": round(count / seconds, 2)}
    if loader.num_workers == 0:
        out["conversations_per_s"] = round(loader.stats["conversations"] / seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="toy-world scenes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--workers", type=int, default=0, help="also time the loader with this many workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size}

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "world"
        start = time.perf_counter()
        write_world(data, args.n, shard_size=100, samples=0)
        results["world_scenes_per_s"] = round(args.n / (time.perf_counter() - start), 1)

        model = XVilaModel(XVilaConfig.tiny())
        apply_trainability(model, TrainabilitySpec({"llm": "lora", "output_projections": "full"}))
        model.train()

        def make(phase, **kw):
            return lambda: Loader.from_model(model, data, phase=phase, batch_size=args.batch_size, **kw)

        results["loader"] = {f"phase{p}": loader_rate(make(p)) for p in (1, 2, 3)}
        results["loader"]["phase3_streaming"] = loader_rate(make(3, streaming=True, shuffle_buffer=64))
        results["loader"]["phase3_packed_512"] = loader_rate(make(3, packing=True, max_length=512))
        if args.workers:
            results["loader"][f"phase3_{args.workers}_workers"] = loader_rate(make(3, num_workers=args.workers))
        cache_dir = Path(tmp) / "cache"
        results["loader"]["phase3_cache_cold"] = loader_rate(make(3, cache_dir=cache_dir), epochs=1)
        results["loader"]["phase3_cache_warm"] = loader_rate(make(3, cache_dir=cache_dir), epochs=1)

        batches = list(islice(Loader.from_model(model, data, phase=3, batch_size=args.batch_size), args.steps + 2))
        weights = LossWeights(lm=1, align=1, denoise=1)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(batch, weights).loss.backward()
            optimizer.step()
            if i >= 2:  # two warm-up steps (decoders are built on first use)
                times.append(time.perf_counter() - start)
        step = statistics.mean(times)
        results["train_step"] = {"seconds_mean": round(step, 4), "seconds_median": round(statistics.median(times), 4),
                                 "steps_per_s": round(1 / step, 2), "steps": len(times),
                                 "conversations_per_s": round(args.batch_size / step, 1)}

    unpacked = [v["batches_per_s"] for k, v in results["loader"].items()
                if k not in ("phase3_cache_cold", "phase3_packed_512")]
    slowest = min(unpacked)
    results["loader_over_training"] = round(slowest * step, 1)  # batches/s of the slowest loader / steps/s
    results["keeps_up_5x"] = results["loader_over_training"] >= 5
    print(json.dumps(results, indent=2))
    sys.exit(0 if results["keeps_up_5x"] else 1)


if __name__ == "__main__":
    main()
