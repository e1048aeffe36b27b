"""Chat rehearsal: the base LLM's own answers (adapters off), trimmed to whole sentences, cached per LLM, and mixed
into training as the ``chat`` task."""

import json

import numpy as np
import pytest
import torch

from xvila.config import XVilaConfig
from xvila.data import chat
from xvila.data.chat import PROBES, QUESTIONS, rehearsal_pairs, trim_answer
from xvila.data.tasks import TASKS, TaskSpec, check_mixture
from xvila.model import XVilaModel
from xvila.trainability import TrainabilitySpec, adapters_disabled, apply_trainability


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XVilaModel(XVilaConfig.tiny()).eval()


def test_probes_are_held_out_of_the_rehearsal():
    asked = {q.lower() for q in QUESTIONS}
    assert len(asked) == len(QUESTIONS)
    assert not asked & {q.lower() for q, _ in PROBES}


def test_trim_keeps_whole_sentences_and_list_items():
    assert trim_answer("The capital is Rome. It has", finished=False) == "The capital is Rome."
    assert trim_answer("7 times 8 is 56. That is", finished=False) == "7 times 8 is 56."
    assert trim_answer("1. Grapes\n2. Apples\n3. Ban", finished=False) == "1. Grapes\n2. Apples"
    assert trim_answer("1. Grapes\n2.", finished=False) == "1. Grapes"  # "2." opens an item, it ends nothing
    assert trim_answer("Here is a list:\n\n1. Carrots\n2.", finished=False) == "Here is a list:\n\n1. Carrots"
    assert trim_answer("no sentence ends here", finished=False) is None
    assert trim_answer("  Paris  ", finished=True) == "Paris"  # a finished answer is whole, full stop or not
    assert trim_answer("", finished=True) is None


def test_adapters_disabled_gives_the_base_model_and_restores(model):
    ids = torch.tensor([[1, 5, 9, 3]])
    base = model.llm(input_ids=ids).logits
    spec = TrainabilitySpec.from_dict({"groups": {"llm": "lora"}, "lora": {"rank": 4, "alpha": 8}})
    lora_model = XVilaModel(XVilaConfig.tiny()).eval()
    lora_model.llm.load_state_dict(model.llm.state_dict())
    apply_trainability(lora_model, spec)
    with torch.no_grad():
        for n, p in lora_model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # LoRA B starts at zero: make the adapters change the output
    grads = {n: p.requires_grad for n, p in lora_model.named_parameters()}
    adapted = lora_model.llm(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    with adapters_disabled(lora_model.llm):
        torch.testing.assert_close(lora_model.llm(input_ids=ids).logits, base)
    torch.testing.assert_close(lora_model.llm(input_ids=ids).logits, adapted)
    assert grads == {n: p.requires_grad for n, p in lora_model.named_parameters()}  # trainability untouched


def test_base_answers_decode_in_batches_like_one_at_a_time(model):
    """Left-padded batches give each question the answer it gets alone (greedy), and no media token."""
    questions = QUESTIONS[:3]
    together = chat.base_answers(model, questions, max_new_tokens=6, batch_size=3)
    alone = [chat.base_answers(model, (q,), max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert together == alone
    assert [q for q, _, _ in together] == list(questions)
    added = {model.tokenizer.convert_ids_to_tokens(i) for run in model.gen_token_ids.values() for i in run}
    assert not any(tok in text for _, text, _ in together for tok in added)


def test_rehearsal_pairs_are_written_once_and_read_back(model, tmp_path, monkeypatch):
    calls = []

    def fake(model, questions, max_new_tokens, progress=False):
        calls.append(len(questions))
        return [(q, "It is so. And then", False) if i % 2 else (q, "words without an end", False)
                for i, q in enumerate(questions)]

    monkeypatch.setattr(chat, "base_answers", fake)
    pairs = rehearsal_pairs(model, QUESTIONS[:6], cache=tmp_path)
    assert pairs == tuple((q, "It is so.") for q in QUESTIONS[1:6:2])  # unfinished sentences are dropped
    assert rehearsal_pairs(model, QUESTIONS[:6], cache=tmp_path) == pairs and calls == [6]  # from the cache
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text()) == [list(p) for p in pairs]
    rehearsal_pairs(model, QUESTIONS[:5], cache=tmp_path)  # another question set: another entry
    assert calls == [6, 5]
    monkeypatch.setattr(chat, "base_answers", lambda *a, **k: [(q, "no end", False) for q in QUESTIONS[:2]])
    with pytest.raises(ValueError, match="no usable answer"):
        rehearsal_pairs(model, QUESTIONS[:2], cache=tmp_path)


def test_chat_task_builds_text_conversations_from_the_pairs(model):
    spec = TaskSpec.from_model(model, follow_ups=2)
    with pytest.raises(ValueError, match="needs rehearsal answers"):
        check_mixture({"chat": 1, "image->text": 1}, spec)
    pairs = (("Hi?", "Hello."), ("2+2?", "4."), ("Sky?", "Blue."))
    spec = spec.replace(chat=pairs)
    assert check_mixture({"chat": 1, "image->text": 1}, spec)["chat"] == 0.5
    lengths = set()
    for seed in range(20):
        messages = TASKS["chat"]([], np.random.default_rng(seed), spec)
        assert [m.role for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(not m.media for m in messages)
        assert all((u.text, a.text) in pairs for u, a in zip(messages[::2], messages[1::2]))
        lengths.add(len(messages) // 2)
    assert lengths == {1, 2, 3}  # the question, then up to follow_ups more


def test_a_phase_with_chat_trains_on_the_base_answers(tmp_path, monkeypatch):
    """x2x-textual of the smoke recipe with chat mixed in: the answers are written from the phase's starting model
    (adapters off, before any wrapping) and reach the batches."""
    from pathlib import Path

    from xvila.train import data as train_data
    from xvila.train.loop import seed_everything, train
    from xvila.train.recipe import read_recipe

    seed_everything(0)
    XVilaModel(XVilaConfig.tiny()).save_pretrained(tmp_path / "tiny")
    seen = []

    def fake(model, questions, max_new_tokens, progress=False):
        seen.append((type(model).__name__, "llm" in model.adapters))  # the model itself, LoRA in place
        return [(q, f"Answer {i}.", True) for i, q in enumerate(questions)]

    monkeypatch.setattr(chat, "base_answers", fake)
    monkeypatch.setenv("XVILA_CACHE", str(tmp_path / "cache"))
    texts = []
    make_batch = train_data.make_batch

    def recording(stream, indices, model, cache=None):
        texts.extend(str(stream.sample(i)) for i in indices)
        return make_batch(stream, indices, model, cache)

    monkeypatch.setattr(train_data, "make_batch", recording)
    smoke = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"
    recipe = read_recipe(smoke, [f"output_dir={tmp_path / 'run'}", "phases.x2x-textual.steps=3",
                                 "phases.x2x-textual.batch_size=4", "phases.x2x-textual.data.tasks={chat: 1}"])
    (summary,) = train(recipe, phase="x2x-textual", init=tmp_path / "tiny")
    assert summary.final_step == 3 and seen == [("XVilaModel", True)]
    assert any("Answer" in t for t in texts)
    assert list((tmp_path / "cache" / "rehearsal").glob("*.json"))


def test_ask_probes_reports_each_question(model):
    results = chat.ask_probes(model, max_new_tokens=2)
    assert [r["question"] for r in results] == [q for q, _ in PROBES]
    assert all(isinstance(r["sensible"], bool) and isinstance(r["answer"], str) for r in results)
    fake = type("M", (), {"generate": lambda self, messages, config: type("A", (), {
        "text": {"What is the capital of France?": "It is Paris."}.get(messages[0].text, "?"), "media": []})()})()
    judged = {r["question"]: r["sensible"] for r in chat.ask_probes(fake)}
    assert judged["What is the capital of France?"] and not judged["What is the capital of Italy?"]

