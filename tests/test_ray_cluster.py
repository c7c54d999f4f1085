"""A two-node Ray cluster on this machine (`ray start --head` on loopback plus a second `ray start --address`
node, one CPU each): a cluster run whose driver is killed resumes on the cluster; during that resumed run the
second node is killed (SIGKILL to its process group: raylet and object store; its workers exit with their
raylet), its shards are redone on the surviving node, and the store equals a local run's. Then a cluster run
killed again resumes locally, without Ray."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from featurize.store import partial_dir, read_store

from conftest import ROOT, assert_one_line_error, assert_same_store, invoke

RAY = str(Path(sys.executable).with_name("ray"))
SHARD = 64  # builtin:digits: 1 797 rows, 29 shards
EXTRACT = ["extract", "builtin:digits", "--model", "test_resnet", "--weights", "random", "--precision", "fp32",
           "--image-size", "160", "--shard-size", str(SHARD), "-q"]
# The cluster's processes get RAY_AUTH_MODE=token and a token of this test's own; the commands get only the
# token's path, as a user's environment would have it, and must authenticate with it.
ENV = {k: v for k, v in os.environ.items() if k not in ("HEADBENCH_FAULT", "RAY_AUTH_MODE")}
ENV["RAY_USAGE_STATS_ENABLED"] = "0"


TOKEN: Path | None = None  # the running test cluster's token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, fault=None, **popen):
    env = {**ENV, "HEADBENCH_FAULT": fault} if fault else ENV
    env = {**env, "RAY_AUTH_TOKEN_PATH": str(TOKEN)} if TOKEN else env
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _embedding_on(node) -> bool:
    """Whether an actor process under this node's raylet is running ``embed`` (Ray retitles its workers)."""
    try:
        workers = psutil.Process(node.pid).children(recursive=True)
        return any("_Extractor.embed" in " ".join(w.cmdline()) for w in workers)
    except psutil.Error:
        return False


def _committed(out: Path) -> int:
    try:
        return len(json.loads((partial_dir(out) / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


class Cluster:
    """Head and worker node, each `ray start --block` in its own process group, so one kill takes a whole node."""

    def __init__(self):
        global TOKEN
        self.temp = Path(tempfile.mkdtemp(prefix="hb-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
        TOKEN = self.temp / "auth_token"
        TOKEN.write_text(secrets.token_hex(32))
        self.env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(TOKEN)}
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(100 * 1024**2),
                  "--block"]
        self.head = self._start(["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--temp-dir", str(self.temp), *common], "head")
        self._wait_for_cpus(1)
        self.worker = self._start(["--address", self.address, *common], "worker")
        self._wait_for_cpus(2)

    def _start(self, args, name):
        log = open(self.temp / f"{name}.log", "w")
        return subprocess.Popen([RAY, "start", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _wait_for_cpus(self, cpus, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True,
                                    text=True, timeout=60)
            if re.search(rf"/{cpus}\.0 CPU", status.stdout):
                return
            time.sleep(1.0)
        raise RuntimeError(f"the test cluster did not reach {cpus} CPUs:\n{status.stdout}{status.stderr}")

    @staticmethod
    def kill(node):
        with_group = os.getpgid(node.pid)
        os.killpg(with_group, signal.SIGKILL)
        node.wait(timeout=30)

    def stop(self):
        for node in (self.worker, self.head):
            if node.poll() is None:
                self.kill(node)
        time.sleep(1.0)  # workers notice their raylet is gone and exit
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.h5"
    run = _cli(*EXTRACT, "--out", out)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    return read_store(out)


def test_an_unreachable_cluster_is_one_line(runner, tmp_path):
    result = invoke(runner, ["extract", "builtin:digits", "-m", "test_resnet", "--weights", "random", "--out",
                             tmp_path / "x.h5", "--ray", "127.0.0.1:1", "-q"])
    assert_one_line_error(result, "no Ray cluster answers at 127.0.0.1:1")


def _no_ray_processes(timeout: float = 30.0) -> bool:
    """Whether no raylet or GCS server runs on this machine (waiting a little for ones shutting down)."""
    deadline = time.monotonic() + timeout
    while True:
        names = []
        for p in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error):
                if p.info["name"] in ("raylet", "gcs_server"):
                    names.append(p.info["name"])
        if not names:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def test_a_bare_ray_flag_starts_a_local_runtime_and_stops_it(local_store, tmp_path):
    assert _no_ray_processes(), "a Ray cluster is already running on this machine"
    out = tmp_path / "bare.h5"
    run = _cli(*EXTRACT, "--out", out, "--ray")
    stdout, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert_same_store(out, local_store)
    assert re.fullmatch(r"ray: \d+ CPU actor\(s\) on cpu", read_store(out).attrs["device"])
    assert _no_ray_processes()  # the runtime it started was shut down with it


@pytest.mark.slow
def test_a_worker_node_killed_mid_run_still_ends_with_the_local_store(cluster, local_store, tmp_path):
    out = tmp_path / "cluster.h5"
    # 1. The driver dies (SIGKILL) right after committing shard 2 (shards finish in any order on a cluster:
    #    shard 2 and whichever others were done survive it; with two shards in flight per actor, shard 2 is the
    #    second actor's first and may well be the first one done).
    crashed = _cli(*EXTRACT, "--out", out, "--ray", cluster.address, fault="after-shard:2")
    _, err = crashed.communicate(timeout=600)
    assert crashed.returncode == -signal.SIGKILL, err
    survived = _committed(out)
    assert survived >= 1 and "2" in json.loads((partial_dir(out) / "manifest.json").read_text())["shards"]

    # 2. The same command resumes on the cluster; once it has committed a shard of its own and node 2's actor
    #    is embedding one, node 2 is killed.
    resumed = _cli(*EXTRACT, "--out", out, "--ray", cluster.address)
    deadline = time.monotonic() + 300
    while not (_committed(out) > survived and _embedding_on(cluster.worker)) and resumed.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resumed.poll() is None, "the run ended before the node could be killed mid-run"
    Cluster.kill(cluster.worker)
    stdout, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "lost a Ray worker" in err and "requeued on the 1 remaining" in err
    assert f"{survived * SHARD} resumed from an earlier run" in stdout
    assert_same_store(out, local_store)

    # 3. A cluster run killed again resumes without Ray, on this machine alone.
    again = tmp_path / "again.h5"
    crashed = _cli(*EXTRACT, "--out", again, "--ray", cluster.address, fault="after-shard:1")
    _, err = crashed.communicate(timeout=600)
    assert crashed.returncode == -signal.SIGKILL, err
    survived = _committed(again)
    local = _cli(*EXTRACT, "--out", again)
    stdout, err = local.communicate(timeout=600)
    assert local.returncode == 0, err
    assert f"{survived * SHARD} resumed from an earlier run" in stdout
    assert_same_store(again, local_store)
