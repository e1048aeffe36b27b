"""What the output projections gain by reading the hidden states before each generation run (``context``).

    python benchmarks/ablate_projection_context.py [--model xvila-tiny|DIR] [--contexts 0 32] [--train 1600]
        [--test 384] [--samples 48] [--steps N] [--threads N] [--json]

X-VILA's output projections read the hidden states of the generation tokens alone. An answer describes what it
generates before its runs ("A red circle moving left. [VID0]..."), and ``OutputProjectionConfig.context`` lets the
projection read that description's states too. This script runs the model's (frozen) LLM over ``--train`` text->X
conversations of the toy world's train split and ``--test`` of its test split (teacher-forced, as the
``projections`` phase collects them), fits one fresh output projection per modality and context on the training
windows with the ``projections`` phase's settings (steps, batch, optimizer and schedule of ``recipes/tiny.yaml``),
and prints for each: the share of the caption embeddings' variance it explains on the test windows, and the
attribute accuracy (toy-world probes) of what the model's decoder generates from its predictions for the first
``--samples`` test captions, beside the decoder conditioned on the true caption's embedding (its ceiling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.projections import OutputProjection  # noqa: E402
from xvila.train.data import SampleStream, generation_state_batches, make_batch, open_source  # noqa: E402
from xvila.train.loop import build_optimizer, build_scheduler  # noqa: E402
from xvila.train.objectives import ProjectionObjective  # noqa: E402
from xvila.train.recipe import read_recipe  # noqa: E402
from xvila.world.probes import caption_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"text->image": 1.0, "text->video": 1.0, "text->audio": 1.0}


def collect(model, spec, source: str, n: int, seed: int) -> dict[str, dict]:
    """{modality: {"states", "mask", "embeds", "captions"}} of the generation runs of ``n`` conversations."""
    stream = SampleStream(spec, open_source(source), model, seed, ())
    found: dict[str, dict] = {}
    for start in range(0, n, 32):
        batch = make_batch(stream, range(start, min(n, start + 32)), model)
        for m, (states, mask, embeds) in model.generation_states(batch).items():
            parts = found.setdefault(m, {"states": [], "mask": [], "embeds": [], "captions": []})
            parts["states"].append(states.float())
            parts["mask"].append(mask)
            parts["embeds"].append(embeds.float())
            parts["captions"] += list(batch.targets[m].captions)
    return {m: {k: v if k == "captions" else torch.cat(v) for k, v in p.items()} for m, p in found.items()}


def fit(model, m: str, context: int, train: dict, phase, seed: int) -> OutputProjection:
    """A fresh projection reading ``context`` states before the run, trained as the projections phase trains it:
    the same objective, batches, optimizer, schedule and gradient clipping, on these states."""
    cfg = model.config
    k = cfg.gen_tokens[m]
    torch.manual_seed(seed)
    proj = OutputProjection(cfg.output_projection.replace(context=context), model.llm.config.hidden_size,
                            cfg.decoders.get(m).cond_shape, k)
    states, mask = train["states"][:, -(context + k):], train["mask"][:, -(context + k):]
    proj.standardize(states, mask)
    holder = nn.Module()  # what build_optimizer and the objective read of a model: its output projections
    holder.output_projections, holder.decoders = nn.ModuleDict({m: proj}), nn.ModuleDict()
    objective = ProjectionObjective(holder, (m,))
    optimizer = build_optimizer(holder, phase.optimizer)
    scheduler = build_scheduler(optimizer, phase.schedule, phase.steps)
    batches = generation_state_batches({m: (states, mask, train["embeds"])}, batch_size=phase.batch_size, seed=seed)
    for _ in range(phase.steps):
        loss = objective(next(batches)).loss
        optimizer.zero_grad()
        loss.backward()
        if phase.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(proj.parameters(), phase.max_grad_norm)
        optimizer.step()
        scheduler.step()
    return proj.eval()


def probe_accuracy(model, m: str, cond: torch.Tensor, captions: list[str], seed: int) -> dict[str, float]:
    """Attribute accuracy of the decoder's outputs for ``cond`` (N, Q, D) against the captions' attributes."""
    with torch.no_grad():
        media = model.decoder(m).sample(cond, generator=torch.Generator().manual_seed(seed))
    return caption_accuracy(m, media, captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 32])
    parser.add_argument("--train", type=int, default=1600, help="training conversations (train split)")
    parser.add_argument("--test", type=int, default=384, help="held-out conversations (test split)")
    parser.add_argument("--samples", type=int, default=48, help="test captions per modality sent through the decoder")
    parser.add_argument("--steps", type=int, default=None, help="fitting steps (default: the projections phase's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.contexts) < 0:
        parser.error("--contexts must be >= 0")
    recipe = read_recipe(ROOT / "recipes" / "tiny.yaml")
    phase = recipe.phases[recipe.phase_index("projections")]
    if args.steps:
        phase = phase.replace(steps=args.steps)
    model = load_model(args.model, 0).eval()
    # collect windows as wide as the widest context; narrower ones are their right ends
    widest = model.config.output_projection.replace(context=max(args.contexts))
    model.config = model.config.replace(output_projection=widest)
    spec = dataclasses.replace(phase.data, tasks=TASKS)
    t0 = time.perf_counter()
    train = collect(model, spec, phase.data.source, args.train, recipe.seed)
    test = collect(model, spec, "world:test:1000", args.test, recipe.seed + 1)
    print(f"collected {sum(len(p['captions']) for p in train.values())} training and "
          f"{sum(len(p['captions']) for p in test.values())} test runs in {time.perf_counter() - t0:.0f} s", flush=True)

    results = {}
    for m in model.config.output_modalities:
        tr, te = train[m], test[m]
        n = min(args.samples, len(te["captions"]))
        variance = F.mse_loss(tr["embeds"].mean(0, keepdim=True).expand_as(te["embeds"]), te["embeds"]).item()
        row = {"true caption": {"probe": probe_accuracy(model, m, te["embeds"][:n], te["captions"][:n], recipe.seed)}}
        for c in args.contexts:
            t0 = time.perf_counter()
            proj = fit(model, m, c, tr, phase, recipe.seed)
            k = model.config.gen_tokens[m]
            with torch.no_grad():
                pred = proj(te["states"][:, -(c + k):], te["mask"][:, -(c + k):])
            explained = 1 - F.mse_loss(pred, te["embeds"]).item() / variance
            row[f"context {c}"] = {"explained": round(explained, 3),
                                   "probe": probe_accuracy(model, m, pred[:n], te["captions"][:n], recipe.seed),
                                   "fit_s": round(time.perf_counter() - t0, 1)}
        for name, r in row.items():
            probe = r["probe"]
            mean = sum(probe.values()) / len(probe)
            explained = f"explains {r['explained']:.3f}" if "explained" in r else " " * 14
            print(f"{m:6s} {name:13s} {explained}  probe mean {mean:.3f}  {probe}", flush=True)
        results[m] = row
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
