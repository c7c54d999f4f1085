"""audit: neighbour search, the calibrated near-duplicate rule, label issues and outliers (heads.audit), and the
pipeline and CLI on real images with planted copies and flipped labels (pipelines.auditing)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, invoke
from test_report_html import BROWSER
from heads import HeadsError
from heads.audit import (THUMB, CosineSpace, Neighbours, Rule, calibrate, cosine_neighbours, duplicate_pairs,
                         far_out, label_issues, out_of_fold_probabilities, outlier_scores, pair_clusters,
                         pixel_similarity)


def test_exact_neighbours_match_brute_force_and_ivf_finds_most_of_them():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 40))  # clustered, as features are
    X = CosineSpace(centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 40))).X
    found = cosine_neighbours(X, 5)
    brute = X @ X.T
    np.fill_diagonal(brute, -np.inf)
    expected = np.argsort(-brute, axis=1)[:, :5]
    assert found.method["index"] == "flat" and found.method["exact"]
    np.testing.assert_allclose(found.similarity, np.take_along_axis(brute, expected, 1), atol=1e-5)
    assert (found.index != np.arange(len(X))[:, None]).all()  # never a row itself
    approximate = cosine_neighbours(X, 5, exact_limit=1000)
    assert approximate.method["index"] == "ivf" and not approximate.method["exact"]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approximate.index, expected)])
    assert overlap > 0.8, overlap


def test_identical_rows_are_each_others_neighbours_and_tiny_inputs_work():
    X = CosineSpace(np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])).X
    found = cosine_neighbours(X, 10)  # more neighbours asked than rows: as many as there are
    assert found.index.shape == (3, 2)
    assert found.index[0, 0] == 1 and found.index[1, 0] == 0 and found.similarity[0, 0] == pytest.approx(1.0)
    assert cosine_neighbours(X[:1], 3).index.shape == (1, 0)


def test_calibrated_rule_keeps_false_matches_within_the_limit_and_maximises_recall():
    rng = np.random.default_rng(1)
    copies = {"jpeg": rng.uniform(0.9, 1.0, 200), "crop": rng.uniform(0.7, 0.95, 200)}
    others = rng.uniform(0.5, 0.92, 400)
    rule = calibrate(copies, others, max_false_match=0.01)
    assert rule.calibrated and rule.signal == "features" and rule.min_pixel is None
    assert rule.false_match_rate <= 0.01
    assert np.mean(others >= rule.threshold) == pytest.approx(rule.false_match_rate)
    assert rule.recall_by_kind["jpeg"] > 0.8 and rule.recall_by_kind["crop"] < 0.2
    values = np.concatenate([*copies.values(), others])
    looser = values[values < rule.threshold].max()  # the next rule with more recall lets too many others pass
    assert np.mean(others >= looser) > 0.01
    # a pixel similarity that separates them lifts the recall without more false matches
    copy_pixel = {k: rng.uniform(0.95, 1.0, 200) for k in copies}
    both = calibrate(copies, others, copy_pixel=copy_pixel, other_pixel=rng.uniform(0.3, 0.9, 400),
                     max_false_match=0.01)
    assert both.signal == "features+pixels" and 0.9 <= both.min_pixel <= min(v.min() for v in copy_pixel.values())
    assert both.recall == 1.0 and both.false_match_rate == 0.0


def test_pairs_are_reported_once_and_joined_into_clusters():
    index = np.array([[1, 2], [0, 3], [0, 1], [1, 0], [-1, -1]])
    similarity = np.array([[0.99, 0.5], [0.99, 0.97], [0.5, 0.4], [0.97, 0.1], [-np.inf, -np.inf]], np.float32)
    a, b, cosine, pixel = duplicate_pairs(Neighbours(similarity, index), Rule(0.9))
    assert list(zip(a, b)) == [(0, 1), (1, 3)] and pixel is None
    np.testing.assert_allclose(cosine, [0.99, 0.97])
    assert list(pair_clusters(5, a, b)) == [0, 0, -1, 0, -1]
    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 256, (5, THUMB, THUMB)).astype(np.uint8)
    thumbs[1] = thumbs[0][:, ::-1]  # 1 is 0 mirrored; 3 is unrelated noise
    a, b, _, pixel = duplicate_pairs(Neighbours(similarity, index), Rule(0.9, min_pixel=0.95), thumbs)
    assert list(zip(a, b)) == [(0, 1)] and pixel[0] == pytest.approx(1.0, abs=1e-4)


def _thumb(array) -> np.ndarray:
    from pipelines.auditing import thumbnail

    return thumbnail(Image.fromarray(array))


def test_pixel_similarity_finds_a_cropped_copy_of_a_real_photo_in_its_source():
    from skimage.data import astronaut, chelsea, coffee

    photo = astronaut()
    h, w = photo.shape[:2]
    cropped = photo[int(0.06 * h):, : int(0.93 * w)]  # 6 % off the top, 7 % off the right
    thumbs = np.stack([_thumb(photo), _thumb(cropped), _thumb(chelsea()), _thumb(coffee())])
    plain = pixel_similarity(thumbs, np.array([0, 0, 2]), np.array([1, 2, 3]), align=False)
    aligned = pixel_similarity(thumbs, np.array([0, 0, 2]), np.array([1, 2, 3]))
    assert aligned[0] > 0.93 and aligned[0] > plain[0] + 0.02, (plain, aligned)
    assert aligned[1] < 0.7 and aligned[2] < 0.7


def test_label_issues_find_most_uniform_flips_on_real_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), int(0.03 * len(y)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    probabilities, C = out_of_fold_probabilities(X.astype(np.float32), noisy, seed=0)
    is_issue, quality, suggested = label_issues(noisy, probabilities)
    top = np.argsort(quality)[:len(flipped)]
    assert len(set(top) & set(flipped)) / len(flipped) >= 0.8
    assert (suggested[flipped] == y[flipped]).mean() > 0.8
    assert is_issue[flipped].mean() > 0.8 and is_issue.sum() < 3 * len(flipped)


def test_out_of_fold_probabilities_refuse_one_class_and_tiny_classes():
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(HeadsError, match="one"):
        out_of_fold_probabilities(X, np.zeros(20, int))
    with pytest.raises(HeadsError, match="at least 2 rows of every class"):
        out_of_fold_probabilities(X, np.r_[np.zeros(19, int), 1])


def test_outlier_scores_single_out_a_far_row():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8)) * 0.1 + 1.0
    X[7] = -1.0
    scores = outlier_scores(cosine_neighbours(CosineSpace(X).X, 5))
    assert scores.argmax() == 7 and scores[7] > far_out(scores)
    assert (scores > far_out(scores)).sum() <= 5


# --- the pipeline and the CLI, on real images ---

def _planted_folder(root, photos):
    """lfw faces and non-faces (25 px) and tiles of real photographs, with copies of train images planted in
    the test split and two labels flipped; returns the truth."""
    from skimage.data import lfw_subset

    from benchmarks.audit_planted import plant_copy

    rng = np.random.default_rng(0)
    images = [(Image.fromarray((im * 255).round().astype(np.uint8)), "face" if i < 100 else "other")
              for i, im in enumerate(lfw_subset())]
    ids, copies = [], []
    for i, (im, label) in enumerate(images):
        split = "test" if i % 5 == 0 else "train"
        ids.append(f"{split}/{label}/{i:04d}.png")
        im.save((root / ids[-1]).parent.mkdir(parents=True, exist_ok=True) or root / ids[-1])
    train = [i for i, name in enumerate(ids) if name.startswith("train")]
    for n, i in enumerate(rng.choice(train, 12, replace=False)):
        kind = ("jpeg", "rescale", "flip")[n % 3]
        copy, ext = plant_copy(images[i][0], kind, rng)
        name = f"test/{images[i][1]}/copy{n:02d}{ext}"
        copy.convert("L").save(root / name, quality=95) if ext == ".jpg" else copy.save(root / name)
        copies.append((name, ids[i], kind))
    return copies


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from pipelines.extract import extract_features

    root = tmp_path_factory.mktemp("planted") / "images"
    copies = _planted_folder(root, None)
    store = extract_features(str(root), root.parent / "lite0.h5", model="tf_efficientnet_lite0", weights="packaged",
                             workers=0, progress=False).path
    return store, copies


def test_audit_finds_planted_copies_and_writes_its_files(planted, tmp_path, runner):
    store, copies = planted
    out = tmp_path / "audit"
    result = invoke(runner, ["audit", store, "--out", out, "--sample", 60, "-q"])
    assert result.exit_code == 0, result.output
    assert "near-duplicates:" in result.output and "calibrated on 60 images" in result.output
    summary = json.loads((out / "audit.json").read_text())
    rule = summary["duplicates"]["rule"]
    assert rule["calibrated"] and rule["signal"] == "features+pixels" and rule["false_match_rate"] <= 0.01
    with open(out / "duplicates.csv") as f:
        pairs = {frozenset((r["id_a"], r["id_b"])) for r in csv.DictReader(f)}
    found = [frozenset((c, s)) in pairs for c, s, _ in copies]
    assert np.mean(found) >= 0.75, (found, rule)  # jpeg, rescale and mirror copies of 25 px faces
    assert summary["duplicates"]["test_with_twin"] >= sum(found)
    with open(out / "label_issues.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["labelled"] == summary["rows"] and {"id", "given", "suggested", "quality"} <= set(rows[0])
    assert (out / "outliers.csv").exists() and summary["audit_version"] == 1


def test_audit_without_labels_or_images_says_what_it_could_not_do(planted, tmp_path):
    import shutil

    from pipelines.auditing import audit

    store, _ = planted
    moved = tmp_path / "moved"
    shutil.copytree(store.parent / "images", moved)
    result = audit(store, tmp_path / "a", images=str(tmp_path / "nowhere"), labels=False, progress=False)
    assert not result.duplicates["rule"]["calibrated"] and any("not reachable" in n for n in result.notes)
    assert result.label_issues is None and not (tmp_path / "a" / "label_issues.csv").exists()
    again = audit(store, tmp_path / "b", images=str(moved), sample=20, labels=False, progress=False)
    assert again.duplicates["rule"]["calibrated"]


def test_audit_bad_inputs_are_one_line_errors_and_write_nothing(planted, tmp_path, runner, digits_tiny):
    import h5py

    store, _ = planted
    out = tmp_path / "out"
    assert_one_line_error(invoke(runner, ["audit", f"{store}:blocks.9", "--out", out]), "no layer 'blocks.9'")
    assert_one_line_error(invoke(runner, ["audit", store, "--task", "nope", "--out", out]), "no task 'nope'")
    broken = tmp_path / "nan.h5"
    broken.write_bytes(digits_tiny.read_bytes())
    with h5py.File(broken, "r+") as f:
        f["features"][3] = np.nan
    assert_one_line_error(invoke(runner, ["audit", broken, "--out", out]), "NaN or infinite features")
    assert not out.exists()


def test_audit_refuses_one_row_and_one_class(tmp_path, runner):
    from conftest import TINY
    from pipelines.extract import extract_features

    rng = np.random.default_rng(0)
    for n in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            (tmp_path / "one" / "a").mkdir(parents=True, exist_ok=True) or tmp_path / "one" / "a" / f"{n}.png")
    one_class = extract_features(str(tmp_path / "one"), tmp_path / "one.h5", **TINY).path
    single = tmp_path / "single" / "a"
    single.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(single / "x.png")
    one_row = extract_features(str(tmp_path / "single"), tmp_path / "single.h5", **TINY).path
    out = tmp_path / "out"
    assert_one_line_error(invoke(runner, ["audit", one_row, "--out", out]), "needs at least 2")
    assert_one_line_error(invoke(runner, ["audit", one_class, "--out", out]), "has one class")
    assert not out.exists()
    result = invoke(runner, ["audit", one_class, "--out", out, "--no-labels", "--sample", 3, "-q"])
    assert result.exit_code == 0 and "label issues skipped" in result.output, result.output


def test_exclude_duplicates_scores_knn_without_the_planted_twins(planted, tmp_path, runner):
    """Copies of train images planted in the test split: a 1-NN head finds them; scored without them, its
    accuracy is its accuracy on the clean test rows."""
    from pipelines.auditing import audit
    from pipelines.compare import compare_heads

    store, copies = planted
    audit(store, tmp_path / "audit", sample=40, labels=False, progress=False)
    comparison = compare_heads([store], ["knn"], budget=None, exclude_duplicates=tmp_path / "audit", progress=False)
    d, row = comparison.duplicates, comparison.rows[0]
    assert d["twinned"] >= 0.75 * len(copies) and d["scored"] == len(comparison.y_scored)
    ids = comparison.stores[0].ids[comparison.usable][comparison.plan.scored]
    planted_copy = np.isin(ids, [c for c, _, _ in copies])
    correct = comparison.predictions[(row["representation"], row["head"])] == comparison.y_scored
    assert correct[planted_copy].mean() > correct[~planted_copy].mean()  # the twins are the easy rows
    assert row["accuracy_without_twins"] < row["accuracy"]
    assert abs(row["accuracy_without_twins"] - correct[~planted_copy].mean()) < 0.02
    result = invoke(runner, ["compare-heads", store, "--heads", "knn", "--exclude-duplicates", tmp_path / "audit",
                             "--out", tmp_path / "results", "-q"])
    assert result.exit_code == 0 and "without" in result.output, result.output
    assert "## Near-duplicates" in (tmp_path / "results" / "report.md").read_text()
    assert_one_line_error(invoke(runner, ["compare-heads", store, "--exclude-duplicates", tmp_path / "nowhere"]),
                          "run `python cli.py audit")


def _digits_with_twins(path, twins: int):
    """scikit-learn's digits as a store (pixels as features), `twins` of its test rows replaced by exact copies
    of train rows (same features, same label)."""
    from sklearn.datasets import load_digits

    from featurize.store import StoreWriter

    X, y = load_digits(return_X_y=True)
    X, y = X.astype(np.float32), y.copy()
    split = np.where(np.arange(len(y)) % 5 == 0, "test", "train")
    test, train = np.flatnonzero(split == "test"), np.flatnonzero(split == "train")
    X[test[:twins]], y[test[:twins]] = X[train[:twins]], y[train[:twins]]
    writer = StoreWriter(path, {"digits-with-twins": twins}, len(y), X.shape[1], dtype="float32")
    writer.add(np.arange(len(y)), X, [""] * len(y))
    return writer.finalize([f"digit-{i:04d}" for i in range(len(y))], y.tolist(), split.tolist(),
                           [str(c) for c in range(10)], {"backbone": "pixels", "source": "builtin:digits"})


def test_compare_heads_warns_when_test_rows_have_a_feature_twin_in_train(tmp_path, runner):
    checks = {}
    for twins in (0, 20):  # 20 of the 360 test rows replaced by copies of train rows (5.6 %)
        store = _digits_with_twins(tmp_path / f"twins{twins}.h5", twins=twins)
        result = invoke(runner, ["compare-heads", store, "--heads", "knn", "--out", tmp_path / f"r{twins}", "-q"])
        assert result.exit_code == 0, result.output
        checks[twins] = json.loads((tmp_path / f"r{twins}" / "results.json").read_text())["meta"]["twin_check"]
        warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert len(warning) == checks[twins]["warn"] == (twins > 0), result.output
        assert "## Near-duplicates" in (tmp_path / f"r{twins}" / "report.md").read_text() or twins == 0
    assert checks[20]["twinned"] >= 20 and checks[0]["twinned"] <= 3 and checks[20]["scored"] == 360, checks
    assert "--exclude-duplicates" in warning[0]


@pytest.fixture(scope="module")
def audit_page(planted, tmp_path_factory):
    from pipelines.auditing import audit

    store, _ = planted
    out = tmp_path_factory.mktemp("audit-html")
    audit(store, out, sample=40, progress=False)
    return out / "audit.html"


def test_audit_html_holds_its_pictures_and_counts(audit_page):
    import re

    from test_report_html import assert_self_contained

    html = audit_page.read_text()
    summary = json.loads((audit_page.parent / "audit.json").read_text())
    assert_self_contained(html)
    pictures = re.findall(r'<img src="data:image/(?:png|jpeg);base64,', html)
    shown = min(summary["duplicates"]["pairs"], 30)
    assert shown > 0 and len(pictures) >= 2 * shown  # both images of every pair shown, then issues and outliers
    for part in ("Counts per split", "Counts per class", "Near-duplicates", "Label issues", "Outliers",
                 f"{summary['duplicates']['cross_split']} of them across splits"):
        assert part in html, part
    assert {c["name"] for c in summary["counts"]["classes"]} == {"face", "other"}
    assert sum(c["rows"] for c in summary["counts"]["splits"]) == summary["rows"]


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("width", [1280, 390])  # desktop, and a phone
def test_audit_html_renders_and_nothing_on_it_overlaps(audit_page, tmp_path, width):
    from test_report_html import assert_renders_without_overlaps

    assert_renders_without_overlaps(audit_page, tmp_path, width, min_texts=50)
