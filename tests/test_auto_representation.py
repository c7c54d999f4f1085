"""extract --representation auto: every stage and, for images smaller than the model's input, no crop -- the
choice recorded in the config and the store."""

from __future__ import annotations

import pytest

from featurize.sources import DigitsSource
from featurize.store import read_store
from pipelines.extract import extract_features

from conftest import TINY, assert_one_line_error, invoke, photo, write_digit_folder, write_image


@pytest.fixture
def small_digits(tmp_path):
    """12 of scikit-learn's digits as 8 x 8 PNG files in two class folders."""
    source = DigitsSource()
    for s in source.samples[:12]:
        source.load(s.index).save(_mkdir(tmp_path / "digits" / f"c{s.index % 2}") / f"{s.index}.png")
    return tmp_path / "digits"


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_auto_stores_the_stages_and_drops_the_crop_for_small_images(small_digits, tmp_path):
    result = extract_features(small_digits, tmp_path / "auto.h5", representation="auto", **TINY)
    store = read_store(result.path, features=False)
    chosen = store.attrs["representation"]
    assert chosen["layers"] == "stages" and store.layer_names  # every stage beside the last layer
    assert chosen["median_image_side"] == 8 and chosen["crop_pct"] == 1.0
    assert store.attrs["data_config"]["crop_pct"] == 1.0
    assert result.representation == chosen
    plain = extract_features(small_digits, tmp_path / "plain.h5", **TINY)
    assert plain.config_hash != result.config_hash and "representation" not in read_store(plain.path).attrs


def test_auto_keeps_the_crop_of_large_images_and_what_the_user_gave(small_digits, tmp_path):
    folder = tmp_path / "photos"
    for name in ("chelsea", "coffee", "astronaut"):
        write_image(folder / f"{name}.png", photo(name))  # 300-512 px: larger than the model's input
    large = extract_features(folder, tmp_path / "large.h5", representation="auto", **TINY)
    assert large.representation["crop_pct"] is None and large.representation["layers"] == "stages"
    given = extract_features(small_digits, tmp_path / "given.h5", representation="auto", crop_pct=0.9,
                             layers="layer1", **TINY)
    assert given.representation["crop_pct"] == 0.9 and given.representation["layers"] == "layer1"


def test_auto_on_pixels_is_a_one_line_error(runner, tmp_path):
    result = invoke(runner, ["extract", "builtin:digits", "--model", "pixels", "--representation", "auto",
                             "--out", tmp_path / "p.h5", "-q"])
    assert_one_line_error(result, "--model pixels has neither")


@pytest.fixture(scope="module")
def auto_store(tmp_path_factory):
    """90 digits (classes 0-2, 20 train + 10 test each) through test_resnet with --representation auto."""
    root = tmp_path_factory.mktemp("auto")
    folder = write_digit_folder(root / "img", classes=3, train=20, test=10)
    return extract_features(folder, root / "auto.h5", representation="auto", **TINY).path


def _plant(store_path, out, layer, rows):
    """A copy of the store where `layer` is the label (one-hot, scaled) on `rows` and noise everywhere else."""
    import shutil

    import h5py
    import numpy as np

    shutil.copy(store_path, out)
    with h5py.File(out, "r+") as f:
        data = f["layers"][layer]
        values = np.random.default_rng(0).normal(size=data.shape).astype(data.dtype)
        labels = f["labels"][:]
        values[rows, :3] = 10.0 * np.eye(3)[labels[rows]]
        data[...] = values
    return out


def test_compare_heads_auto_is_the_default_for_auto_stores_and_reports_the_choice(runner, auto_store, tmp_path):
    from pipelines.compare import compare_heads

    comparison = compare_heads([auto_store], heads=["logreg"], budget=None, n_boot=200, progress=False)
    chosen = comparison.representation
    layers = read_store(auto_store, features=False).layer_names
    assert chosen["candidates"] == len(layers) + 2  # the default features, every layer, one concatenation
    assert len(chosen["ran"]) <= 4 and chosen["reference"] in chosen["ran"]
    assert len(chosen["concat"]) == 1 and chosen["winner"] == comparison.best["representation"]
    assert chosen["difference"] == pytest.approx(chosen["winner_accuracy"] - chosen["reference_accuracy"])
    given = compare_heads([auto_store], heads=["logreg"], budget=None, representation="given", progress=False)
    assert given.representation is None and {r["representation"] for r in given.rows} == {chosen["reference"]}
    result = invoke(runner, ["compare-heads", auto_store, "--heads", "logreg", "--exhaustive", "--out",
                             tmp_path / "r", "--bootstrap", "100", "-q"])
    assert result.exit_code == 0, result.output
    assert "representation auto:" in result.output
    assert "## Representation chosen (auto)" in (tmp_path / "r" / "report.md").read_text()


def test_the_auto_choice_never_reads_test_rows(auto_store, tmp_path):
    import numpy as np

    from pipelines.compare import compare_heads

    store = read_store(auto_store, features=False)
    layer = store.layer_names[0]  # the earliest stage: the worst candidate without the planted signal
    test, train = np.flatnonzero(store.split == "test"), np.flatnonzero(store.split == "train")
    leaky = _plant(auto_store, tmp_path / "leaky.h5", layer, test)  # a signal only the test rows carry
    chosen = compare_heads([leaky], heads=["logreg"], budget=None, n_boot=100, progress=False).representation
    assert not any(name.endswith(f":{layer}") for name in chosen["ran"])
    assert not any(layer in name for name in chosen["concat"])
    honest = _plant(auto_store, tmp_path / "honest.h5", layer, np.concatenate([train, test]))  # seen in training
    chosen = compare_heads([honest], heads=["logreg"], budget=None, n_boot=100, progress=False).representation
    assert chosen["winner"].endswith(f":{layer}") or layer in chosen["winner"]


def test_auto_without_layers_is_a_one_line_error(runner, small_digits, tmp_path):
    plain = extract_features(small_digits, tmp_path / "plain.h5", **TINY).path
    result = invoke(runner, ["compare-heads", plain, "--representation", "auto", "-q"])
    assert_one_line_error(result, "no store given without a layer holds any")


def test_a_reference_dropped_by_the_race_is_reported_with_the_race_evidence():
    import numpy as np

    from pipelines.compare import _auto_outcome

    rows = [{"representation": "lite0:concat(last+blocks.6)", "head": "rbf-svm", "accuracy": 0.92, "mode": "halving"}]
    skipped = [{"representation": "lite0", "head": h, "reason": f"{a * 100:.2f} % on 2000 held-out rows",
                "race": {"rung_accuracy": [a], "rung_rows": [2000]}} for h, a in (("logreg", 0.872), ("rbf-svm", 0.874))]
    ranking = {"scores": [{"candidate": "lite0"}, {"candidate": "lite0:concat(last+blocks.6)"}], "seconds": 3.0}
    y = np.zeros(10)
    out = _auto_outcome(rows, {}, y, ["lite0"], ranking, skipped, 100, 0)
    assert out["reference"] == "lite0" and out["difference"] is None
    assert out["reference_dropped"]["head"] == "rbf-svm" and out["reference_dropped"]["held_out_accuracy"] == 0.874
