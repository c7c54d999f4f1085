"""Feature store: schema, round trip, plain-h5py readability, config hash, resume, refusal, validation."""

from __future__ import annotations

import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from featurize.store import (
    FORMAT_NAME,
    STATUS_FAILED,
    STATUS_OK,
    StoreError,
    StoreWriter,
    config_changes,
    config_hash,
    partial_dir,
    read_store,
)
from pipelines.extract import extract_features

DATASETS = {"features", "labels", "ids", "split", "status", "errors", "classes"}
CONFIG = {"backbone": "m", "weights": {"source": "random", "sha256": "ab"}, "dtype": "float16"}


def _write(path, features, errors, shard_size=3, config=CONFIG, dtype="float16"):
    n, d = features.shape
    writer = StoreWriter(path, config, n, d, dtype=dtype, shard_size=shard_size)
    writer.add(np.arange(n), features, errors)
    return writer.finalize(
        ids=[f"img{i}.png" for i in range(n)],
        labels=[i % 2 for i in range(n)],
        split=["train"] * (n - 2) + ["test"] * 2,
        classes=["a", "b"],
        attrs={"backbone": "m", "data_config": {"input_size": [3, 8, 8]}},
    )


def test_round_trip_schema_and_failed_rows(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    errors = ["", "", "OSError: broken", "", "", "", ""]
    feats[2] = np.nan
    path = _write(tmp_path / "s.h5", feats, errors)
    assert not partial_dir(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary files remain

    with h5py.File(path, "r") as f:  # plain h5py, no headbench
        assert set(f.keys()) == DATASETS
        assert f["features"].dtype == np.float16 and f["features"].chunks[1] == 5
        assert f.attrs["format"] == FORMAT_NAME
        assert list(f["ids"].asstr()[:2]) == ["img0.png", "img1.png"]
        assert h5py.check_enum_dtype(f["status"].dtype) == {"ok": 0, "failed": 1}

    store = read_store(path)
    assert store.shape == (7, 5)
    np.testing.assert_allclose(store.features[store.ok], feats[[0, 1, 3, 4, 5, 6]], rtol=1e-3, atol=1e-3)
    assert np.isnan(store.features[2]).all()
    assert list(store.status) == [STATUS_OK] * 2 + [STATUS_FAILED] + [STATUS_OK] * 4
    assert store.errors[2] == "OSError: broken" and store.errors[0] == ""
    assert list(store.labels) == [0, 1, 0, 1, 0, 1, 0]
    assert list(store.split[-2:]) == ["test", "test"]
    assert store.classes == ["a", "b"]
    assert store.config == CONFIG and store.attrs["config_hash"] == config_hash(CONFIG)
    assert store.attrs["data_config"] == {"input_size": [3, 8, 8]}
    assert store.attrs["num_failed"] == 1


def test_non_finite_features_become_failures(tmp_path):
    feats = np.ones((4, 3), np.float32)
    feats[1, 0] = 1e6  # overflows float16
    feats[3, 2] = np.inf
    store = read_store(_write(tmp_path / "s.h5", feats, [""] * 4))
    assert list(store.status) == [STATUS_OK, STATUS_FAILED, STATUS_OK, STATUS_FAILED]
    assert "non-finite" in store.errors[1]


def test_float32_dtype(tmp_path):
    feats = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    store = read_store(_write(tmp_path / "s.h5", feats, [""] * 4, dtype="float32"))
    assert store.features.dtype == np.float32
    np.testing.assert_array_equal(store.features, feats)


def test_config_hash_is_canonical():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "x": 2})
    assert config_changes(a, {**a, "y": {"a": [1, 2], "b": 3}}) == ["y.b"]


def test_existing_store_is_refused_without_overwrite(tmp_path):
    path = _write(tmp_path / "s.h5", np.ones((2, 2), np.float32), ["", ""])
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        StoreWriter(path, CONFIG, 2, 2)
    before = path.read_bytes()
    StoreWriter(path, CONFIG, 2, 2, overwrite=True)  # replaced only when the new store is finalized
    assert path.read_bytes() == before


def test_resume_from_committed_shards(tmp_path):
    path = tmp_path / "s.h5"
    feats = np.arange(20, dtype=np.float32).reshape(10, 2)
    writer = StoreWriter(path, CONFIG, 10, 2, shard_size=4)
    writer.add(np.arange(6), feats[:6], [""] * 6)  # shard 0 complete; shard 1 half done, then "crash"
    writer.abandon()  # as on an error: complete shards committed, lock released
    assert sorted(writer.committed) == [0]
    assert writer.bytes_written > 0 and writer.write_seconds > 0

    resumed = StoreWriter(path, CONFIG, 10, 2, shard_size=3)  # the manifest's shard size wins
    assert resumed.shard_size == 4 and resumed.resumed_rows == 4
    assert resumed.pending_indices() == list(range(4, 10))
    resumed.add(np.arange(4, 10), feats[4:], [""] * 6)
    resumed.finalize([str(i) for i in range(10)], [0] * 10, [""] * 10, ["a"], {})
    np.testing.assert_array_equal(read_store(path).features, feats)


def test_resume_keeps_the_failed_rows_of_committed_shards(tmp_path):
    path = tmp_path / "s.h5"
    feats = np.arange(20, dtype=np.float32).reshape(10, 2)
    errors = [""] * 10
    errors[1], errors[6] = "OSError: broken", "ValueError: bad"
    writer = StoreWriter(path, CONFIG, 10, 2, shard_size=4)
    writer.add(np.arange(5), feats[:5], errors[:5])  # shard 0 (with row 1 failed) committed
    writer.abandon()
    names = sorted(p.name for p in partial_dir(path).iterdir())
    assert names == [".lock", "errors-000000.json", "manifest.json", "store.h5.tmp"]  # rows in place: no shard copies

    resumed = StoreWriter(path, CONFIG, 10, 2)
    assert resumed.resumed_rows == 4 and resumed.failed_rows == 1
    resumed.add(np.arange(4, 10), feats[4:], errors[4:])
    resumed.finalize([str(i) for i in range(10)], [0] * 10, [""] * 10, ["a"], {})
    store = read_store(path)
    assert list(store.errors) == errors and resumed.num_failed == 2
    assert list(np.flatnonzero(store.status == STATUS_FAILED)) == [1, 6]
    ok = store.status == STATUS_OK
    np.testing.assert_array_equal(store.features[ok], feats[ok])
    assert np.isnan(store.features[~ok]).all()


@pytest.mark.parametrize("damage", ["remove", "garbage", "errors-file"])
def test_a_run_whose_files_are_missing_or_damaged_does_those_shards_again(tmp_path, damage):
    path = tmp_path / "s.h5"
    feats = np.arange(20, dtype=np.float32).reshape(10, 2)
    errors = ["OSError: broken"] + [""] * 9
    writer = StoreWriter(path, CONFIG, 10, 2, shard_size=4)
    writer.add(np.arange(8), feats[:8], errors[:8])
    writer.abandon()
    partial = partial_dir(path)
    if damage == "remove":
        (partial / "store.h5.tmp").unlink()
    elif damage == "garbage":
        (partial / "store.h5.tmp").write_bytes(b"garbage" * 100)
    else:
        (partial / "errors-000000.json").unlink()  # shard 0 had a failed row: without its reasons it is redone
    resumed = StoreWriter(path, CONFIG, 10, 2, shard_size=4)
    assert resumed.pending_indices() == (list(range(4)) + [8, 9] if damage == "errors-file" else list(range(10)))
    rows = resumed.pending_indices()
    resumed.add(np.array(rows), feats[rows], [errors[i] for i in rows])
    resumed.finalize([str(i) for i in range(10)], [0] * 10, [""] * 10, ["a"], {})
    store = read_store(path)
    assert list(store.errors) == errors
    np.testing.assert_array_equal(store.features[1:], feats[1:])


def test_an_unfinished_run_of_an_earlier_layout_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter(path, CONFIG, 4, 2).abandon()
    manifest = partial_dir(path) / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["layout"]  # written by a version that kept shard-K.npz files
    manifest.write_text(json.dumps(old))
    with pytest.raises(StoreError, match="earlier version of headbench.*--overwrite"):
        StoreWriter(path, CONFIG, 4, 2)
    StoreWriter(path, CONFIG, 4, 2, overwrite=True).abandon()


def test_resume_with_other_config_is_refused_naming_the_change(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, CONFIG, 10, 2, shard_size=4)
    writer.add(np.arange(4), np.ones((4, 2), np.float32), [""] * 4)
    writer.abandon()
    other = {**CONFIG, "weights": {"source": "random", "sha256": "cd"}}
    with pytest.raises(StoreError, match=r"other settings \(changed: weights.sha256\).*--overwrite"):
        StoreWriter(path, other, 10, 2)
    fresh = StoreWriter(path, other, 10, 2, overwrite=True)
    assert fresh.pending_indices() == list(range(10))


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    path = tmp_path / "s.h5"
    first = StoreWriter(path, CONFIG, 4, 2)
    with pytest.raises(StoreError, match="another extract is writing .* right now"):
        StoreWriter(path, CONFIG, 4, 2)
    with pytest.raises(StoreError, match="another extract is writing"):
        StoreWriter(path, CONFIG, 4, 2, overwrite=True)  # --overwrite does not break someone else's lock
    first.add(np.arange(4), np.ones((4, 2), np.float32), [""] * 4)
    first.finalize(list("abcd"), [0] * 4, [""] * 4, ["a"], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # lock and shards gone with the partial folder


def test_shard_write_failure_is_reported(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, CONFIG, 8, 2, shard_size=4)
    shutil.rmtree(partial_dir(path))  # the shard folder vanishes under the writer
    writer.add(np.arange(4), np.ones((4, 2), np.float32), [""] * 4)
    with pytest.raises(StoreError, match="writing shards to .* failed"):
        writer.close()
    assert not path.exists()


def test_chunks_are_whole_within_shards(tmp_path):
    path = _write(tmp_path / "s.h5", np.ones((40, 3), np.float32), [""] * 40, shard_size=12)
    with h5py.File(path, "r") as f:
        assert 12 % f["features"].chunks[0] == 0


def test_damaged_manifest_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter(path, CONFIG, 4, 2).abandon()
    (partial_dir(path) / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest is missing or damaged"):
        StoreWriter(path, CONFIG, 4, 2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"garbage" * 100), "not a readable HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a headbench feature store"),
    ],
)
def test_read_store_errors(tmp_path, make, message):
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(StoreError, match=message):
        read_store(path)


def test_read_store_refuses_other_versions_and_missing_datasets(tmp_path):
    path = _write(tmp_path / "s.h5", np.ones((2, 2), np.float32), ["", ""])
    copy = tmp_path / "v2.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        read_store(copy)
    with h5py.File(path, "a") as f:
        del f["errors"]
    with pytest.raises(StoreError, match="missing dataset"):
        read_store(path)


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) is not installed")
def test_h5dump_lists_the_datasets(tmp_path):
    path = _write(tmp_path / "s.h5", np.ones((3, 2), np.float32), ["", "", ""])
    header = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, check=True).stdout
    for name in DATASETS:
        assert f'DATASET "{name}"' in header


def _extract(source, out, **kwargs):
    options = dict(model="test_resnet", weights="random", precision="fp32", workers=0, progress=False)
    return extract_features(source, out, **{**options, **kwargs})


def test_config_hash_ignores_batch_size_and_workers_but_not_what_changes_features(photo_folder, tmp_path):
    def hash_of(name, **kwargs):
        return _extract(photo_folder, tmp_path / f"{name}.h5", **kwargs).config_hash

    base = hash_of("base", batch_size=2)
    assert hash_of("batch", batch_size=5, workers=1) == base
    assert hash_of("model", model="test_efficientnet") != base
    assert hash_of("size", image_size=96) != base
    assert hash_of("dtype", dtype="float32") != base
    assert hash_of("precision", precision="bf16") != base
    weights = tmp_path / "w.safetensors"
    from featurize.backbones import create_backbone
    from safetensors.torch import save_file

    model = create_backbone("test_resnet", "random", keep_classifier=True).model
    save_file({k: v + 0.01 for k, v in model.state_dict().items()}, str(weights))
    assert hash_of("weights", weights=str(weights)) != base


def test_extract_store_matches_source(photo_folder, tmp_path):
    result = _extract(photo_folder, tmp_path / "p.h5")
    store = read_store(result.path)
    assert store.shape == (7, 96) and store.ok.all()
    assert store.classes == ["cat", "coffee", "space"]
    assert list(store.ids)[:2] == ["cat/cat.png", "cat/chelsea.jpg"]
    assert store.attrs["weights_source"] == "random" and len(store.attrs["weights_sha256"]) == 64
    for key in ("backbone", "data_config", "pooling", "precision", "dtype", "library_versions",
                "dataset_fingerprint", "created", "config_hash"):
        assert key in store.attrs, key
    assert json.loads(json.dumps(store.attrs["library_versions"]))["timm"]
