"""``xvila train RECIPE.yaml [key=value ...] [--resume DIR] [--phase NAME] [--init DIR]``

Also runs on its own, which is how distributed launchers start it::

    python -m xvila.train.cli recipes/smoke.yaml phases.0.steps=2
    torchrun --nproc_per_node=2 -m xvila.train.cli recipes/smoke.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m xvila.train.cli recipes/smoke.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="a recipe YAML (e.g. recipes/smoke.yaml); optional with --resume, "
                        "which then reuses the run's recipe.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (dotted paths): seed=3 phases.1.steps=5 phases.alignment.steps=9")
    parser.add_argument("--resume", metavar="DIR", help="continue a run: its output folder or one of its checkpoints")
    parser.add_argument("--phase", metavar="NAME", help="run only this phase (from the previous phase's output)")
    parser.add_argument("--init", metavar="DIR", help="start the first phase run from this saved model folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs and metrics.jsonl only)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``xvila``'s parser (its function is :func:`cmd_train`)."""
    parser = subparsers.add_parser("train", help="train with a recipe: every phase, one phase, or resume a run")
    add_arguments(parser)
    parser.set_defaults(func=cmd_train)
    return parser


def load(args: argparse.Namespace):
    """The recipe the arguments describe (a YAML + overrides, or the resumed run's saved recipe)."""
    from pathlib import Path

    from xvila.train.loop import RECIPE_FILE
    from xvila.train.recipe import RecipeError, apply_overrides, read_recipe, recipe_from_dict

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]  # `xvila train --resume DIR key=value`
    if recipe is not None:
        return read_recipe(recipe, overrides)
    if args.resume is None:
        raise RecipeError("give a recipe YAML, or --resume DIR to continue a run with its saved recipe")
    import json

    run = Path(args.resume)
    for folder in (run, run.parent.parent.parent):  # the run folder, or the run of a checkpoint
        if (folder / RECIPE_FILE).is_file():
            data = json.loads((folder / RECIPE_FILE).read_text())
            return recipe_from_dict(apply_overrides(data, overrides), source=str(folder / RECIPE_FILE))
    raise RecipeError(f"--resume {run}: no {RECIPE_FILE} there; give the recipe YAML too")


def execute(args: argparse.Namespace) -> list:
    """Run what the arguments ask for; each phase prints its summary line as it ends, and this prints the total."""
    from xvila.train.loop import train

    t0 = time.perf_counter()
    recipe = load(args)
    summaries = train(recipe, resume=args.resume, phase=args.phase, init=args.init, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0 and summaries:
        wall = time.perf_counter() - t0
        loops = sum(s.time_s for s in summaries)
        print(f"xvila train: {len(summaries)} phase{'s' if len(summaries) > 1 else ''} in {wall:.1f} s "
              f"({wall / 60:.1f} min; {loops / 60:.1f} min of training loops), outputs in "
              f"{os.path.dirname(summaries[-1].output)}", flush=True)
    return summaries


def cmd_train(args: argparse.Namespace) -> int:
    """The ``xvila train`` command: user errors become one-line CLI errors (exit code 2)."""
    from xvila.cli import CLIError
    from xvila.train.checkpoint import CheckpointError
    from xvila.train.loop import NonFiniteLossError, TrainingError
    from xvila.train.recipe import RecipeError

    try:
        execute(args)
    except (RecipeError, TrainingError, CheckpointError, NonFiniteLossError) as e:
        raise CLIError(str(e)) from None
    return 0


def run_cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m xvila.train.cli``, torchrun, accelerate launch)."""
    parser = argparse.ArgumentParser(prog="xvila train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if args.verbose and main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from xvila.train.checkpoint import CheckpointError
    from xvila.train.loop import NonFiniteLossError, TrainingError
    from xvila.train.recipe import RecipeError

    try:
        execute(args)
    except (RecipeError, TrainingError, CheckpointError, NonFiniteLossError) as e:
        print(f"xvila train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xvila train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
