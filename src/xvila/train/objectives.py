"""What a phase minimises, as a module the distributed wrapper can hold: ``objective(batch) -> StepOutput``.

- :class:`XVilaObjective`: the model's own losses (``lm``, ``align``, ``denoise``, ``highway``), phases 1-3;
- :class:`ProjectionObjective`: textual alignment of the output projections on states collected from the frozen LLM;
- :class:`FoundationObjective`: phase 0 for tiny models, which the model's forward does not compute:
  ImageBind-style symmetric InfoNCE between the encoder's embeddings of aligned image / video / audio / caption,
  text->X denoising of each decoder conditioned on its own (frozen) text encoder, and the word pre-alignment of
  input projections that mix the LLM's words.

An objective holds only the parts of the model it uses, so the distributed wrapper (DDP / FSDP) sees and syncs
those and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvila.conversation import Batch
from xvila.losses import LossWeights, align_loss
from xvila.train.config import FoundationConfig, PhaseConfig
from xvila.train.data import MEDIA, ClipBatch, GenStateBatch

CAPTION_MEMO_BYTES = 256 * 2**20  # the foundation objective keeps caption embeddings up to this size (per phase)


@dataclass
class StepOutput:
    loss: Tensor  # the weighted total this micro-batch backpropagates
    losses: dict[str, Tensor]  # every named part, detached (for logging)


class XVilaObjective(nn.Module):
    def __init__(self, model: nn.Module, weights: LossWeights):
        super().__init__()
        self.model = model
        self.weights = weights

    @staticmethod
    def model_key(key: str) -> str:
        """This objective's state-dict key -> the model's."""
        return key.removeprefix("model.")

    def fsdp_units(self) -> list[nn.Module]:
        """The LLM's decoder layers: every batch runs them (encoders, projections and decoders depend on the data)."""
        return [m for m in self.model.llm.modules() if type(m).__name__.endswith("DecoderLayer")]

    def forward(self, batch: Batch) -> StepOutput:
        out = self.model(batch, self.weights)
        return StepOutput(out.loss, {k: v.detach() for k, v in out.losses.items()})


class FoundationObjective(nn.Module):
    """Contrastive encoder training and text->X decoder training on aligned clips (:class:`ClipBatch`)."""

    def __init__(self, model: nn.Module, config: FoundationConfig, decoders: tuple[str, ...]):
        super().__init__()
        self.config = config
        self.encoder = model.encoder  # shared with the model, not copied
        trains_decoders = config.denoise > 0 or config.autoencode > 0
        self.decoders = nn.ModuleDict({m: model.decoder(m) for m in decoders} if trains_decoders else {})
        if config.autoencode > 0:
            for m, decoder in self.decoders.items():
                if decoder.vae is None:
                    raise ValueError(f"foundation.autoencode trains the decoders' VAEs, but the {m} decoder has none "
                                     "(its config.vae is None): list the decoders with a VAE in foundation.decoders")
        self._posteriors: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # modality -> clip key -> (mean, std)
        self._caption_memo: dict[tuple, dict[str, Tensor]] = {}  # text encoder -> caption -> (Q, D_cond)
        self._caption_bytes = 0
        self.pairs = [tuple(p) for p in config.pairs] if config.contrastive > 0 else []
        used = {m for pair in self.pairs for m in pair}
        missing = used - set(self.encoder.modalities)
        if missing:
            raise ValueError(f"foundation pairs use {sorted(missing)} but the encoder has no such tower; its "
                             f"modalities: {list(self.encoder.modalities)}")
        self.input_projections = nn.ModuleDict()
        if config.words > 0:
            if not model.config.input_projection.vocabulary_scale:
                raise ValueError("foundation.words pre-aligns input projections that mix the LLM's words: set the "
                                 "model's input_projection.vocabulary_scale (> 0)")
            self.input_projections.update({m: model.input_projections[m] for m in model.config.input_modalities})
            self.llm_tokenizer = model.tokenizer
            self.register_buffer("word_table", model.word_embeddings(), persistent=False)  # (V, D), frozen
            self._word_counts: dict[int, int] = {}  # token id -> captions seen that hold it
            self._captions_seen = 0
        self.text_tokenizer = None
        if "text" in used:
            from xvila.text import build_tokenizer

            text = self.encoder.config.text
            self.text_tokenizer = build_tokenizer(vocab_size=text.vocab_size, model_max_length=text.context_length)
            if self.text_tokenizer.eos_token_id != text.eos_token_id:
                raise ValueError(f"the encoder's text tower ends captions with token {text.eos_token_id}, but the "
                                 f"built-in tokenizer's end token is {self.text_tokenizer.eos_token_id}: foundation "
                                 "training of a text tower is for tiny encoders (drop the text pairs otherwise)")

    @staticmethod
    def model_key(key: str) -> str:
        return key  # "encoder.*", "decoders.<m>.*": the model's own names

    def fsdp_units(self) -> list[nn.Module]:
        """Every batch holds every modality, so every encoder block of a used tower and every decoder UNet runs."""
        from xvila.encoders.imagebind import Block

        towers = {"image": "vision", "video": "vision", "audio": "audio", "text": "text"}
        used = {towers[m] for pair in self.pairs for m in pair}
        blocks = [b for t in used for b in self.encoder.modality_trunks[t].modules() if isinstance(b, Block)]
        projections = list(self.input_projections.values())
        if self.config.autoencode > 0:
            return blocks + [d.vae for d in self.decoders.values()] + projections
        return blocks + [d.denoiser for d in self.decoders.values()] + projections

    def text_ids(self, captions: list[str], device) -> Tensor:
        """Captions -> (B, L) ids for the encoder's text tower: truncated, ended with the end token, padded."""
        text = self.encoder.config.text
        ids = [x[: text.context_length - 1] + [text.eos_token_id]
               for x in self.text_tokenizer(captions, add_special_tokens=False).input_ids]
        out = torch.full((len(ids), max(map(len, ids))), self.text_tokenizer.pad_token_id, dtype=torch.long)
        for row, x in enumerate(ids):
            out[row, : len(x)] = torch.tensor(x)
        return out.to(device)

    def forward(self, batch: ClipBatch) -> StepOutput:
        losses: dict[str, Tensor] = {}
        encoded: dict = {}  # modality -> EncoderOutput: each tower runs once a step, for the pairs and the words

        def encode(m: str):
            if m not in encoded:
                encoded[m] = self.encoder(m, batch.media[m])
            return encoded[m]

        if self.pairs:
            used = {m for pair in self.pairs for m in pair}
            embeds = {m: encode(m).pooled_embeds for m in MEDIA if m in used}  # (B, E)
            if "text" in used:
                embeds["text"] = self.encoder("text", self.text_ids(batch.captions, batch.media["image"].device)
                                              ).pooled_embeds
            for a, b in self.pairs:
                scale = torch.stack([self.encoder.logit_scale(a), self.encoder.logit_scale(b)]).max()
                scale = scale.clamp(min=self.config.min_logit_scale)
                losses[f"contrastive/{a}-{b}"] = info_nce(embeds[a], embeds[b], scale)
            losses["contrastive"] = torch.stack([losses[f"contrastive/{a}-{b}"] for a, b in self.pairs]).mean()
        if self.config.autoencode > 0 and self.decoders:
            for m, decoder in self.decoders.items():
                losses[f"autoencode/{m}"] = decoder.autoencode_loss(batch.media[m], self.config.vae_kl,
                                                                  self.config.vae_inputs)
            losses["autoencode"] = torch.stack([losses[f"autoencode/{m}"] for m in self.decoders]).mean()
        if self.config.denoise > 0 and self.decoders:
            self._denoise(batch, losses)
        if self.input_projections:
            self._words(batch, losses, encode)
        parts = [w * losses[n] for n, w in (("contrastive", self.config.contrastive), ("denoise", self.config.denoise),
                                            ("autoencode", self.config.autoencode), ("words", self.config.words))
                 if n in losses]
        return StepOutput(torch.stack(parts).sum(), {k: v.detach() for k, v in losses.items()})

    def _denoise(self, batch: ClipBatch, losses: dict[str, Tensor]) -> None:
        captions = list(batch.captions)
        if self.training and self.config.cond_dropout > 0:
            drop = torch.rand(len(captions)) < self.config.cond_dropout  # follows the seeded micro-step
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        conds: dict[tuple, Tensor] = {}  # decoders that share a text encoder encode the captions once
        for m, decoder in self.decoders.items():
            if decoder.text_key not in conds:
                conds[decoder.text_key] = self._perturb(self._caption_embeds(decoder, captions), captions)
            losses[f"denoise/{m}"] = decoder.denoising_loss(batch.media[m], conds[decoder.text_key],
                                                            posterior=self._posterior(m, decoder, batch),
                                                            timestep_power=self.config.timestep_power,
                                                            min_snr_gamma=self.config.min_snr_gamma)
        losses["denoise"] = torch.stack([losses[f"denoise/{m}"] for m in self.decoders]).mean()

    @torch.no_grad()
    def _caption_embeds(self, decoder: nn.Module, captions: list[str]) -> Tensor:
        """(B, Q, D_cond): the decoder's frozen text encoder's embedding of each caption. Each distinct caption is
        encoded once per phase and kept while the kept ones take under ``CAPTION_MEMO_BYTES`` (MiniLM's are 1.5 KB
        each; the toy world's captions come back every epoch)."""
        memo = self._caption_memo.setdefault(decoder.text_key, {})
        new = list(dict.fromkeys(c for c in captions if c not in memo))
        fresh = dict(zip(new, decoder.encode_text(new))) if new else {}
        for caption, embeds in fresh.items():
            size = embeds.numel() * embeds.element_size()
            if self._caption_bytes + size <= CAPTION_MEMO_BYTES:
                memo[caption] = embeds.clone()  # its own storage, not a view that keeps the whole batch's
                self._caption_bytes += size
        return torch.stack([memo[c] if c in memo else fresh[c] for c in captions])

    def _perturb(self, cond: Tensor, captions: list[str]) -> Tensor:
        """``cond_mix`` and ``cond_noise`` on the captioned rows (training only; draws follow the seeded step)."""
        mix, noise = self.config.cond_mix, self.config.cond_noise
        kept = torch.tensor([c != "" for c in captions])
        if not self.training or (mix == 0 and noise == 0) or not kept.any():
            return cond
        out = cond.clone()
        rows = kept.nonzero()[:, 0]  # (K,)
        if mix > 0 and len(rows) > 1:
            shift = torch.randint(1, len(rows), (len(rows),))
            other = rows[(torch.arange(len(rows)) + shift) % len(rows)]  # another captioned row for each
            frac = (torch.rand(len(rows)) * mix).to(cond).view(-1, *[1] * (cond.ndim - 1))
            out[rows] = cond[rows] + frac * (cond[other] - cond[rows])
        if noise > 0:
            out[rows] = out[rows] + noise * torch.randn(out[rows].shape).to(cond)
        return out

    def _words(self, batch: ClipBatch, losses: dict[str, Tensor], encode) -> None:
        """Each caption word's negative log-likelihood under the likeliest of the clip's media tokens (their word
        logits, ``InputProjection.word_logits``), weighted by the word's inverse document frequency. ``encode``:
        modality -> the encoder's output for the batch's media (shared with the contrastive loss)."""
        captions = [" " + c.strip() for c in batch.captions]
        ids = self.llm_tokenizer(captions, add_special_tokens=False).input_ids
        if self.training:
            for row in ids:
                for t in set(row):
                    self._word_counts[t] = self._word_counts.get(t, 0) + 1
            self._captions_seen += len(ids)
        seen = max(self._captions_seen, 1)
        length = max(1, max(map(len, ids)))
        targets = torch.zeros(len(ids), length, dtype=torch.long)
        weights = torch.zeros(len(ids), length)
        for row, x in enumerate(ids):
            targets[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            weights[row, : len(x)] = torch.tensor([math.log(seen / self._word_counts.get(t, 1)) + 1e-3 for t in x])
        device = self.word_table.device
        targets, weights = targets.to(device), weights.to(device)
        for m, projection in self.input_projections.items():
            encoded = encode(m)
            tokens = projection.project(encoded.patch_embeds, encoded.pooled_embeds)  # (B, K, D)
            logp = projection.word_logits(tokens, self.word_table).log_softmax(-1)  # (B, K, V)
            nll = -logp.gather(2, targets[:, None, :].expand(-1, logp.shape[1], -1))  # (B, K, L)
            losses[f"words/{m}"] = (nll.min(1).values * weights).sum() / weights.sum()
        losses["words"] = torch.stack([losses[f"words/{m}"] for m in self.input_projections]).mean()

    def _posterior(self, m: str, decoder: nn.Module, batch: ClipBatch) -> tuple[Tensor, Tensor] | None:
        """The frozen VAE's posterior of the batch's ``m`` media, kept from an earlier step for the clips seen
        before (``FoundationConfig.posterior_cache``); None: let the decoder run its VAE."""
        limit = self.config.posterior_cache
        if limit <= 0 or decoder.vae is None or batch.keys is None:
            return None
        memo = self._posteriors.setdefault(m, {})
        fresh = {}
        missing = [i for i, key in enumerate(batch.keys) if key not in memo]
        if missing:
            mean, std = decoder.vae_posterior(batch.media[m][missing])  # (n, ...) or (n * T, ...) for video
            for i, a, b in zip(missing, mean.chunk(len(missing)), std.chunk(len(missing))):
                fresh[batch.keys[i]] = (a.clone(), b.clone())
                if len(memo) < limit:
                    memo[batch.keys[i]] = fresh[batch.keys[i]]
        parts = [memo[key] if key in memo else fresh[key] for key in batch.keys]
        return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


class ProjectionObjective(nn.Module):
    """The textual alignment loss of the output projections on pairs collected from the frozen LLM
    (:class:`xvila.train.data.GenStateBatch`; see :class:`xvila.train.config.ProjectionsConfig`)."""

    def __init__(self, model: nn.Module, modalities: tuple[str, ...]):
        super().__init__()
        self.projections = nn.ModuleDict({m: model.output_projections[m] for m in modalities})

    @staticmethod
    def model_key(key: str) -> str:
        return "output_" + key  # "projections.<m>.*" -> "output_projections.<m>.*"

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.projections.values())

    def forward(self, batch: GenStateBatch) -> StepOutput:
        losses = {f"align/{m}": align_loss(self.projections[m](hidden, mask), embeds)
                  for m, (hidden, mask, embeds) in batch.states.items()}
        losses["align"] = torch.stack(list(losses.values())).mean()
        return StepOutput(losses["align"], {k: v.detach() for k, v in losses.items()})


def info_nce(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """a, b (B, E) unit embeddings of B aligned pairs: symmetric cross-entropy of ``scale * a @ b.T`` (CLIP)."""
    logits = scale * a.float() @ b.float().t()  # (B, B), the diagonal holds the positives
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def build_objective(model: nn.Module, phase: PhaseConfig, decoders: tuple[str, ...]) -> nn.Module:
    if phase.objective == "foundation":
        return FoundationObjective(model, phase.foundation, decoders)
    if phase.objective == "projections":
        return ProjectionObjective(model, decoders)
    return XVilaObjective(model, phase.losses)


def needed_decoders(model: nn.Module, phase: PhaseConfig) -> tuple[str, ...]:
    """Output modalities whose decoders this phase's losses run (the others are never built)."""
    from xvila.train.data import output_modalities

    outputs = model.config.output_modalities
    if phase.objective == "foundation":
        if phase.foundation.denoise <= 0 and phase.foundation.autoencode <= 0:
            return ()
        wanted = phase.foundation.decoders or outputs
        unknown = set(wanted) - set(outputs)
        if unknown:
            raise ValueError(f"foundation.decoders names {sorted(unknown)}, not output modalities of the model "
                             f"({list(outputs)})")
        return tuple(m for m in outputs if m in wanted)
    if phase.objective == "xvila" and not any(phase.losses.active(n) for n in ("align", "denoise", "highway")):
        return ()
    return output_modalities(phase.data, model)
