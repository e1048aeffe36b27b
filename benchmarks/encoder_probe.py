"""What the encoders' pooled embeddings carry: linear probes fit on toy-world train scenes, read on test scenes and on
the compositional split (the held-out shape-colour pairs).

    python benchmarks/encoder_probe.py [--model xvila-tiny|DIR] [--train 1500] [--n 300]
        [--modalities image video audio] [--threads N] [--json]

Per modality and attribute (shape, colour, size; motion for video and audio), a softmax probe on the L2-normalised
pooled embeddings of ``--train`` train scenes, then its accuracy on those, on ``--n`` test scenes and on ``--n``
compositional scenes. The input projections read the same embeddings with a learned linear map, so what the probe
cannot read on a split, the LLM hardly names.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.data.tasks import clip_tensor, fit_media  # noqa: E402
from xvila.data.world import world_scene  # noqa: E402
from xvila.evaluation import world_clips  # noqa: E402
from xvila.world import WorldConfig  # noqa: E402
from xvila.world.probes import MODALITY_ATTRIBUTES  # noqa: E402

CHUNK = 100


@torch.no_grad()
def pooled(model, modality: str, clips) -> torch.Tensor:
    shape = model.input_shape(modality)
    out = [model.encode(modality, torch.stack([fit_media(modality, clip_tensor(c, modality), shape)
                                               for c in clips[i:i + CHUNK]])).pooled_embeds.float()
           for i in range(0, len(clips), CHUNK)]
    return F.normalize(torch.cat(out), dim=-1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 500, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(x * 10), y).backward()  # x10: unit vectors need a larger logit scale
        optimizer.step()
    return probe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--train", type=int, default=1500, help="train scenes the probes are fit on")
    parser.add_argument("--n", type=int, default=300, help="test and compositional scenes read")
    parser.add_argument("--modalities", nargs="+", default=["image", "video", "audio"],
                        choices=["image", "video", "audio"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    if args.train < 2 or args.n < 1:
        parser.error("--train must be >= 2 and --n >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, 0).eval()
    world = WorldConfig()
    splits = {"train": world_clips("train", args.train, world), "test": world_clips("test", args.n, world),
              "compositional": world_clips("compositional", args.n, world)}
    scenes = {s: [world_scene(c)[0] for c in clips] for s, clips in splits.items()}
    results = {}
    for m in args.modalities:
        t0 = time.perf_counter()
        x = {s: pooled(model, m, clips) for s, clips in splits.items()}
        results[m] = {}
        for attribute in MODALITY_ATTRIBUTES[m]:
            values = sorted({getattr(s, attribute) for s in scenes["train"]})
            y = {s: torch.tensor([values.index(getattr(sc, attribute)) if getattr(sc, attribute) in values else -1
                                  for sc in scenes[s]]) for s in splits}
            probe = fit_probe(x["train"], y["train"], len(values))
            with torch.no_grad():
                results[m][attribute] = {s: round(float((probe(x[s] * 10).argmax(1) == y[s]).float().mean()), 3)
                                         for s in splits}
            print(f"{m:6s} {attribute:7s} " + "  ".join(f"{s} {v:.3f}" for s, v in results[m][attribute].items()),
                  flush=True)
        print(f"{m:6s} {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
