"""The latency benchmark runs end to end on the tiny random model (figures are not checked, only their presence)."""

import json


def test_bench_latency_reports_every_case_and_decoding_speeds(capsys, repo_script):
    bench = repo_script("benchmarks/bench_latency.py")
    results = bench.main(["--model", "tiny-random", "--repeats", "1", "--max-new-tokens", "4", "--steps", "1",
                          "--decode-tokens", "8", "--json"])
    assert json.loads(capsys.readouterr().out) == results
    assert set(results["turns"]) == {"image->text", "text->image", "text->video", "text->audio", "image->video"}
    for case, r in results["turns"].items():
        assert r["median_s"] > 0 and r["llm_s"] >= 0 and r["media_s"] >= 0
        target = case.split("->")[1]
        if target != "text":  # the asked-for modality was generated and decoded
            assert any(m.startswith(target) for m in r["media"])
    d = results["decoding"]
    assert d["new_tokens"] > 0
    assert d["ours"]["tokens_per_s"] > 0 and d["transformers"]["tokens_per_s"] > 0 and d["ratio"] > 0
    # our loop picks transformers' greedy tokens, where it may pick them
    assert d["greedy_tokens_compared"] > 0 and d["greedy_tokens_match"] is True
