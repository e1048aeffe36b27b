"""What the decoders can show at best: the toy-world probes on their VAEs' reconstructions and on text->X from the
true caption's embedding, no LLM in the way.

    python benchmarks/decoder_ceiling.py [--model xvila-tiny|DIR] [--n 64] [--modalities image video audio]
        [--guidance G] [--steps N] [--split test|compositional] [--offset I] [--threads N] [--json]

For ``--n`` scenes of the toy world's test split (or ``--split compositional``: its held-out shape-colour pairs)
from the ``--offset``-th on (``xvila eval`` scores the first ones: tune settings past them), per output modality:
the probes' attribute accuracy on the true media (1.0 unless a probe errs), on the decoder's VAE reconstruction of
them (what its latent space keeps), and on what the decoder samples from the decoders' text encoder's embedding of
the scene's caption (what the output projections aim at). text->X and X->Y accuracy cannot exceed the last row by
much, whatever the LLM does.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.evaluation import world_clips  # noqa: E402
from xvila.world import WorldConfig  # noqa: E402
from xvila.world.probes import MEDIA_PROBES, caption_accuracy  # noqa: E402

CHUNK = 16


@torch.no_grad()
def ceiling(model, modality: str, clips, guidance: float | None, steps: int | None, seed: int = 0) -> dict:
    decoder = model.decoder(modality)
    captions = [c.caption for c in clips]
    media = torch.stack([c.tensors()[modality] for c in clips])
    g = torch.Generator().manual_seed(seed)
    row = {"truth": caption_accuracy(modality, media, captions)}
    if decoder.vae is not None:
        rec = [decoder.latents_to_media(decoder.media_to_latents(part, g), g) for part in media.split(CHUNK)]
        row["vae reconstruction"] = caption_accuracy(modality, torch.cat(rec), captions)
    sampled = [decoder.sample(decoder.encode_text(captions[i:i + CHUNK]), generator=g, guidance_scale=guidance,
                              num_inference_steps=steps) for i in range(0, len(captions), CHUNK)]
    row["text->X from the true caption"] = caption_accuracy(modality, torch.cat(sampled), captions)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--n", type=int, default=64, help="test scenes")
    parser.add_argument("--modalities", nargs="+", default=["image", "video", "audio"], choices=sorted(MEDIA_PROBES))
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: each decoder's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: each decoder's)")
    parser.add_argument("--split", default="test", choices=["test", "val", "compositional"])
    parser.add_argument("--offset", type=int, default=0, help="first scene index of the split")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    if args.n < 1 or args.offset < 0:
        parser.error("--n must be >= 1 and --offset >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, 0).eval()
    clips = world_clips(args.split, args.n, WorldConfig(), start=args.offset)
    results = {}
    for m in args.modalities:
        if m not in model.config.output_modalities:
            parser.error(f"the model has no {m} decoder (it generates {list(model.config.output_modalities)})")
        t0 = time.perf_counter()
        results[m] = ceiling(model, m, clips, args.guidance, args.steps)
        for what, scores in results[m].items():
            print(f"{m:6s} {what:31s} " + "  ".join(f"{a} {v:.3f}" for a, v in scores.items()), flush=True)
        print(f"{m:6s} {time.perf_counter() - t0:.0f} s for {args.n} {args.split} scenes", flush=True)
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
