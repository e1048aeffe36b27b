"""The encoder probe benchmark runs on the tiny random model and reports every split for each attribute."""

import json


def test_encoder_probe_reports_each_attribute_on_each_split(capsys, repo_script):
    bench = repo_script("benchmarks/encoder_probe.py")
    results = bench.main(["--model", "tiny-random", "--train", "12", "--n", "4", "--modalities", "image", "audio",
                          "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert set(results) == {"image", "audio"}
    assert set(results["image"]) == {"shape", "colour", "size"}
    assert set(results["audio"]) == {"shape", "colour", "size", "motion"}
    for rows in results.values():
        for scores in rows.values():
            assert set(scores) == {"train", "test", "compositional"}
            assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_a_probe_separates_separable_embeddings(repo_script):
    import torch

    bench = repo_script("benchmarks/encoder_probe.py")
    x = torch.nn.functional.normalize(torch.randn(60, 16), dim=-1)
    y = x[:, :3].argmax(1)  # the label is a linear function of the embedding
    probe = bench.fit_probe(x, y, 3)
    assert (probe(x * 10).argmax(1) == y).float().mean() > 0.95
