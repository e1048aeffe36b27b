"""What bf16 autocast buys the decoders' training on this CPU: one forward and backward of each decoder's VAE loss
(``autoencode_loss``, phase ``vaes``) and UNet loss (``denoising_loss`` on the media's VAE posteriors, as phase
``decoders`` runs once its posterior cache holds them) in fp32 and under bf16 autocast, on a model's decoders and
random media of the right shapes.

    python benchmarks/bench_precision.py [--model xvila-tiny|DIR] [--vae-inputs 32] [--batch-size 32] [--repeats 4]

Prints, per decoder and part, the median seconds per step of each precision (after one warm-up step) and their
ratio, as JSON. bf16 pays only where the CPU computes it natively (AVX-512 with bf16, AMX); elsewhere it is emulated
and slower. ``precision: auto`` in a recipe picks it there (``xvila.train.distributed.native_bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.train.distributed import autocast, native_bf16  # noqa: E402


CPU = torch.device("cpu")


def seconds_per_step(loss_fn, module: torch.nn.Module, bf16: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with autocast("bf16" if bf16 else "no", CPU):  # what the training loop wraps a step in
            loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
        module.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--vae-inputs", type=int, default=32, help="VAE inputs a step (a video frame is one)")
    parser.add_argument("--batch-size", type=int, default=32, help="clips a UNet step")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, 0).float()
    model.load_decoders()
    results = {"threads": torch.get_num_threads(), "native_bf16": native_bf16(CPU), "parts": {}}
    for m in model.config.output_modalities:
        decoder = model.decoder(m)
        decoder.train().requires_grad_(True)
        media = torch.rand(args.batch_size, *model.input_shape(m))
        if m == "audio":
            media = media * 2 - 1  # a waveform in [-1, 1]
        cond = torch.randn(args.batch_size, *decoder.cond_shape)
        with torch.no_grad():
            posterior = decoder.vae_posterior(media) if decoder.vae is not None else None
        cases = {"unet": (lambda: decoder.denoising_loss(media, cond, posterior=posterior), decoder.unet)}
        if decoder.vae is not None:
            cases["vae"] = (lambda: decoder.autoencode_loss(media, 1e-4, args.vae_inputs), decoder.vae)
        for part, (loss_fn, module) in cases.items():
            fp32 = seconds_per_step(loss_fn, module, False, args.repeats)
            bf16 = seconds_per_step(loss_fn, module, True, args.repeats)
            row = {"fp32_s": round(fp32, 3), "bf16_s": round(bf16, 3), "speedup": round(fp32 / bf16, 2)}
            results["parts"][f"{m} {part}"] = row
            print(f"{m:6s} {part:5s} fp32 {fp32:.3f} s  bf16 {bf16:.3f} s  ({fp32 / bf16:.2f}x)", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
