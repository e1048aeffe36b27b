"""Any-to-any generation: one assistant turn of a multi-turn conversation.

The LLM decodes with a KV cache. When it writes the first generation token of a modality (``[IMG0]``), the rest
of that run is fed in one step (the model never has to spell it out), the run's hidden states are kept (with those
before it, for output projections that read context), and after the text is done each run is projected into its
decoder's conditioning space and turned into media. A visual output is guided by the Visual Embedding Highway when
the conversation holds a visual input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from xvila.configuration import Config
from xvila.conversation import Message, encode_conversation, gather_media
from xvila.modalities import get_modality


@dataclass
class GenerationConfig(Config):
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_media: int = 4  # generated items per answer at most
    decode_media: bool = True  # False: return the conditioning only (e.g. to measure text speed)
    num_inference_steps: int | None = None  # None: the decoder's default
    guidance_scale: float | None = None  # None: the decoder's default
    highway: bool = True  # use the Visual Embedding Highway when a visual input is present
    # modalities the answer produces, exactly: a missing one is written before the stop, others are never started
    # (empty: whatever the model writes)
    outputs: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class GeneratedMedia:
    modality: str
    data: Tensor | None  # one item in the repo conventions; None when media decoding was off
    index: int  # its number among this answer's items of the same modality
    cond_embeds: Tensor  # (Q, D_cond) what the decoder was conditioned on

    @property
    def marker(self) -> str:
        return get_modality(self.modality).marker(self.index)


@dataclass
class Answer:
    text: str  # the answer, with a marker such as "<video 0>" where each generated item belongs
    media: list[GeneratedMedia] = field(default_factory=list)
    raw_text: str = ""  # the answer as the LLM wrote it (generation tokens included), for the history
    token_ids: list[int] = field(default_factory=list)  # the answer's token ids (generation runs included)

    def as_message(self) -> Message:
        """The answer as an assistant message, to continue the conversation."""
        return Message("assistant", self.raw_text)


def _pick(logits: Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, messages: list[Message], config: GenerationConfig | None = None) -> Answer:
    """One assistant turn after ``messages`` (which must end with a user message)."""
    config = config or GenerationConfig()
    for m in config.outputs:
        if m not in model.gen_token_ids:
            raise ValueError(f"this model cannot generate {m!r}; it generates {list(model.gen_token_ids)}")
    if not messages or messages[-1].role != "user":
        raise ValueError("generate needs a conversation that ends with a user message")
    tokenizer, device = model.tokenizer, model.device
    ids, _ = encode_conversation(messages, tokenizer, model.config.llm.template, add_generation_prompt=True)

    gathered = gather_media([messages])
    guide = gathered.last_visual[0]  # the latest visual input guides visual outputs through the highway
    encoded = {m: model.encode(m, torch.stack(xs)) for m, xs in gathered.inputs.items()}
    input_ids = torch.tensor([ids], device=device)
    spliced = model.embed(input_ids, torch.ones_like(input_ids), encoded)

    backbone = model.llm.get_decoder()
    head = model.llm.get_output_embeddings()
    embed = model.llm.get_input_embeddings()
    vocab = len(tokenizer)
    run_starts = {run[0]: m for m, run in model.gen_token_ids.items()}
    suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
    suppress[list(model.placeholder_ids.values())] = True  # never written by the model
    for m, run in model.gen_token_ids.items():
        suppress[run[1:]] = True  # the rest of a run is fed, not sampled
        if config.outputs and m not in config.outputs:
            suppress[run[0]] = True  # a modality the caller did not ask for
    starts = torch.tensor(list(run_starts), device=device)
    stop_ids = {model.stop_id, tokenizer.eos_token_id}
    generator = torch.Generator().manual_seed(config.seed)

    out = backbone(inputs_embeds=spliced.inputs_embeds, use_cache=True)
    cache, last = out.cache, out.last_hidden_state[:, -1]  # (1, D)
    context = model.config.output_projection.context
    recent = out.last_hidden_state[0, -context:] if context else None  # the last `context` hidden states (<= C, D)
    all_ids: list[int] = []
    pieces: list[list[int] | tuple[str, int]] = [[]]  # text id lists and (modality, index) markers
    runs: list[tuple[str, Tensor]] = []  # (modality, (C + K, D) hidden states the projection reads: see _window)

    def complete(steps_left: int) -> bool:  # no tokens left and every asked-for modality written
        return steps_left <= 0 and all(any(r[0] == m for r in runs) for m in config.outputs)

    for step in range(config.max_new_tokens + len(config.outputs)):
        steps_left = config.max_new_tokens - step
        if complete(steps_left):
            break
        logits = head(last)[0, :vocab].float()  # (V,)
        logits[suppress] = float("-inf")
        if len(runs) >= config.max_media:
            logits[starts] = float("-inf")
        token = _pick(logits, config, generator)
        missing = [m for m in config.outputs if all(r[0] != m for r in runs)]
        if missing and (token in stop_ids or steps_left <= 1):
            token = model.gen_token_ids[missing[0]][0]  # the user asked for this modality: write it now
        elif token in stop_ids:
            break
        if token in run_starts:
            m = run_starts[token]
            step_ids = torch.tensor([model.gen_token_ids[m]], device=device)  # (1, K)
            pieces += [(m, sum(r[0] == m for r in runs)), []]
        else:
            step_ids = torch.tensor([[token]], device=device)
            pieces[-1].append(token)
        all_ids += step_ids[0].tolist()
        if token not in run_starts and complete(steps_left - 1):
            break  # the answer ends here: nothing would read the logits of one more forward pass
        out = backbone(inputs_embeds=embed(step_ids), cache=cache, use_cache=True)
        cache, last = out.cache, out.last_hidden_state[:, -1]
        if token in run_starts:
            runs.append((m, _window(recent, out.last_hidden_state[0], context)))
        if context:
            recent = torch.cat([recent, out.last_hidden_state[0]])[-context:]

    generated = _decode_media(model, runs, encoded, guide, config, generator)
    text = "".join(
        tokenizer.decode(p, skip_special_tokens=True) if isinstance(p, list) else get_modality(p[0]).marker(p[1])
        for p in pieces
    ).strip()
    return Answer(text, generated, tokenizer.decode(all_ids, skip_special_tokens=False), all_ids)


def _window(recent: Tensor | None, run: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """What the output projection reads of a run: the ``context`` hidden states before it (zeros, masked out, where
    the conversation is shorter) and the run's K states, as in training (``xvila.splice.gather_run_windows``)."""
    if not context:
        return run, torch.ones(run.shape[0], dtype=torch.bool, device=run.device)
    missing = context - recent.shape[0]
    states = torch.cat([recent.new_zeros(missing, run.shape[1]), recent, run])
    mask = torch.ones(states.shape[0], dtype=torch.bool, device=run.device)
    mask[:missing] = False
    return states, mask


def _decode_media(model, runs, encoded, guide, config, generator) -> list[GeneratedMedia]:
    results: list[GeneratedMedia] = []
    for m in dict.fromkeys(r[0] for r in runs):
        states = torch.stack([w[0] for mm, w in runs if mm == m])  # (N, C + K, D)
        mask = torch.stack([w[1] for mm, w in runs if mm == m])  # (N, C + K)
        cond = model.output_projections[m](states, mask)  # (N, Q, D_cond)
        data = [None] * len(cond)
        if config.decode_media:
            residuals, end, unconditional = None, 1.0, True
            if config.highway and guide is not None and model.config.highway is not None and get_modality(m).visual:
                patch = encoded[guide[0]].patch_embeds[guide[1]]  # (P, C)
                residuals = model.highway_residuals(m, guide[0], patch.expand(len(cond), *patch.shape))
                end, unconditional = model.config.highway.end_for(m), model.config.highway.unconditional
            kwargs = {k: v for k, v in (("num_inference_steps", config.num_inference_steps),
                                        ("guidance_scale", config.guidance_scale)) if v is not None}
            data = model.decoder(m).sample(cond, residuals=residuals, residuals_end=end, generator=generator,
                                           residuals_unconditional=unconditional, **kwargs)
        results += [GeneratedMedia(m, data[i], i, cond[i]) for i in range(len(cond))]
    return results
