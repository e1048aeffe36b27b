"""The attribute trace benchmark runs on the tiny random model: said and drawn for each carried attribute."""

import json


def test_attribute_trace_reports_said_and_drawn(capsys, repo_script):
    bench = repo_script("benchmarks/attribute_trace.py")
    results = bench.main(["--model", "tiny-random", "--split", "compositional", "--n", "2", "--steps", "2",
                          "--tasks", "image->audio", "text->image", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert set(results["image->audio"]["said"]) == {"shape", "colour", "size"}  # an image carries no motion
    assert set(results["text->image"]["drawn"]) == {"shape", "colour", "size"}
    for row in results.values():
        assert row["n"] == 2 and len(row["rows"]) == 2
        assert all(0.0 <= v <= 1.0 for kind in ("said", "drawn") for v in row[kind].values())
        assert all(r["truth/shape"] for r in row["rows"])
