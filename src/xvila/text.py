"""Small tokenizers trained locally (milliseconds, deterministic) for tiny random-weight components.

Reference-size components use their own tokenizers loaded from a local folder; tiny ones (a random Llama, a tiny
CLIP text encoder) need a vocabulary that exists offline, so we train a byte-level BPE on a fixed corpus.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A fixed corpus: the words of the toy world plus everyday chat words. Changing it changes tiny vocabularies,
# so it is versioned with the code and only ever extended at the end.
BASE_CORPUS: tuple[str, ...] = (
    "a large red circle drifting left. A big red disc slides to the left.",
    "a small green square moving right. a tiny green box moves to the right.",
    "a blue triangle rising up. a yellow diamond falling down. a magenta cross standing still.",
    "a cyan star, an orange ring, a purple shape, a white background, a black background.",
    "image video audio sound picture clip frame keyframe caption scene shape colour color size motion",
    "circle square triangle diamond cross disc box plus rhombus ring star",
    "red green blue yellow magenta cyan orange purple pink white black grey gray",
    "small large big tiny little huge medium",
    "still left right up down static stationary moving drifting sliding rising falling grows shrinks",
    "Hello! How can I help you today? Please describe what you see. What is in this image?",
    "Here is a video of it. Here is the sound. Here is an image. Now make it blue. Generate a video.",
    "What colour is the shape? Which way does it move? What shape do you hear? It is a circle.",
    "user assistant system you are a helpful assistant that understands and generates images video and audio",
    "the of and to in is it that this with for on as are be was at by not or from but what all were when",
    "yes no maybe thank thanks please sorry sure okay great good bad one two three four five six seven",
    "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) [ ] < > - _ / + = * # @ % & \n",
)


def build_tokenizer(
    vocab_size: int = 512,
    special_tokens: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>"),
    corpus: tuple[str, ...] = BASE_CORPUS,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; the result is deterministic for a given input."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)} (bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    unk, bos, eos, pad = (special_tokens + (None,) * 4)[:4]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=model_max_length,
    )
