"""Ray, on a small local runtime (num_cpus=2): a Ray extraction equals a local one (failure ledger included),
a run interrupted locally resumes on Ray, an actor killed mid-run is replaced and its shards redone, and
compare-heads gives the local leaderboard through joblib's Ray backend. The two-node cluster with a node
killed mid-run is in test_ray_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray

from featurize.store import read_store
from pipelines.cluster import ClusterError, RayExtractPool, group_shards
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, assert_same_store, invoke, photo, write_image

SHARD = 4
OPTIONS = dict(model="test_resnet", weights="random", precision="fp32", shard_size=SHARD, batch_size=2,
               max_failures=1)
POOL_OPTIONS = {"weights": "random", "image_size": None, "device": "cpu", "precision": "fp32", "batch_size": 2,
                "workers": None, "streams": None, "jpeg_draft": True, "compile": False}


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 real photo crops in 2 classes, plus one truncated JPEG (a failed row with its reason)."""
    root = tmp_path_factory.mktemp("ray-src")
    for i, name in enumerate(["chelsea", "coffee"] * 7):
        img = photo(name)
        write_image(root / name / f"{i:02d}.png", img[i * 10 : i * 10 + 96, i * 12 : i * 12 + 128])
    (root / "coffee" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def local_store(folder, tmp_path_factory):
    return read_store(extract_features(str(folder), tmp_path_factory.mktemp("local") / "local.h5", progress=False,
                                       **OPTIONS).path)


def test_a_ray_extraction_equals_the_local_one(ray_runtime, folder, local_store, tmp_path):
    result = extract_features(str(folder), tmp_path / "ray.h5", ray="local", progress=False, **OPTIONS)
    store = assert_same_store(result.path, local_store)
    assert result.num_failed == 1 and store.ids[store.status == 1][0] == "coffee/zz-broken.jpg"
    assert store.attrs["device"] == "ray: 2 CPU actor(s) on cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray.h5"]  # shards committed and cleaned up as locally
    assert _cpus_freed(ray_runtime)  # the actors were stopped: the cluster has its CPUs back


def test_a_parquet_source_with_its_options_on_ray_equals_the_local_run(ray_runtime, folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featurize.sources import open_source

    src = open_source(folder)
    pq.write_table(pa.table({"picture": [src.read_bytes(s.index) for s in src.samples],
                             "name": [s.id for s in src.samples],
                             "label": [src.classes[s.label] for s in src.samples]}), tmp_path / "d.parquet",
                   row_group_size=5)
    options = {"image_column": "picture", "id_column": "name"}  # travel to the actors with the source
    local = extract_features(str(tmp_path / "d.parquet"), tmp_path / "local.h5", progress=False,
                             source_options=options, **OPTIONS)
    on_ray = extract_features(str(tmp_path / "d.parquet"), tmp_path / "ray.h5", ray="local", progress=False,
                              source_options=options, **OPTIONS)
    store = assert_same_store(on_ray.path, read_store(local.path))
    assert list(store.ids) == [s.id for s in src.samples] and on_ray.num_failed == 1


def test_a_ray_extraction_with_layers_and_crop_pct_equals_the_local_one(ray_runtime, folder, tmp_path):
    from featurize.store import read_features

    options = {**OPTIONS, "layers": "stages", "crop_pct": 1.0}
    local = read_store(extract_features(str(folder), tmp_path / "local.h5", progress=False, **options).path)
    result = extract_features(str(folder), tmp_path / "ray.h5", ray="local", progress=False, **options)
    store = assert_same_store(result.path, local)
    assert store.layer_names == local.layer_names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert store.attrs["data_config"]["crop_pct"] == 1.0
    for name in store.layer_names:
        np.testing.assert_allclose(read_features(store, name).astype(np.float32),
                                   read_features(local, name).astype(np.float32), rtol=1e-3, atol=1e-3)


def _cpus_freed(runtime, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while runtime.available_resources().get("CPU", 0) < 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_run_interrupted_locally_resumes_on_ray(ray_runtime, folder, local_store, tmp_path):
    out = tmp_path / "resumed.h5"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(folder), "--model", "test_resnet", "--weights",
           "random", "--precision", "fp32", "--shard-size", str(SHARD), "--batch-size", "2", "--max-failures", "1", "--out", str(out), "-q"]
    killed = subprocess.run(cmd, env={**os.environ, "HEADBENCH_FAULT": "after-shard:1"}, cwd=ROOT, timeout=300,
                            capture_output=True)
    assert killed.returncode == -9
    result = extract_features(str(folder), out, ray="local", progress=False, **OPTIONS)
    assert result.resumed_rows == 2 * SHARD
    assert_same_store(out, local_store)


def test_an_actor_killed_mid_run_is_replaced_and_its_shards_redone(ray_runtime, folder, local_store):
    lines = []
    pool = RayExtractPool(str(folder), "test_resnet", POOL_OPTIONS, report=lines.append)
    try:
        n = len(local_store.ids)
        shards = [range(i, i + 1) for i in range(n)]  # work left for the killed actor whatever the timing
        seen = []
        for batch in pool.batches(shards, "float16"):
            if not seen:
                ray_runtime.kill(pool.working[0], no_restart=True)
            seen.append(batch)
        assert pool.lost_actors == 1 and len(lines) == 1 and "requeued" in lines[0]
    finally:
        pool.shutdown()
    indices = np.concatenate([b.indices for b in seen])
    assert sorted(indices.tolist()) == list(range(n))  # every row exactly once, none lost, none twice
    features = np.concatenate([b.features for b in seen])[np.argsort(indices)].astype(np.float32)
    ok = local_store.status == 0
    np.testing.assert_allclose(features[ok], local_store.features[ok].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_several_shards_per_call_give_the_same_rows(ray_runtime, folder, local_store):
    pool = RayExtractPool(str(folder), "test_resnet", POOL_OPTIONS)
    pool.rows_per_call = 3 * SHARD  # what GPU actors do, with GPU_ROWS_PER_CALL
    try:
        n = len(local_store.ids)
        batches = list(pool.batches([range(s, min(s + SHARD, n)) for s in range(0, n, SHARD)], "float16"))
    finally:
        pool.shutdown()
    assert [len(b.indices) for b in batches if len(b.indices) == 3 * SHARD]  # shards did travel together
    indices = np.concatenate([b.indices for b in batches])
    assert sorted(indices.tolist()) == list(range(n))
    features = np.concatenate([b.features for b in batches])[np.argsort(indices)].astype(np.float32)
    ok = local_store.status == 0
    np.testing.assert_allclose(features[ok], local_store.features[ok].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_group_shards():
    shards = [range(0, 4), range(4, 8), range(12, 16), range(16, 18)]  # a hole where a shard was committed
    assert group_shards(shards, 1) == [(s,) for s in shards]
    assert group_shards(shards, 8) == [(range(0, 4), range(4, 8)), (range(12, 16), range(16, 18))]
    assert group_shards(shards, 100) == [tuple(shards)]
    assert group_shards([], 8) == []


def test_workers_that_would_compute_different_features_are_refused():
    pool = object.__new__(RayExtractPool)
    pool.actors = []
    same = {"backbone": "test_resnet", "weights": {"sha256": "a"}, "data_config": {}, "pooling": "avg",
            "num_features": 8, "layers": [], "precision": "fp32", "runtime": "torch", "decoder": "pillow",
            "dataset": {"fingerprint": "f"}, "device": "cpu"}
    pool._reference = {**same, "node": "10.0.0.1"}
    assert pool._check({**same, "node": "10.0.0.9", "device": "cuda"})["node"] == "10.0.0.9"
    with pytest.raises(ClusterError, match="nodes 10.0.0.1 and 10.0.0.2 .* differ in weights, dataset"):
        pool._check({**same, "weights": {"sha256": "b"}, "dataset": {"fingerprint": "g"}, "node": "10.0.0.2"})
    with pytest.raises(ClusterError, match="nodes 10.0.0.1 and 10.0.0.4 .* differ in runtime"):
        pool._check({**same, "runtime": "openvino", "node": "10.0.0.4"})  # one node without OpenVINO installed
    with pytest.raises(ClusterError, match="nodes 10.0.0.1 and 10.0.0.5 .* differ in decoder"):
        pool._check({**same, "decoder": "tensor", "node": "10.0.0.5"})  # a GPU node decoding with nvJPEG
    with pytest.raises(ClusterError, match="on node 10.0.0.3 could not start: FeaturizeError: source x does not"):
        pool._check({"node": "10.0.0.3", "error": "FeaturizeError: source x does not exist"})


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from pipelines.bench_heads import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("heads") / "synthetic.h5", n=400, d=24, classes=4)


def test_compare_heads_on_ray_gives_the_local_leaderboard(ray_runtime, runner, small_store, tmp_path):
    rows = {}
    for name, extra in [("local", []), ("ray", ["--ray"])]:
        result = invoke(runner, ["compare-heads", small_store, "--heads", "logreg,knn,rbf-svm", "--bootstrap", "200",
                                 "--out", tmp_path / name, "-q", *extra])
        assert result.exit_code == 0, result.output
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["meta"]["parallel"] == {"local": "loky", "ray": "ray"}[name] + ", 2 parallel fits"
        rows[name] = results["rows"]
    keys = ("head", "rank", "accuracy", "balanced_accuracy", "macro_f1", "params", "p_value_vs_best", "accuracy_ci")
    assert [{k: r[k] for k in keys} for r in rows["ray"]] == [{k: r[k] for k in keys} for r in rows["local"]]


@pytest.mark.parametrize("command", ["extract", "compare-heads"])
def test_ray_not_installed_is_one_line_saying_how_to_install_it(runner, monkeypatch, small_store, tmp_path, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = (["extract", "builtin:digits", "-m", "test_resnet", "--weights", "random", "--out", tmp_path / "x.h5"]
            if command == "extract" else ["compare-heads", small_store])
    result = invoke(runner, [*args, "--ray", "-q"])
    assert_one_line_error(result, "--ray needs Ray, which is not installed here; install it with: pip install "
                                  "'headbench[ray]'")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("args", [["extract", "--ray", "builtin:digits", "-m", "test_resnet", "--out", "x.h5"],
                                  ["compare-heads", "--ray", "store.h5"]])
def test_a_bare_ray_flag_before_an_argument_is_not_taken_for_an_address(runner, args):
    result = invoke(runner, args)
    assert_one_line_error(result, f"--ray {args[2]}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto); a bare "
                                  "--ray must come after the arguments")
