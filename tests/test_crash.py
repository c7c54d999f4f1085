"""Hostile tests: SIGKILL an extraction at chosen points and at a random time; the rerun must equal a clean run.

Each run is the real CLI in its own process group; a kill point is chosen with the HEADBENCH_FAULT hook
(featurize/store.py), which SIGKILLs the process there, so nothing gets a chance to clean up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from featurize.store import partial_dir, read_store

from conftest import ROOT, assert_same_store, photo, write_image

N_IMAGES, SHARD = 240, 40  # 6 shards


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-src")
    rng = np.random.default_rng(0)
    sources = {"cat": photo("chelsea"), "coffee": photo("coffee"), "space": photo("astronaut")}
    for i in range(N_IMAGES):
        cls = list(sources)[i % 3]
        img = sources[cls]
        y, x = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
        write_image(root / cls / f"{i:04d}.png", img[y : y + 64, x : x + 64])
    return root


def _cmd(source, out):
    return [sys.executable, str(ROOT / "cli.py"), "extract", str(source), "--model", "test_resnet", "--weights",
            "random", "--precision", "fp32", "--runtime", "torch", "--out", str(out), "--shard-size", str(SHARD),
            "--batch-size", "16", "--workers", "0", "-q"]


def _run(source, out, fault=None):
    env = {**os.environ, "HEADBENCH_FAULT": fault} if fault else {k: v for k, v in os.environ.items()
                                                                    if k != "HEADBENCH_FAULT"}
    return subprocess.run(_cmd(source, out), env=env, capture_output=True, text=True, cwd=ROOT,
                          start_new_session=True, timeout=300)


@pytest.fixture(scope="module")
def reference(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    started = time.perf_counter()
    result = _run(image_dir, out)
    assert result.returncode == 0, result.stderr
    return read_store(out), time.perf_counter() - started


def _assert_same_store(path, reference_store):
    assert_same_store(path, reference_store)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files, no lock, no shards


@pytest.mark.parametrize(
    "fault, committed_before",
    [
        ("after-rows:100", 2),  # mid-batch: 2 shards committed, the third half-filled
        ("mid-commit:3", 3),  # shard 3's rows written and fsynced, not yet recorded
        ("after-shard:4", 5),  # right after shard 4 was recorded
        ("mid-finalize", 6),  # every shard committed; the final store written to a temp file, not renamed
    ],
)
def test_kill_at_a_point_then_resume_equals_a_clean_run(image_dir, reference, tmp_path, fault, committed_before):
    out = tmp_path / "s.h5"
    killed = _run(image_dir, out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # the store never exists half-written
    manifest = (partial_dir(out) / "manifest.json").read_text()
    assert manifest.count('"rows"') == committed_before

    resumed = _run(image_dir, out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed_before * SHARD} resumed from an earlier run" in resumed.stdout
    _assert_same_store(out, reference[0])


def test_kill_at_a_random_time_then_resume(image_dir, reference, tmp_path):
    out = tmp_path / "s.h5"
    delay = float(np.random.default_rng(int(time.time())).uniform(0.3, 0.95)) * reference[1]
    proc = subprocess.Popen(_cmd(image_dir, out), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if k != "HEADBENCH_FAULT"})
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group
    except ProcessLookupError:
        pass  # it finished first: the store must then simply be complete
    proc.communicate(timeout=60)
    rerun = _run(image_dir, out)
    if out.exists() and "already exists" in rerun.stderr:
        # it finished (or was killed between the final rename and the clean-up): nothing to resume,
        # and the rerun removed any partial folder the finished run left behind
        assert rerun.returncode == 1
    else:
        assert rerun.returncode == 0, f"killed after {delay:.2f}s; {rerun.stderr}"
    _assert_same_store(out, reference[0])


def test_a_kill_after_the_final_rename_leaves_a_complete_store(image_dir, reference, tmp_path):
    out = tmp_path / "s.h5"
    shutil.copy(reference[0].path, out)  # a finished run's store, as the CLI wrote it
    # what a kill between the final rename and the clean-up leaves: the store plus its partial folder
    partial_dir(out).mkdir()
    (partial_dir(out) / "manifest.json").write_text(f'{{"config_hash": "{reference[0].attrs["config_hash"]}"}}')
    rerun = _run(image_dir, out)
    assert rerun.returncode == 1 and "already exists; pass --overwrite" in rerun.stderr
    _assert_same_store(out, reference[0])


def test_changed_settings_are_refused_on_resume(image_dir, tmp_path):
    out = tmp_path / "s.h5"
    assert _run(image_dir, out, "after-shard:1").returncode == -signal.SIGKILL
    cmd = _cmd(image_dir, out) + ["--dtype", "float32"]  # (a storage change: the --overwrite run stays fast)
    changed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert changed.returncode == 1
    assert "other settings (changed: dtype)" in changed.stderr and "--overwrite" in changed.stderr
    assert "Traceback" not in changed.stderr
    again = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "resumed" not in again.stdout
