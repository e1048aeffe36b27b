import pytest
import torch

from xvila.splice import IGNORE_INDEX, cheapest_packing, gather_run_windows, gather_runs, pack_rows, splice_media

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



def test_gather_run_windows_take_the_states_before_each_run():
    run = torch.tensor([50, 51])
    ids = torch.tensor([[1, 2, 3, 50, 51, 4, 50, 51], [50, 51, 5, 6, 7, 8, 9, 0]])
    hidden = torch.arange(2 * 8 * 2, dtype=torch.float).view(2, 8, 2) + 1
    windows, mask = gather_run_windows(hidden, ids, run, context=3)
    assert windows.shape == (3, 5, 2) and mask.shape == (3, 5)
    torch.testing.assert_close(windows[0], hidden[0, 0:5])  # 3 before the first run, then the run
    torch.testing.assert_close(windows[1], hidden[0, 3:8])  # the second run's context holds the first run
    assert mask[:2].all()
    # a run at its row's start: nothing before it, masked out and zero
    assert mask[2].tolist() == [False, False, False, True, True]
    assert torch.all(windows[2, :3] == 0)
    torch.testing.assert_close(windows[2, 3:], hidden[1, 0:2])
    runs, all_kept = gather_run_windows(hidden, ids, run, context=0)
    torch.testing.assert_close(runs, gather_runs(hidden, ids, run))
    assert all_kept.all()
    with pytest.raises(ValueError, match="in order"):
        gather_run_windows(hidden, torch.tensor([[51, 50, 1, 2, 3, 4, 5, 6], [0] * 8]), run, context=2)


def _right_padded(lengths, L):
    return (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()


def test_pack_rows_places_every_token_once_and_restarts_positions():
    mask = _right_padded([5, 2, 3, 1, 4], 6)
    pk = pack_rows(mask)
    assert pk is not None and pk.source.shape[0] < 5 and pk.source.shape[1] == 6
    x = torch.randn(5, 6, 3)
    packed = pk.pack(x)
    back = pk.unpack(packed)
    real = mask.bool()
    assert torch.equal(back[real], x[real]) and torch.all(back[~real] == 0)
    # each packed sequence is contiguous, counts its positions from 0, and holds its row's tokens in order
    for b, n in enumerate([5, 2, 3, 1, 4]):
        slots = pk.target[b, :n]
        r, c = slots // pk.source.shape[1], slots % pk.source.shape[1]
        assert torch.all(r == r[0]) and torch.equal(c, c[0] + torch.arange(n))
        assert torch.equal(pk.position_ids[r, c], torch.arange(n))
        assert torch.equal(packed[r, c], x[b, :n])
    assert int((pk.source < 5 * 6).sum()) == int(mask.sum())  # no token twice, none lost


def test_pack_rows_capacity_and_when_it_declines():
    assert pack_rows(_right_padded([4, 4, 4, 4], 4), capacity=8) is None  # full rows: nothing to save
    mask = _right_padded([4, 3, 2, 1], 4)
    assert pack_rows(mask).source.shape == (3, 4)
    assert pack_rows(mask, capacity=10).source.shape == (1, 10)  # as long as its longest row
    # the cost model: attention free -> one row; attention dear -> short rows; dearer still -> no packing
    assert cheapest_packing(mask, pair_cost=0.0).source.shape == (1, 10)
    assert cheapest_packing(mask, pair_cost=0.1).source.shape == (3, 4)
    assert cheapest_packing(_right_padded([3, 3], 3), pair_cost=0.01) is None  # full rows: only more pairs
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pack_rows(left) is None  # left padding: positions would differ from the unpacked rows'
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert pack_rows(empty) is None and cheapest_packing(empty, pair_cost=0.01) is None


def test_packed_llm_hidden_states_equal_the_unpacked_rows():
    """The block-diagonal mask transformers builds from restarting position ids keeps packed sequences apart."""
    from xvila.llm import LLMConfig, build_llm

    llm, _ = build_llm(LLMConfig.tiny())
    decoder = llm.get_decoder().eval()
    lengths = [7, 3, 5, 2, 6]
    mask = _right_padded(lengths, 8)
    embeds = torch.randn(5, 8, llm.config.hidden_size)
    with torch.no_grad():
        alone = [decoder(inputs_embeds=embeds[b : b + 1, :n], use_cache=False).last_hidden_state[0]
                 for b, n in enumerate(lengths)]
        pk = pack_rows(mask, capacity=16)
        assert pk.source.shape[0] < 5
        packed = pk.unpack(decoder(inputs_embeds=pk.pack(embeds), position_ids=pk.position_ids,
                                   use_cache=False).last_hidden_state)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(packed[b, :n], alone[b], atol=1e-5, rtol=1e-4)
