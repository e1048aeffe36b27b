"""Chat rehearsal: ordinary text conversations that keep the LLM's own chat alive through X-to-X tuning.

X-to-X tuning trains the LLM (LoRA) on media conversations only; left alone, a small LLM forgets how to answer an
ordinary question (xvila-tiny's SmolLM2 answered "Who wrote Romeo and Juliet?" with "I wrote a picture."). The
``chat`` task mixes in general questions (:data:`QUESTIONS`) answered by the *base* LLM itself: its greedy answers
with the LoRA adapters switched off (:func:`rehearsal_pairs`), so the rehearsal teaches nothing new, whatever the
LLM (SmolLM2, Vicuna, ...). The answers are written once per base LLM and cached (``XVILA_CACHE``).

:data:`PROBES` are held-out questions (none of them is in :data:`QUESTIONS`) with the words a sensible answer holds;
``xvila eval`` and the tests ask them (:func:`ask_probes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

QUESTIONS: tuple[str, ...] = (
    # facts
    "What is the capital of Germany?", "What is the capital of Japan?", "What is the capital of Spain?",
    "What is the capital of Canada?", "What is the capital of Egypt?", "Which country has the largest population?",
    "What is the longest river in the world?", "What is the tallest mountain on Earth?",
    "How many continents are there?", "Which ocean is the largest?", "What is the smallest planet in our solar system?",
    "Which planet is known as the Red Planet?", "How many moons does the Earth have?",
    "What is the closest star to the Earth?", "Who painted the Mona Lisa?", "Who wrote Pride and Prejudice?",
    "Who discovered penicillin?", "Who was the first person to walk on the Moon?",
    "Who developed the theory of relativity?", "In which year did World War II end?",
    "What is the chemical symbol for gold?", "What is the chemical formula of water?",
    "What gas do plants absorb from the air?", "What is the hardest natural substance?",
    "How many bones are in the adult human body?", "What is the largest organ of the human body?",
    "What is the freezing point of water in Fahrenheit?", "What is the speed of light?",
    "What is the main language spoken in Brazil?", "What currency is used in Japan?",
    "What is the largest animal on Earth?", "What is the fastest land animal?", "How many legs does a spider have?",
    "How many hours are in a day?", "How many months have 31 days?", "What is the largest desert in the world?",
    "Which instrument has 88 keys?", "What is the square root of 81?",
    # arithmetic
    "What is 12 plus 15?", "What is 9 times 6?", "What is 100 divided by 4?", "What is 45 minus 18?",
    "What is 3 squared?", "Is 17 a prime number?", "What is half of 90?", "What is 20 percent of 50?",
    # explanations
    "What is photosynthesis?", "Why do we have seasons?", "How does a rainbow form?", "What is gravity?",
    "What is a black hole?", "What causes thunder?", "Why is the ocean salty?", "How do vaccines work?",
    "What is DNA?", "What is the difference between weather and climate?", "What is an atom?",
    "How does the internet work?", "What is machine learning?", "What is a computer program?",
    "What does a CPU do?", "What is democracy?", "What is inflation?", "What is a noun?",
    "What is the water cycle?", "Why do leaves change colour in autumn?", "What is an ecosystem?",
    "What is electricity?", "How do airplanes fly?", "What is a volcano?", "What is the greenhouse effect?",
    # lists and advice
    "Name three colours of the rainbow.", "Name three vegetables.", "Name three animals that live in the ocean.",
    "List three musical instruments.", "Name two countries in South America.", "Give me three tips for good sleep.",
    "How can I stay healthy?", "How do I make a cup of tea?", "How can I improve my writing?",
    "What should I pack for a beach trip?", "How do I study for an exam?", "Give me three ideas for a weekend.",
    "What are the benefits of exercise?", "How can I save money?", "What are some good habits?",
    "How do I start learning to code?", "Suggest a name for a pet cat.", "What is a healthy breakfast?",
    # language and writing
    "What is the opposite of happy?", "What is a synonym for big?", "Translate 'thank you' into Spanish.",
    "What is the plural of mouse?", "Write a sentence using the word 'bright'.", "Write a short poem about the sea.",
    "Tell me a fun fact.", "Tell me a joke.", "Write a haiku about autumn.", "Describe a sunset in one sentence.",
    "Write a short thank-you note to a friend.", "Summarise the story of Cinderella in one sentence.",
    # conversation
    "Hello!", "Hi, how are you?", "Good morning!", "Thank you for your help.", "What is your favourite book?",
    "Can you help me with something?", "What day comes after Monday?", "What is a good hobby?",
)

# Held-out questions (not in QUESTIONS) and the words, any one of which a sensible answer holds (case-insensitive).
PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is 7 times 8?", ("56",)),
    ("Name three fruits.", ("apple", "banana", "orange", "grape", "mango", "pear", "strawberr", "cherr", "lemon")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("How many days are in a week?", ("seven", "7")),
    ("What is the opposite of cold?", ("hot", "warm", "heat")),
    ("What do bees make?", ("honey",)),
)

ANSWER_TOKENS = 64  # longest rehearsal answer; a longer one is cut back to whole sentences (trim_answer)


def trim_answer(text: str, finished: bool) -> str | None:
    """An answer cut at ``ANSWER_TOKENS`` back to its last whole sentence or whole line (numbered lists keep their
    complete items: "1. Grapes 2." never ends one); ``finished`` answers are kept whole. None: nothing whole left."""
    text = text.strip()
    if finished:
        return text or None
    ends = [m.end() for m in re.finditer(r"\n", text)]
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if re.fullmatch(r"\s*\d+", text[line_start: m.start()]):  # "2." opening a list item, not a sentence end
            continue
        ends.append(m.end())
    if not ends:
        return None
    return text[: max(ends)].rstrip() or None


def _fingerprint(model, questions: tuple[str, ...], max_new_tokens: int) -> str:
    from xvila.llm import base_fingerprint

    key = {"llm": base_fingerprint(model.llm), "template": model.config.llm.template.to_dict(),
           "questions": list(questions), "tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def base_answers(model, questions: tuple[str, ...], max_new_tokens: int = ANSWER_TOKENS, batch_size: int = 16,
                 progress: bool = False) -> list[tuple[str, str, bool]]:
    """(question, answer, finished) for each question: the base LLM's greedy answer (LoRA adapters off, media
    tokens suppressed) in the model's chat template, decoded in left-padded batches by transformers' ``generate``;
    ``finished``: it wrote its stop token within ``max_new_tokens``."""
    from tqdm.auto import tqdm

    from xvila.conversation import Message, encode_conversation
    from xvila.trainability import adapters_disabled

    tokenizer, template, device = model.tokenizer, model.config.llm.template, model.device
    suppress = sorted({*model.placeholder_ids.values(), *(i for run in model.gen_token_ids.values() for i in run)})
    stops = sorted({model.stop_id, tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [encode_conversation([Message("user", q)], tokenizer, template, add_generation_prompt=True)[0]
               for q in questions]
    was_training = model.training
    model.eval()
    out = []
    try:
        with adapters_disabled(model.llm):
            for i in tqdm(range(0, len(prompts), batch_size), desc="rehearsal answers", unit="batch",
                          disable=not progress, leave=False):
                chunk = prompts[i: i + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                generated = model.llm.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=stops, pad_token_id=pad, suppress_tokens=suppress,
                )[:, width:].tolist()
                for q, row in zip(questions[i: i + batch_size], generated):
                    ends = [k for k, t in enumerate(row) if t in stops]
                    text = tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True)
                    out.append((q, text, bool(ends)))
    finally:
        model.train(was_training)
    return out


def rehearsal_pairs(model, questions: tuple[str, ...] = QUESTIONS, max_new_tokens: int = ANSWER_TOKENS,
                    cache: str | Path | None = None, progress: bool = False) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs for the ``chat`` task: the base LLM's own answers, trimmed to whole sentences
    (:func:`trim_answer`); questions left without a whole sentence are dropped. Cached per base LLM, template,
    question set and length under ``cache`` (default: ``XVILA_CACHE``/rehearsal)."""
    from xvila.llm import cache_dir

    folder = Path(cache) if cache is not None else cache_dir() / "rehearsal"
    path = folder / f"{_fingerprint(model, questions, max_new_tokens)}.json"
    if path.is_file():
        pairs = json.loads(path.read_text())
    else:
        logger.info("writing the base LLM's answers to %d rehearsal questions (once per LLM)", len(questions))
        answers = base_answers(model, questions, max_new_tokens, progress=progress)
        pairs = [[q, a] for q, text, done in answers if (a := trim_answer(text, done)) is not None]
        from xvila.train.checkpoint import atomic_write_text  # every process of a distributed run writes it

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(pairs, indent=1, ensure_ascii=False) + "\n")
    if not pairs:
        raise ValueError("the base LLM gave no usable answer to the rehearsal questions")
    return tuple((q, a) for q, a in pairs)


def ask_probes(model, max_new_tokens: int = 48) -> list[dict]:
    """The held-out :data:`PROBES`, asked of the model as it is (adapters on): one dict per question with the
    answer, whether it holds an expected word, and whether it wrote media."""
    from xvila.conversation import Message
    from xvila.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, decode_media=False)
    results = []
    for question, words in PROBES:
        answer = model.generate([Message("user", question)], config)
        sensible = any(w.lower() in answer.text.lower() for w in words) and not answer.media
        results.append({"question": question, "answer": answer.text, "sensible": sensible,
                        "media": len(answer.media)})
    return results
