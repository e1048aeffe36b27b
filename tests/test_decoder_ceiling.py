"""The decoders' ceiling benchmark runs on the tiny random model (its scoring: tests/test_probes.py)."""

import json


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
