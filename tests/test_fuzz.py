"""Fuzzing: manifests, folders and damaged stores give results or clean errors -- never anything else."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurize.errors import FeaturizeError
from featurize.sources import open_source
from featurize.store import StoreError, StoreWriter, read_store, verify_store

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "s.h5"
    rng = np.random.default_rng(0)
    writer = StoreWriter(path, {"fuzz": 1}, 40, 8, shard_size=16)
    writer.add(np.arange(40), rng.normal(size=(40, 8)).astype(np.float32), [""] * 39 + ["OSError: x"])
    writer.finalize([f"{i}.png" for i in range(40)], [i % 2 for i in range(40)], ["train"] * 30 + ["test"] * 10,
                    ["a", "b"], {"num_features": 8})
    return path.read_bytes()


csv_cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=6).map(
        lambda rows: "\n".join(",".join(r) for r in rows).encode("utf-8")),
    st.lists(st.tuples(csv_cells, st.sampled_from(["", "a", "b"]), st.sampled_from(["", "train", "test", "x"])),
             max_size=6).map(lambda rows: ("path,label,split\n" + "\n".join(",".join(r) for r in rows)).encode()),
))
def test_manifest_parsing_gives_a_source_or_a_clean_error(tmp_path, content):
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    try:
        source = open_source(path)
    except FeaturizeError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len(source) >= 1 and len({s.id for s in source.samples}) == len(source)
    assert all(-1 <= s.label < len(source.classes) for s in source.samples)


names = st.text(alphabet="abcXYZ._- ", min_size=1, max_size=8)


@FUZZ
@given(st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.binary(max_size=64)), max_size=8))
def test_folder_scanning_and_decoding_give_rows_or_clean_errors(files):
    from featurize.backbones import create_backbone
    from featurize.engine import _DecodeDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for parts, content in files:
            path = root.joinpath(*parts[:-1], parts[-1] + ".png")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            except OSError:  # a name clash between a file and a folder: that layout cannot exist
                continue
        try:
            source = open_source(root)
        except FeaturizeError as e:
            assert str(e) and "\n" not in str(e)
            return
        dataset = _DecodeDataset(source, _tiny_backbone(), jpeg_draft=True)
        for i in range(len(source)):
            index, _, error = dataset[i]  # random bytes: recorded as errors, never raised
            assert index == i and isinstance(error, str)


_BACKBONE = []


def _tiny_backbone():
    if not _BACKBONE:
        from featurize.backbones import create_backbone

        _BACKBONE.append(create_backbone("test_resnet", "random"))
    return _BACKBONE[0]


@FUZZ
@given(st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.integers(0, 10_000), st.integers(1, 64), st.integers(0, 255)),  # flip bytes at a position
    st.integers(0, 100_000),  # truncate at a length
))
def test_damaged_stores_read_and_verify_cleanly(tmp_path, valid_store, damage):
    path = tmp_path / "d.h5"
    if isinstance(damage, bytes):
        data = damage
    elif isinstance(damage, tuple):
        start, length, value = damage
        data = bytearray(valid_store)
        start = start % len(data)
        data[start : start + length] = bytes([value]) * len(data[start : start + length])
        data = bytes(data)
    else:
        data = valid_store[: damage % len(valid_store)]
    path.write_bytes(data)
    for check in (read_store, verify_store):
        try:
            check(path)
        except StoreError as e:
            assert str(e) and "\n" not in str(e)
