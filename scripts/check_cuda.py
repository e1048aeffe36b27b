"""Check xvila's CUDA path on a machine with a GPU: training (fp32 and bf16, one process and under torchrun with
DDP and FSDP2 on NCCL, and DeepSpeed ZeRO-2 where the deepspeed package is installed) and generation of every output
modality, each compared with the same work on the CPU.

    python scripts/check_cuda.py [--out DIR] [--skip-torchrun]

It trains recipes/smoke.yaml (the tiny random model, every phase, 2 steps each) and needs no downloaded weights.
One line per check with its figures; the exit status is 1 if any check failed. CI has no GPU: run it by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xvila.conversation import MediaItem, Message
from xvila.generation import GenerationConfig
from xvila.model import XVilaModel
from xvila.train.loop import train
from xvila.train.recipe import read_recipe

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
ZERO2 = ROOT / "recipes" / "deepspeed" / "zero2.json"
# first-step losses of each phase that depend only on the weights and the data. The denoising losses draw noise from
# the device's generator, and so do the audio tower's stochastic-depth masks (drop_path), so those differ between the
# CPU and the GPU by design. The contrastive losses of the random tiny encoders sit near chance, where a small change
# in the embeddings moves them much: they are compared in fp32 without TF32 only.
DETERMINISTIC = ("lm", "align", "contrastive/image-text", "contrastive/video-text")
SMOOTH = ("lm", "align")

failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def smoke(out: Path, device: str, precision: str) -> list[str]:
    recipe = read_recipe(SMOKE)
    return [f"output_dir={out}", f"device={device}",
            *(f"phases.{i}.precision=\"{precision}\"" for i in range(len(recipe.phases)))]


def run_smoke(out: Path, device: str, precision: str) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    train(read_recipe(SMOKE, smoke(out, device, precision)), progress=False)
    return time.perf_counter() - t, steps_of(out)


def run_phases_from(cpu_out: Path, out: Path, device: str, precision: str) -> list[dict]:
    """Each phase alone, from the CPU run's output of the phase before it (the first from the recipe's model). Its
    first step then starts from the CPU's weights: the earlier phases' noise draws, which differ between devices,
    do not reach the comparison."""
    phases, steps = read_recipe(SMOKE).phases, []
    for i, phase in enumerate(phases):
        init = cpu_out / f"phase-{phases[i - 1].name}" if i else None
        train(read_recipe(SMOKE, smoke(out / phase.name, device, precision)), phase=phase.name, init=init,
              progress=False)
        steps += steps_of(out / phase.name)
    return steps


def steps_of(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "step"]


def first_steps(steps: list[dict]) -> dict[str, dict[str, float]]:
    firsts: dict[str, dict[str, float]] = {}
    for r in steps:
        firsts.setdefault(r["phase"], r["losses"])
    return firsts


def max_relative_difference(a: list[dict], b: list[dict], kinds: tuple[str, ...]) -> tuple[float, str]:
    worst, where = 0.0, ""
    fa, fb = first_steps(a), first_steps(b)
    for phase, losses in fa.items():
        for key, value in losses.items():
            if (key in kinds or key.split("/")[0] in kinds) and key in fb.get(phase, {}):
                d = abs(value - fb[phase][key]) / max(abs(value), 1e-6)
                if d > worst:
                    worst, where = d, f"{phase} {key} {value:.5f} vs {fb[phase][key]:.5f}"
    return worst, where


def all_finite(steps: list[dict]) -> bool:
    return bool(steps) and all(torch.isfinite(torch.tensor([r["loss"], *r["losses"].values()])).all() for r in steps)


def torchrun(out: Path, strategy: str, *extra: str) -> tuple[int, float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
           "-m", "xvila.train.cli", str(SMOKE), *smoke(out, "cuda", "bf16"), f"distributed.strategy={strategy}",
           *extra, "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, time.perf_counter() - t, proc.stderr[-2000:]


def _loads(folder: Path) -> bool:
    try:
        XVilaModel.from_pretrained(folder, device="cpu")
    except Exception as e:  # noqa: BLE001 - reported as the check's detail
        print(f"     loading {folder}: {type(e).__name__}: {e}", flush=True)
        return False
    return True


def generate_all(model: XVilaModel) -> dict[str, tuple[str, torch.Tensor, float]]:
    image = torch.rand(model.input_shape("image"), generator=torch.Generator().manual_seed(0))
    turns = {
        "text->image": ([Message("user", "Draw a red circle.")], ("image",), True),
        "text->video": ([Message("user", "Show a blue square moving left.")], ("video",), True),
        "text->audio": ([Message("user", "Play the sound of a green triangle.")], ("audio",), True),
        "image->video (highway)": ([Message("user", "Make it move.", [MediaItem("image", image)])], ("video",), True),
        "image->video (no highway)": ([Message("user", "Make it move.", [MediaItem("image", image)])], ("video",),
                                      False),
    }
    results = {}
    for name, (messages, outputs, highway) in turns.items():
        config = GenerationConfig(max_new_tokens=12, outputs=outputs, num_inference_steps=4, highway=highway, seed=1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        answer = model.generate(messages, config)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        media = answer.media[0].data
        results[name] = (answer.text, media.float().cpu(), seconds)
        expected = model.output_shape(outputs[0])
        check(f"generate {name} on {model.device.type}",
              tuple(media.shape) == tuple(expected) and bool(torch.isfinite(media).all()),
              f"shape {tuple(media.shape)}, {seconds:.2f} s")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--skip-torchrun", action="store_true", help="leave out the DDP and FSDP2 runs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="xvila-cuda-"))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}, "
          f"runs in {out}", flush=True)

    t_cpu, cpu = run_smoke(out / "cpu-fp32", "cpu", "no")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    t_gpu, gpu = run_smoke(out / "cuda-fp32", "cuda", "no")
    check("smoke recipe on CUDA, fp32", all_finite(gpu) and len(gpu) == len(cpu),
          f"{len(gpu)} steps in {t_gpu:.1f} s (CPU {t_cpu:.1f} s)")
    alone = run_phases_from(out / "cpu-fp32", out / "cuda-fp32-phases", "cuda", "no")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    worst, where = max_relative_difference(cpu, alone, DETERMINISTIC)
    check("first-step losses, CUDA fp32 (no TF32) vs CPU fp32, each phase from the CPU's previous phase", worst < 1e-2,
          f"largest relative difference {worst:.2e} ({where})")
    t_bf16, bf16 = run_smoke(out / "cuda-bf16", "cuda", "bf16")
    worst, where = max_relative_difference(cpu, bf16, SMOOTH)
    check("smoke recipe on CUDA, bf16 autocast", all_finite(bf16) and worst < 5e-2,
          f"{len(bf16)} steps in {t_bf16:.1f} s; first-step LM and alignment losses within {worst:.2e} of fp32 on "
          f"the CPU ({where})")
    last = f"phase-{read_recipe(SMOKE).phases[-1].name}"  # the folder each run's final model is saved in
    if not args.skip_torchrun:
        runs = {"ddp": (), "fsdp": ()}
        if importlib.util.find_spec("deepspeed") is not None:
            runs["deepspeed"] = (f"distributed.deepspeed_config={ZERO2}",)
        else:
            print("     deepspeed is not installed: its run is left out", flush=True)
        for strategy, extra in runs.items():
            rc, seconds, err = torchrun(out / f"torchrun-{strategy}", strategy, *extra)
            steps = steps_of(out / f"torchrun-{strategy}") if rc == 0 else []
            loads = rc == 0 and _loads(out / f"torchrun-{strategy}" / last)
            check(f"torchrun, 1 process, NCCL, {strategy}, bf16", rc == 0 and all_finite(steps) and loads,
                  f"exit {rc}, {len(steps)} steps in {seconds:.1f} s, saved model loads: {loads}"
                  + ("" if rc == 0 else f"\n{err}"))

    final = out / "cuda-fp32" / last
    on_cpu = generate_all(XVilaModel.from_pretrained(final, device="cpu").eval())
    gpu_model = XVilaModel.from_pretrained(final, device="cuda").eval()
    check("model on CUDA", all(p.device.type == "cuda" for p in gpu_model.parameters()),
          f"{sum(p.numel() for p in gpu_model.parameters()) / 1e6:.2f} M parameters")
    on_gpu = generate_all(gpu_model)
    for name, (text, media, _) in on_gpu.items():
        cpu_text, cpu_media, _ = on_cpu[name]
        difference = float((media - cpu_media).abs().max())
        print(f"     {name}: same text as the CPU: {text == cpu_text}; largest media difference {difference:.3f}")
    print(f"check_cuda: {len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
