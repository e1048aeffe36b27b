"""The decoders' precision benchmark runs on the tiny random model (its decoders have no VAE: UNet rows only)."""

import json


def test_bench_precision_times_each_decoder_in_both_precisions(capsys, repo_script):
    bench = repo_script("benchmarks/bench_precision.py")
    results = bench.main(["--model", "tiny-random", "--batch-size", "2", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
    assert set(results["parts"]) == {"image unet", "video unet", "audio unet"}
    for row in results["parts"].values():
        assert row["fp32_s"] > 0 and row["bf16_s"] > 0
        assert abs(row["speedup"] - row["fp32_s"] / row["bf16_s"]) < 0.01 + 0.01 * row["speedup"]
