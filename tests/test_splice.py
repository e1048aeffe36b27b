import pytest
import torch

from xvila.splice import IGNORE_INDEX, gather_runs, splice_media

PH_A, PH_B = 90, 91


def _reference_splice(embeds, ids, media):
    """Per-token Python reference (slow, obviously right) for one row."""
    out, counters = [], {pid: 0 for pid in media}
    for t, tok in enumerate(ids.tolist()):
        if tok in media:
            out.extend(media[tok][counters[tok]])
            counters[tok] += 1
        else:
            out.append(embeds[t])
    return torch.stack(out)


def test_splice_matches_reference_and_masks():
    D = 5
    ids = torch.tensor([[1, PH_A, 2, PH_B, 3, 0], [4, 5, PH_A, PH_A, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[5], [4]])).long()
    labels = torch.where(mask.bool(), ids + 1000, torch.tensor(IGNORE_INDEX))
    embeds = torch.randn(2, 6, D)
    a = torch.randn(3, 2, D)  # 3 items, 2 tokens each
    b = torch.randn(1, 3, D)
    out = splice_media(embeds, ids, mask, {PH_A: a, PH_B: b}, labels, pad_id=0)
    # row 0: 1 + 2 + 1 + 3 + 1 = 8 real, + 1 pad; row 1: 2 + 2 + 2 = 6 real, + 2 pad
    assert out.inputs_embeds.shape == (2, 9, D)
    ref0 = _reference_splice(embeds[0, :5], ids[0, :5], {PH_A: a[:1], PH_B: b})
    torch.testing.assert_close(out.inputs_embeds[0, :8], ref0)
    ref1 = _reference_splice(embeds[1, :4], ids[1, :4], {PH_A: a[1:]})
    torch.testing.assert_close(out.inputs_embeds[1, :6], ref1)
    assert out.attention_mask.tolist() == [[1] * 8 + [0], [1] * 6 + [0] * 3]
    assert out.media_mask[0].tolist() == [0, 1, 1, 0, 1, 1, 1, 0, 0]
    assert out.labels[0].tolist()[:8] == [1001, -100, -100, 1002, -100, -100, -100, 1003]
    assert out.input_ids[0].tolist()[:8] == [1, PH_A, PH_A, 2, PH_B, PH_B, PH_B, 3]


def test_splice_left_padding_aligns_ends():
    ids = torch.tensor([[0, 0, 7, PH_A], [7, PH_A, 8, PH_A]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    media = torch.randn(3, 2, 3)
    out = splice_media(torch.randn(2, 4, 3), ids, mask, {PH_A: media}, padding_side="left")
    assert out.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    torch.testing.assert_close(out.inputs_embeds[0, 4:], media[0])  # the prompt ends at the last position


def test_splice_gradients_reach_media():
    ids = torch.tensor([[1, PH_A, 2]])
    media = torch.randn(1, 4, 3, requires_grad=True)
    out = splice_media(torch.randn(1, 3, 3), ids, torch.ones_like(ids), {PH_A: media})
    out.inputs_embeds.sum().backward()
    assert torch.equal(media.grad, torch.ones_like(media))


def test_splice_count_mismatch_is_a_clear_error():
    ids = torch.tensor([[1, PH_A, PH_A]])
    with pytest.raises(ValueError, match="2 placeholder"):
        splice_media(torch.randn(1, 3, 4), ids, torch.ones_like(ids), {PH_A: torch.randn(1, 2, 4)})
    with pytest.raises(ValueError, match=r"\(N, K, 4\)"):
        splice_media(torch.randn(1, 3, 4), ids, torch.ones_like(ids), {PH_A: torch.randn(2, 2, 5)})


def test_gather_runs_in_order_and_errors():
    run = torch.tensor([50, 51, 52])
    ids = torch.tensor([[1, 50, 51, 52, 2], [50, 51, 52, 3, 4]])
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float).view(2, 5, 2)
    out = gather_runs(hidden, ids, run)
    assert out.shape == (2, 3, 2)
    torch.testing.assert_close(out[0], hidden[0, 1:4])
    torch.testing.assert_close(out[1], hidden[1, 0:3])
    with pytest.raises(ValueError, match="whole number"):
        gather_runs(hidden, torch.tensor([[1, 50, 51, 2, 3], [0, 0, 0, 0, 0]]), run)
    with pytest.raises(ValueError, match="in order"):
        gather_runs(hidden, torch.tensor([[1, 51, 50, 52, 3], [0, 0, 0, 0, 0]]), run)
