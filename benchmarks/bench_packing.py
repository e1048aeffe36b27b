"""Training step time of the LLM phases with and without sequence packing (``XVilaModel.pack_sequences``).

    python benchmarks/bench_packing.py [--model xvila-tiny|DIR] [--phase x2x-textual] [--batches 3] [--repeats 2]

A step of the LLM phases runs the LLM over right-padded rows; with packing, ``xvila.splice.cheapest_packing`` puts
the sequences end to end in fewer, longer rows (a block-diagonal causal mask keeps them apart) where its cost model
(linear layers per position, attention per pair of positions) says that is cheaper. This script builds
``--batches`` micro-batches of a phase of ``recipes/tiny.yaml`` (its tasks and batch size), then times forward plus
backward of the phase's losses on each, packed and unpacked in turn, ``--repeats`` times (alternating, so that a
drift in the machine's load touches both), and prints the padding share, the packed shapes, both totals, their
ratio, and the largest difference of the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.splice import cheapest_packing  # noqa: E402
from xvila.train.data import chat_pairs, make_batches  # noqa: E402
from xvila.train.recipe import read_recipe  # noqa: E402
from xvila.trainability import apply_trainability  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--phase", default="x2x-textual", help="an LLM phase of recipes/tiny.yaml")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = read_recipe(ROOT / "recipes" / "tiny.yaml")
    phase = recipe.phases[recipe.phase_index(args.phase)]
    if phase.objective != "xvila":
        parser.error(f"phase {args.phase!r} does not train through the LLM")
    torch.manual_seed(0)
    model = load_model(args.model, 0)
    apply_trainability(model, phase.trainable)
    model.train()
    stream = make_batches(phase.data, model, batch_size=phase.batch_size, seed=recipe.seed,
                          chat=chat_pairs(phase.data, model))
    batches = [next(stream) for _ in range(args.batches)]

    shapes, real, total = [], 0, 0
    with torch.no_grad():
        for batch in batches:
            _, spliced, _ = model._run_llm(batch)
            mask = spliced.attention_mask
            real, total = real + int(mask.sum()), total + mask.numel()
            packing = cheapest_packing(mask, model._attention_pair_cost())
            shapes.append([list(mask.shape), None if packing is None else list(packing.source.shape)])

    seconds = {"packed": 0.0, "unpacked": 0.0}
    losses = {"packed": [], "unpacked": []}
    for _ in range(args.repeats):
        for mode in seconds:
            model.pack_sequences = mode == "packed"
            for i, batch in enumerate(batches):
                torch.manual_seed(i)  # the same draws for both (the recipe's LoRA has no dropout)
                start = time.perf_counter()
                out = model(batch, phase.losses)
                out.loss.backward()
                seconds[mode] += time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                losses[mode].append(float(out.loss.detach()))
    print(json.dumps({
        "phase": args.phase, "batch_size": phase.batch_size, "threads": torch.get_num_threads(),
        "padding_share": round(1 - real / total, 3), "rows_before_after": shapes,
        "unpacked_s": round(seconds["unpacked"], 2), "packed_s": round(seconds["packed"], 2),
        "speedup": round(seconds["unpacked"] / seconds["packed"], 3),
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["packed"], losses["unpacked"])),
    }, indent=2))


if __name__ == "__main__":
    main()
