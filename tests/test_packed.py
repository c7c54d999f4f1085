"""Tar shards and Parquet / Arrow tables as sources: the same samples, labels, splits and features as the image
folder they were built from; their options and failures; kill -9 and resume on tar shards."""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurize.errors import FeaturizeError
from featurize.sources import open_source
from featurize.store import read_store
from pipelines.extract import extract_features

from conftest import ROOT, TINY, assert_one_line_error, assert_same_store, invoke, photo, write_image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def folder_to_shards(folder, out: Path, per_shard: int = 4, label_key: str | None = None) -> list[str]:
    """webdataset shards out/<split>/<n>.tar from an image folder, in the folder's order; keys are the ids
    with '/' and '.' replaced. Returns the keys' shard ids in order."""
    src = open_source(folder)
    ids, by_split = [], {}
    for s in src.samples:
        by_split.setdefault(s.split, []).append(s)
    for split, samples in by_split.items():
        for n in range(0, len(samples), per_shard):
            shard = out / split / f"{n // per_shard:06d}.tar"
            shard.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(shard, "w") as tar:
                for s in samples[n:n + per_shard]:
                    key = s.id.replace("/", "_").replace(".", "_")
                    ext = s.id.rsplit(".", 1)[1].lower()
                    _add(tar, f"{key}.{ext}", src.read_bytes(s.index))
                    if label_key:
                        _add(tar, f"{key}.json", json.dumps({label_key: src.classes[s.label]}).encode())
                    else:
                        _add(tar, f"{key}.cls", str(s.label).encode())
                    ids.append(f"{split}/{n // per_shard:06d}/{key}")
    return ids


def folder_to_table(folder) -> pa.Table:
    src = open_source(folder)
    return pa.table({
        "image": [{"bytes": src.read_bytes(s.index), "path": s.id} for s in src.samples],
        "label": [src.classes[s.label] for s in src.samples],
        "split": [s.split for s in src.samples],
        "id": [s.id for s in src.samples],
    })


def folder_to_hf_saved(folder, out: Path) -> None:
    """A Hugging Face DatasetDict save_to_disk layout: out/<split>/data-00000-of-00001.arrow (Arrow stream),
    state.json, and ClassLabel names in the schema's metadata; labels are class indices."""
    src = open_source(folder)
    features = {"image": {"_type": "Image"}, "label": {"names": src.classes, "_type": "ClassLabel"}}
    splits = sorted({s.split for s in src.samples})
    for split in splits:
        rows = [s for s in src.samples if s.split == split]
        table = pa.table({"image": [{"bytes": src.read_bytes(s.index), "path": None} for s in rows],
                          "label": pa.array([s.label for s in rows], pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        (out / split).mkdir(parents=True)
        with pa.OSFile(str(out / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=2)  # several record batches
        (out / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (out / "dataset_dict.json").write_text(json.dumps({"splits": splits}))


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def folder_store(split_folder, tmp_path_factory):
    return read_store(extract_features(split_folder, tmp_path_factory.mktemp("f") / "folder.h5", **TINY).path)


def _same_samples(store, folder_store, ids=None, by_name=True):
    """Same labels (as class names, or as indices), splits and features as the folder's store, row for row."""
    names = (lambda s: [s.classes[i] for i in s.labels]) if by_name else (lambda s: list(s.labels))  # noqa: E731
    assert names(store) == names(folder_store)
    assert list(store.split) == list(folder_store.split)
    if ids is not None:
        assert list(store.ids) == ids
    assert _cosine(store.features, folder_store.features).min() >= 0.9999


def test_tar_shards_equal_the_folder(split_folder, folder_store, tmp_path):
    ids = folder_to_shards(split_folder, tmp_path / "shards", per_shard=2)
    for spec in (tmp_path / "shards", f"{tmp_path}/shards/{{test/000000,train/{{000000..000002}}}}.tar"):
        store = read_store(extract_features(spec, tmp_path / "s.h5", overwrite=True, **TINY).path)
        _same_samples(store, folder_store, ids, by_name=False)
        assert store.classes == ["0", "1", "2"]  # .cls holds indices: their names are the numbers
    # labels by name from the .json, with --label-key
    folder_to_shards(split_folder, tmp_path / "named", per_shard=3, label_key="species")
    store = read_store(extract_features(tmp_path / "named", tmp_path / "n.h5", source_options={"label_key": "species"},
                                        **TINY).path)
    _same_samples(store, folder_store)
    assert store.classes == folder_store.classes


def test_parquet_and_hf_folder_equal_the_folder(split_folder, folder_store, tmp_path):
    pq.write_table(folder_to_table(split_folder), tmp_path / "data.parquet", row_group_size=3)
    store = read_store(extract_features(tmp_path / "data.parquet", tmp_path / "p.h5", **TINY,
                                        source_options={"split_column": "split", "id_column": "id"}).path)
    _same_samples(store, folder_store, list(folder_store.ids))  # --id-column: the folder's own ids
    assert store.classes == folder_store.classes

    folder_to_hf_saved(split_folder, tmp_path / "hf")
    store = read_store(extract_features(tmp_path / "hf", tmp_path / "hf.h5", **TINY).path)
    # ClassLabel names from the saved features; splits from the split folders (test before train there too)
    assert store.classes == folder_store.classes
    _same_samples(store, folder_store)
    assert list(store.ids[:2]) == ["test/data-00000-of-00001/0", "test/data-00000-of-00001/1"]


def test_parquet_options_and_file_name_splits(split_folder, tmp_path):
    table = folder_to_table(split_folder)
    (tmp_path / "d").mkdir()
    train = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "train"]
    pq.write_table(table.take(train).drop_columns(["split"]).rename_columns(["picture", "label", "id"]),
                   tmp_path / "d" / "train-00000-of-00001.parquet")
    src = open_source(tmp_path / "d")  # the only bytes column is the image column; the split from the file name
    assert src.image_column == "picture" and {s.split for s in src.samples} == {"train"}
    with pytest.raises(FeaturizeError, match="no column 'nope'"):
        open_source(tmp_path / "d", image_column="nope")
    with pytest.raises(FeaturizeError, match="holds string, not image bytes"):
        open_source(tmp_path / "d", image_column="id")
    with pytest.raises(FeaturizeError, match="is for parquet sources"):
        open_source(split_folder, image_column="image")
    with pytest.raises(FeaturizeError, match="is for tar sources"):
        open_source(tmp_path / "d", label_key="x")
    bad = table.set_column(2, "split", pa.array(["holdout"] * len(table)))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(FeaturizeError, match="'holdout'; use train, val"):
        open_source(tmp_path / "bad.parquet", split_column="split")
    # a {bytes: null, path} cell reads the file the path names
    paths = pa.table({"image": [{"bytes": None, "path": str(split_folder / i)} for i in table.column("id").to_pylist()]})
    pq.write_table(paths, tmp_path / "paths.parquet")
    src = open_source(tmp_path / "paths.parquet")
    assert src.read_bytes(0) == (split_folder / table.column("id")[0].as_py()).read_bytes()


def test_tar_failures_are_rows_or_one_line_errors(split_folder, tmp_path, runner):
    shards = tmp_path / "shards"
    folder_to_shards(split_folder, shards, per_shard=10)
    with tarfile.open(shards / "train" / "000000.tar", "a") as tar:  # a sample with a label but no image
        _add(tar, "orphan.cls", b"1")
    store = read_store(extract_features(shards, tmp_path / "s.h5", max_failures=1, **TINY).path)
    row = list(store.ids).index("train/000000/orphan")
    assert store.status[row] == 1 and "no image member" in store.errors[row]

    assert_one_line_error(invoke(runner, ["extract", f"{shards}/train/{{000000..000003}}.tar", "-m", "test_resnet",
                                          "--weights", "random", "-o", tmp_path / "x.h5"]), "3 of the 4 shards")
    packed = tmp_path / "gz" / "a.tar"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress((shards / "test" / "000000.tar").read_bytes()))
    assert_one_line_error(invoke(runner, ["extract", packed, "-m", "test_resnet", "--weights", "random",
                                          "-o", tmp_path / "y.h5"]), "is compressed")
    assert_one_line_error(invoke(runner, ["extract", split_folder, "-m", "test_resnet", "--weights", "random",
                                          "-o", tmp_path / "z.h5", "--label-key", "x"]), "--label-key is for tar")


SETTINGS = dict(model="test_resnet", weights="random", precision="fp32", runtime="torch", shard_size=16, batch_size=8,
                workers=0, progress=False)


def test_kill_and_resume_on_tar_shards_equals_a_clean_run(tmp_path):
    import os

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    sources = {"cat": photo("chelsea"), "coffee": photo("coffee")}
    for i in range(60):
        cls = list(sources)[i % 2]
        y, x = rng.integers(0, 200, size=2)
        write_image(folder / cls / f"{i:03d}.png", sources[cls][y:y + 48, x:x + 48])
    shards = tmp_path / "shards"
    folder_to_shards(folder, shards, per_shard=25)
    clean = extract_features(shards, tmp_path / "ref.h5", **SETTINGS)
    # the CLI with the same settings, SIGKILLed right after shard 1 is committed: 2 shards of 16 (a kill point
    # that counts buffered rows would race the background shard writer)
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(shards), "--model", "test_resnet", "--weights", "random",
           "--precision", "fp32", "--runtime", "torch", "--out", str(tmp_path / "s.h5"), "--shard-size", "16",
           "--batch-size", "8", "--workers", "0", "-q"]
    killed = subprocess.run(cmd, env={**os.environ, "HEADBENCH_FAULT": "after-shard:1"}, capture_output=True, text=True,
                            cwd=ROOT, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(FeaturizeError, match="changed: decode"):  # tensor decoding computes other pixels
        extract_features(shards, tmp_path / "s.h5", decode="tensor", **SETTINGS)
    resumed = extract_features(shards, tmp_path / "s.h5", **SETTINGS)
    assert resumed.resumed_rows == 32 and resumed.config_hash == clean.config_hash
    assert_same_store(tmp_path / "s.h5", read_store(clean.path))
