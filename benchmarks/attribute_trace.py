"""Where a generation task loses an attribute: in the LLM's words, or between its words and the media.

    python benchmarks/attribute_trace.py [--model xvila-tiny|DIR] [--split test|compositional] [--n 10]
        [--tasks image->video ...] [--no-highway] [--steps N] [--threads N] [--json]

For the first ``--n`` scenes of the split and each task, the same prompts and seeds as ``xvila eval``: the share of
the attributes the input carries that the LLM's answer names right (the text probe: "said") and that the output
media show (the media probes: "drawn"). "said" well above "drawn": lost after the words (output projection or
decoder); "said" low: lost in reading the input (encoder, input projection or LLM).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xvila.cli import DEFAULT_MODEL, MODEL_HELP, load_model  # noqa: E402
from xvila.data.tasks import TaskSpec  # noqa: E402
from xvila.data.world import world_scene  # noqa: E402
from xvila.evaluation import GENERATION_TASKS, carried_attributes, prompt_of, task_modalities, world_clips  # noqa: E402
from xvila.generation import GenerationConfig  # noqa: E402
from xvila.world import WorldConfig, probe_text  # noqa: E402
from xvila.world.probes import MEDIA_PROBES  # noqa: E402


def trace(model, task: str, clips, highway: bool = True, steps: int | None = None, max_new_tokens: int = 48) -> dict:
    spec = TaskSpec.from_model(model)
    _, target = task_modalities(task)
    attributes = carried_attributes(task)
    rows = []
    for i, clip in enumerate(clips):
        messages, _ = prompt_of(task, clip, spec, i)  # the seeds of xvila eval (EvalConfig.seed 0)
        answer = model.generate(messages, GenerationConfig(max_new_tokens=max_new_tokens, outputs=(target,), seed=i,
                                                           highway=highway, num_inference_steps=steps))
        items = [m.data for m in answer.media if m.modality == target]
        drawn = MEDIA_PROBES[target](items[0].float().cpu()) if items else {}
        said, scene = probe_text(answer.text), world_scene(clip)[0]
        rows.append({"answer": answer.text, **{f"{k}/{a}": v for a in attributes
                                               for k, v in (("truth", getattr(scene, a)), ("said", said[a]),
                                                            ("drawn", drawn.get(a)))}})
    return {kind: {a: round(float(np.mean([r[f"{kind}/{a}"] == r[f"truth/{a}"] for r in rows])), 3)
                   for a in attributes} for kind in ("said", "drawn")} | {"n": len(rows), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--split", default="test", choices=["test", "val", "compositional"])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=list(GENERATION_TASKS), choices=GENERATION_TASKS)
    parser.add_argument("--no-highway", action="store_true", help="sample without the Visual Embedding Highway")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the decoder's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object (with every answer) at the end")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, 0).eval()
    clips = world_clips(args.split, args.n, WorldConfig())
    results = {}
    for task in args.tasks:
        if task_modalities(task)[1] not in model.config.output_modalities:
            parser.error(f"the model cannot do {task}")
        results[task] = trace(model, task, clips, highway=not args.no_highway, steps=args.steps)
        print(f"{task:19s} said  " + "  ".join(f"{a} {v:.2f}" for a, v in results[task]["said"].items()), flush=True)
        print(f"{'':19s} drawn " + "  ".join(f"{a} {v:.2f}" for a, v in results[task]["drawn"].items()), flush=True)
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
