"""Ray: extraction spread over a cluster, and the joblib backend that runs compare-heads' fits on it.

Extraction runs as **Ray actors over the store's shards**. Each actor holds one frozen backbone (loaded once)
and opens the source itself (the images sit on storage every node sees); a task is one shard's row range
(on GPU actors, several shards: :data:`GPU_ROWS_PER_CALL` rows amortise starting the decode processes),
which the actor decodes and embeds with the same engine as a local run (CPU actors: one core each, decoding
inside the stream; GPU actors: one GPU each, a node's CPUs shared among its GPUs, decoding in DataLoader
processes beside the GPU). Features come back to the driver (2.5 KB per image in float16), which commits each
shard with the same :class:`featurize.store.StoreWriter` as a local run: temp file, atomic rename, manifest. One
writer means one manifest and no races; a crashed or preempted cluster run resumes from its committed shards,
locally or on Ray.

Why actors over shards rather than Ray Data ``map_batches``: the shard is already the unit of commit and of
resume, so scheduling by shard keeps "done" and "durable" the same thing; decoding beside the model avoids
sending decoded pixels (150 KB per 224² image, several times the JPEG) between nodes; and there is no second
pipeline (Arrow blocks, a different batching and failure model) whose results could drift from the local
engine's. What Ray Data would add, decode on CPU-only nodes feeding GPU nodes, is the first thing to revisit
when decoding, not the GPU, limits a GPU node (docs/scaling.md).

A node that dies takes its actor with it: the driver requeues that actor's shards on the surviving actors,
asks Ray for a replacement actor (which joins when the cluster has room for it), and gives a shard up only
after it has lost its actor :data:`MAX_SHARD_LOSSES` times.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from featurize.engine import FeatureBatch

__all__ = [
    "ClusterError",
    "LOCAL",
    "INSTALL_HINT",
    "import_ray",
    "host_and_port",
    "ray_session",
    "joblib_on_ray",
    "RayExtractPool",
    "group_shards",
    "MAX_SHARD_LOSSES",
    "ACTOR_WAIT_SECONDS",
]

LOCAL = "local"  # `--ray` without an address: join a running local cluster, or start a local Ray runtime
INSTALL_HINT = "pip install 'headbench[ray]'"
MAX_SHARD_LOSSES = 3  # a shard whose actor died this often is given up (a sample that kills its worker, say)
ACTOR_WAIT_SECONDS = 300.0  # with no actor working: how long to wait for one to come up (imports, weights)
CONNECT_TIMEOUT_SECONDS = 5.0
GPU_ROWS_PER_CALL = 16_384  # rows per call to a GPU actor (CPU actors: one shard per call)
IN_FLIGHT_PER_ACTOR = 2  # the next shard waits in the actor's queue while the current one runs


class ClusterError(Exception):
    """Ray is missing, unreachable, or the cluster cannot finish the work (one line for the CLI)."""


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed here; install it with: {INSTALL_HINT}") from None
    return ray


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; None for anything else (``auto``, a path, ...)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Fail fast on a HOST:PORT nobody listens on (``ray.init`` retries such an address for minutes)."""
    where = host_and_port(address)
    if where is None:
        return  # "auto" and other forms: Ray resolves them itself
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head --port 6379` and pass its address, e.g. --ray 10.0.0.1:6379"
        ) from None


def _send_token_if_there_is_one() -> None:
    """Authenticate as `ray start` does: with RAY_AUTH_MODE unset, a head node that finds a token (in
    ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) requires it, but ``ray.init`` would not send it.
    Sending it is harmless to a cluster without authentication."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def ray_session(address: str | None = LOCAL):
    """Connect to Ray for a block: `address` as ``ray.init`` takes it (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``), or :data:`LOCAL` for a running local cluster or else a new local runtime.

    A session that is already connected (a test, a notebook) is used as it is and left open.

    Raises:
        ClusterError: Ray is not installed, or the cluster cannot be reached.
    """
    _send_token_if_there_is_one()  # before Ray reads its configuration
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    target = None if address in (None, LOCAL) else address
    if target is not None:
        _check_reachable(target)
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, ... depending on the way it fails
        where = f"the Ray cluster at {target}" if target else "a local Ray runtime"
        raise ClusterError(
            f"could not connect to {where} ({_first_line(e)}); check the address (`ray status` on the head node "
            "prints it) and, when the cluster uses token authentication, that this machine has its token "
            "(docs/scaling.md)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def joblib_on_ray(address: str | None = LOCAL):
    """Run every joblib ``Parallel`` of the block (scikit-learn's searches and CV fits) as Ray tasks.

    Yields:
        the cluster's CPU count, the natural number of parallel fits.
    """
    import joblib

    with ray_session(address) as ray:
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_backend("ray"):
            yield max(1, int(ray.cluster_resources().get("CPU", 1)))


class _Extractor:
    """One Ray actor: a source and a frozen backbone on one device, embedding one shard per call.

    Construction never raises: a problem (the source missing on this node, weights that cannot be loaded)
    is reported by :meth:`describe`, so the driver can name it in one line.
    """

    def __init__(self, source: str, model: str, options: dict[str, Any]):
        from featurize.backbones import create_backbone
        from featurize.decode import resolve_decode
        from featurize.engine import default_batch_size, default_workers, resolve_device
        from featurize.runtime import resolve_runtime
        from featurize.sources import open_source

        self.error = ""
        try:
            self.source = open_source(source, **options.get("source_options", {}))
            self.backbone = create_backbone(model, options["weights"], image_size=options["image_size"],
                                            crop_pct=options.get("crop_pct"), grayscale=options.get("grayscale", False),
                                            layers=options.get("layers"))
            self.device = resolve_device(options["device"])
            batch_size = options["batch_size"] or default_batch_size(self.device)
            self.runtime = resolve_runtime(options.get("runtime", "torch"), self.backbone, self.device,
                                           options["precision"], batch_size)
            self.precision = self.runtime.precision
            self.decode = resolve_decode(options.get("decode", "auto"), self.device, self.backbone)
        except Exception as e:  # reported by describe(), with the node it happened on
            self.error = _first_line(e)
            return
        self.options = dict(options)
        self.options["batch_size"] = batch_size
        self.options["workers"] = default_workers(self.device) if options["workers"] is None else options["workers"]

    def describe(self) -> dict[str, Any]:
        """What this actor would compute: everything that enters the store's config, plus where it runs."""
        import ray

        where = {"node": ray.util.get_node_ip_address(), "pid": os.getpid()}
        if self.error:
            return {**where, "error": self.error}
        b = self.backbone
        return {
            **where,
            "device": str(self.device),
            "backbone": b.name,
            "weights": b.weights,
            "data_config": b.data_config,
            "pooling": b.pooling,
            "num_features": b.num_features,
            "layers": b.layers,
            "precision": self.precision,
            "runtime": self.runtime.name,
            "runtime_info": self.runtime.describe(),
            "decoder": self.decode,
            "dataset": {"kind": self.source.kind, "fingerprint": self.source.fingerprint(),
                        "num_rows": len(self.source)},
        }

    def embed(self, spans: list[tuple[int, int]], dtype: str) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
        """Features and tapped layers (in the storage dtype: half the bytes on the wire) and per-row errors of
        the rows in `spans` ([start, stop) ranges, one per shard), in one pass of the engine."""
        from featurize.engine import iter_features

        o = self.options
        rows = [i for start, stop in spans for i in range(start, stop)]
        indices, features, errors = [], [], []
        layers: dict[str, list[np.ndarray]] = {t["name"]: [] for t in self.backbone.layers}
        for batch in iter_features(self.source, self.backbone, rows, device=self.device,
                                   precision=self.precision, batch_size=o["batch_size"], workers=o["workers"],
                                   streams=o["streams"], jpeg_draft=o["jpeg_draft"], compile=o["compile"],
                                   runtime=self.runtime, decode=self.decode):
            indices.append(batch.indices)
            with np.errstate(over="ignore"):  # overflow to inf is recorded as a failed row by the writer
                features.append(batch.features.astype(dtype))
                for name, values in batch.layers.items():
                    layers[name].append(values.astype(dtype))
            errors.extend(batch.errors)
        return (np.concatenate(indices), np.concatenate(features), errors,
                {name: np.concatenate(parts) for name, parts in layers.items()})


def group_shards(shards: list[range], rows_per_call: int) -> list[tuple[range, ...]]:
    """Shards packed, in order, into calls of at least one shard and at most `rows_per_call` rows (when more
    than one shard)."""
    groups: list[tuple[range, ...]] = []
    current: list[range] = []
    for shard in shards:
        if current and sum(len(r) for r in current) + len(shard) > rows_per_call:
            groups.append(tuple(current))
            current = []
        current.append(shard)
    if current:
        groups.append(tuple(current))
    return groups


# What an actor reports that must be the same on every node (the rest: where it runs).
_AGREED = ("backbone", "weights", "data_config", "pooling", "num_features", "layers", "precision", "runtime", "decoder",
           "dataset")


class RayExtractPool:
    """Actors that embed a source shard by shard on a Ray cluster; see the module docstring.

    Args:
        source, model: as for a local extraction; every node must see the same source.
        options: weights, image_size, device, precision, batch_size, workers, streams, jpeg_draft, compile.
        report: called with one line when an actor is lost and its shards are requeued.

    Raises:
        ClusterError: the cluster has no room for an actor, or its actors disagree or cannot start.
    """

    def __init__(self, source: str, model: str, options: dict[str, Any], report: Callable[[str], None] = print):
        self.ray = ray = import_ray()
        self.report = report
        self.lost_actors = 0
        from ray import exceptions

        self._lost_errors = (exceptions.RayActorError, exceptions.ObjectLostError, exceptions.NodeDiedError,
                             exceptions.WorkerCrashedError, exceptions.OutOfMemoryError)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        device = options["device"]
        if device == "cuda" and gpus < 1:
            raise ClusterError("--device cuda: the Ray cluster has no GPUs; use --device auto or cpu")
        options = dict(options)
        if device in ("auto", "cuda") and gpus >= 1:
            # The CPUs are shared among the GPUs: each GPU actor decodes with its share (os.cpu_count() inside
            # an actor would count the whole node).
            count, self.resources = gpus, {"num_gpus": 1, "num_cpus": max(1, cpus // gpus)}
            if options["workers"] is None:
                options["workers"] = max(1, self.resources["num_cpus"] - 1)
        else:
            count, self.resources = cpus, {"num_cpus": 1}
        if count < 1:
            raise ClusterError("the Ray cluster has no CPUs to run extraction actors on; add a worker node")
        # Work per call: a shard on CPU actors; on GPU actors enough shards to amortise starting the
        # DataLoader's decode processes (a second or two) over many seconds of decoding.
        self.rows_per_call = GPU_ROWS_PER_CALL if "num_gpus" in self.resources else 1
        self._actor_class = ray.remote(max_restarts=0, **self.resources)(_Extractor)
        self._args = (source, model, options)
        self.actors: list[Any] = []
        self._starting: dict[Any, Any] = {}  # describe ref -> actor not yet working
        self._live: list[Any] = []
        self._reference: dict[str, Any] | None = None  # the first description: what every actor must compute
        self.requested = count
        for _ in range(count):
            self._start_actor()
        # The first actor to come up defines what is computed; the others join as they come up (a node that
        # just died may still be counted in the cluster's resources, so its actor would never be placed).
        ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=ACTOR_WAIT_SECONDS)
        if not ready:
            self.shutdown()
            raise ClusterError(
                f"no Ray worker came up within {ACTOR_WAIT_SECONDS:.0f} s (asked for {count} with "
                f"{self.resources} each); check `ray status` for free resources"
            )
        self._join(ready[0])
        self.description = {k: self._reference[k] for k in (*_AGREED, "device", "runtime_info")}

    def _start_actor(self) -> None:
        actor = self._actor_class.remote(*self._args)
        self.actors.append(actor)
        self._starting[actor.describe.remote()] = actor

    def _join(self, describe_ref) -> None:
        """Put a started actor to work once its description checks out (raises if it does not)."""
        actor = self._starting.pop(describe_ref)
        self._check(self.ray.get(describe_ref))
        self._live.append(actor)

    def _check(self, description: dict[str, Any]) -> dict[str, Any]:
        """`description` when it has no error and agrees with the first actor's (or is the first); else a
        one-line error."""
        if "error" in description:
            self.shutdown()
            raise ClusterError(f"a Ray worker on node {description['node']} could not start: {description['error']}")
        if self._reference is None:
            self._reference = description
        ref = self._reference
        differs = [k for k in _AGREED if description[k] != ref[k]]
        if differs:
            self.shutdown()
            raise ClusterError(
                f"Ray workers on nodes {ref['node']} and {description['node']} would compute different features "
                f"(they differ in {', '.join(differs)}); every node needs the same data, weights and software"
            )
        return description

    def wait_for_all(self) -> None:
        """Block until every requested actor is up (benchmarks: to time the shards without start-up)."""
        for ref in list(self._starting):
            self._join(ref)

    @property
    def working(self) -> list[Any]:
        """The actors that have come up and take shards."""
        return list(self._live)

    @property
    def placement(self) -> str:
        kind = "GPU" if "num_gpus" in self.resources else "CPU"
        return f"ray: {self.requested} {kind} actor(s) on {self.description['device']}"

    def batches(self, shards: list[range], dtype: str) -> Iterator[FeatureBatch]:
        """Embed `shards`, yielding one :class:`FeatureBatch` per call (a shard, or several on GPU actors) as
        each finishes, in any order.

        Raises:
            ClusterError: every actor is gone and none could be replaced in time, or a shard lost its actor
                :data:`MAX_SHARD_LOSSES` times.
            FeaturizeError: an actor failed on a shard for a reason other than losing its node.
        """
        ray = self.ray
        todo = collections.deque(group_shards(shards, self.rows_per_call))
        in_flight: dict[Any, tuple[Any, tuple[range, ...]]] = {}  # result ref -> (actor, its shards)
        losses: collections.Counter = collections.Counter()
        live, starting = self._live, self._starting
        while todo or in_flight:
            for actor in live:
                while todo and sum(a is actor for a, _ in in_flight.values()) < IN_FLIGHT_PER_ACTOR:
                    work = todo.popleft()
                    in_flight[actor.embed.remote([(r.start, r.stop) for r in work], dtype)] = (actor, work)
            timeout = None if in_flight else ACTOR_WAIT_SECONDS
            ready, _ = ray.wait(list(in_flight) + list(starting), num_returns=1, timeout=timeout)
            if not ready:
                raise ClusterError(
                    f"every Ray worker was lost and none could be restarted within {ACTOR_WAIT_SECONDS:.0f} s; "
                    f"{len(todo)} shard(s) are not done; rerun the same command to resume from the committed ones"
                )
            ref = ready[0]
            if ref in starting:
                with contextlib.suppress(*self._lost_errors):  # one that died while starting: its node is gone
                    self._join(ref)
                continue
            actor, work = in_flight.pop(ref)
            try:
                indices, features, errors, layers = ray.get(ref)
            except self._lost_errors as e:
                if actor in live:  # the first loss seen for this actor: requeue all its shards, ask for another
                    live.remove(actor)
                    theirs = [k for k, (a, _) in in_flight.items() if a is actor]
                    requeue = [work] + [in_flight.pop(k)[1] for k in theirs]
                    for w in requeue:
                        losses[w[0].start] += 1
                        if losses[w[0].start] >= MAX_SHARD_LOSSES:
                            raise ClusterError(
                                f"rows {w[0].start}-{w[-1].stop - 1} lost their Ray worker {MAX_SHARD_LOSSES} "
                                f"times (last: {_first_line(e)}); find the sample that kills it, or rerun to retry"
                            ) from None
                    todo.extendleft(reversed(requeue))
                    self.lost_actors += 1
                    shards_lost = sum(len(w) for w in requeue)
                    self.report(f"lost a Ray worker ({_first_line(e)[:120]}); {shards_lost} shard(s) requeued on "
                                f"the {len(live)} remaining, a replacement was requested")
                    self._start_actor()
                continue
            except ray.exceptions.RayTaskError as e:
                from featurize.errors import FeaturizeError

                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise FeaturizeError(f"extraction failed on a Ray worker: {_first_line(cause)}") from None
            yield FeatureBatch(indices, features, errors, layers)

    def shutdown(self) -> None:
        """Stop every actor (their processes exit; the cluster stays up)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors, self._live, self._starting = [], [], {}
