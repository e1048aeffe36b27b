"""The decoders' ceiling benchmark runs on the tiny random model (its scoring: tests/test_probes.py)."""

import json

import pytest

from xvila.world import HELD_OUT_PAIRS, probe_text


def test_decoder_ceiling_reports_each_modality(capsys, repo_script):
    bench = repo_script("benchmarks/decoder_ceiling.py")
    results = bench.main(["--model", "tiny-random", "--n", "2", "--steps", "2", "--modalities", "image", "audio",
                          "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert set(results) == {"image", "audio"}
    for m, rows in results.items():
        assert rows["truth"] and all(v == 1.0 for v in rows["truth"].values()), m
        assert "vae reconstruction" not in rows  # the tiny random model's decoders have no VAE
        assert all(0.0 <= v <= 1.0 for v in rows["text->X from the true caption"].values())


def test_decoder_ceiling_reads_other_splits_from_an_offset(capsys, repo_script):
    bench = repo_script("benchmarks/decoder_ceiling.py")
    seen = []
    caption_accuracy = bench.caption_accuracy
    bench.caption_accuracy = lambda m, media, captions: (seen.append(captions), caption_accuracy(m, media, captions))[1]
    bench.main(["--model", "tiny-random", "--n", "2", "--steps", "2", "--modalities", "image", "--split",
                "compositional", "--offset", "7"])
    assert "2 compositional scenes" in capsys.readouterr().out
    read = [probe_text(c) for c in seen[0]]
    assert len(read) == 2 and all((r["shape"], r["colour"]) in HELD_OUT_PAIRS for r in read)
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-random", "--offset", "-1"])
