"""bench: one run measures every figure and the ratios are computed from them."""

from __future__ import annotations

import json

import pytest

from cli import main

KEYS = ("forward_ips", "end_to_end_ips", "naive_ips", "decode_ips_per_worker", "write_mb_s",
        "ratio_end_to_end_vs_forward", "speedup_vs_naive", "bf16_min_cosine", "bf16_mean_cosine",
        "bf16_probe_acc_delta", "predecoded_ips", "ratio_predecoded_vs_forward", "decode_capacity_ips",
        "ratio_end_to_end_vs_decode_capacity")


def test_bench_cli_writes_every_measure(runner, tmp_path):
    out = tmp_path / "bench.json"  # OpenVINO's measures: tests/test_runtime.py, in a process of their own
    # 64 px instead of test_resnet's 160: the bf16 probe extracts the digits twice, and bf16 without native
    # support is slow on CPUs like CI's
    result = runner.invoke(main, ["bench", "--model", "test_resnet", "--weights", "random", "--image-size", "64",
                                  "--num-images", "24", "--runtime", "torch", "--json", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in KEYS:
        assert key in data, key
        assert key in result.output
    for key in ("forward_ips", "end_to_end_ips", "naive_ips", "decode_ips_per_worker", "write_mb_s"):
        assert data[key] > 0
    assert data["ratio_end_to_end_vs_forward"] == pytest.approx(data["end_to_end_ips"] / data["forward_ips"])
    assert data["speedup_vs_naive"] == pytest.approx(data["end_to_end_ips"] / data["naive_ips"])
    assert data["ratio_predecoded_vs_forward"] == pytest.approx(data["predecoded_ips"] / data["forward_ips"])
    assert data["ratio_end_to_end_vs_decode_capacity"] == pytest.approx(
        data["end_to_end_ips"] / data["decode_capacity_ips"])
    assert 0.9 < data["bf16_min_cosine"] <= data["bf16_mean_cosine"] <= 1.0
    assert abs(data["bf16_probe_acc_delta"]) < 10
    assert data["images"] == 24 and data["machine"]["cores"] >= 1 and data["input_size"] == [3, 64, 64]
    assert data["decoder"] == "pillow" and data["nonfinite_rows"] == 0
    assert 0 <= data["first_batch_seconds"] < 60 and 0 <= data["shutdown_seconds"] < 60
    assert data["end_to_end_steady_ips"] > 0  # from the first batch to the last: several batches of 8


def test_bench_needs_a_real_folder(runner, tmp_path):
    result = runner.invoke(main, ["bench", "--images", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bench_images_are_the_same_whoever_encodes_them(tmp_path):
    from pipelines.bench import make_bench_images

    serial = make_bench_images(tmp_path / "one", 12, size=(64, 48))
    shared = make_bench_images(tmp_path / "three", 12, size=(64, 48), workers=3)
    names = sorted(p.name for p in serial.iterdir())
    assert len(names) == 12 and names == sorted(p.name for p in shared.iterdir())
    assert all((serial / n).read_bytes() == (shared / n).read_bytes() for n in names)
    assert len({(serial / n).read_bytes() for n in names}) == 12  # twelve different crops
    from PIL import Image

    varied = make_bench_images(tmp_path / "varied", 12, size=(64, 48), varied=True, workers=3)
    sizes = [Image.open(varied / n).size for n in names]
    assert len(set(sizes)) >= 10 and all(32 <= w <= 64 and 24 <= h <= 48 for w, h in sizes)
