"""finetune: is unfreezing worth it? LP-FT of a backbone's last K blocks on a source's own train/val/test rows, written
as a run folder that compare-heads joins to its leaderboard (``--include RUN_DIR``).

A run folder holds:

* ``backbone.safetensors`` -- the fine-tuned backbone (timm keys, classifier removed): ``extract --weights`` reads it,
  so its features go through every head;
* ``head.skops`` -- the linear head on those features, saved like compare-heads' ``--save-best`` (``predict --head
  RUN_DIR/head.skops --weights RUN_DIR/backbone.safetensors`` classifies new images);
* ``predictions.csv`` -- every scored test row: id, label, prediction, one probability per class;
* ``results.json`` -- one row in compare-heads' schema (``head: finetune-K``, accuracy with its CI, seconds,
  trained parameters, device) and the run's config and history;
* ``checkpoint.pt`` -- the state after the last finished epoch: the same command resumes from it after a kill
  (``probe.json``: the linear probe that initialised the head).

The rows are the source's: its test split is scored, its val split (else a stratified share of train) stops early,
the rest trains -- the rows extract stores and compare-heads' holdout protocol uses.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from featurize.backbones import PIXELS, check_model_name, create_backbone, sha256_file
from featurize.engine import default_batch_size, default_workers, resolve_device, resolve_precision
from featurize.errors import FeaturizeError
from featurize.finetune import (
    ALL_BLOCKS, FinetuneNet, TrainSettings, frozen_features, head_logits, parse_train_blocks, predict_logits, train,
    train_transform, trainable_parameters,
)
from featurize.sources import open_source
from featurize.store import STATUS_OK, read_store, write_atomic
from heads import HeadsError, get_head
from heads.persist import save_head
from heads.torch_logreg import TorchLogisticRegression
from pipelines.provenance import library_versions, package_versions
from pipelines.scoring import read_prediction_csv, score_fields, write_prediction_csv

__all__ = ["FinetuneResult", "finetune", "FinetuneRun", "load_run", "HEAD_INIT_CHOICES", "RUN_FILES"]

HEAD_INIT_CHOICES = ("probe", "random")
RUN_FILES = {"backbone": "backbone.safetensors", "head": "head.skops", "predictions": "predictions.csv",
             "results": "results.json", "checkpoint": "checkpoint.pt", "probe": "probe.json"}
RUN_FORMAT = "headbench-finetune"


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the run folder, its leaderboard row, the training history, whether it resumed
    (the epoch it resumed after) or was already finished."""

    out: Path
    row: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_from: int = 0
    finished_before: bool = False
    probe: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"FinetuneResult(out={str(self.out)!r}, head={self.row.get('head')!r}, "
                f"test_accuracy={self.row.get('accuracy', float('nan')) * 100:.2f} %, epochs={len(self.history)}, "
                f"resumed_from={self.resumed_from}, finished_before={self.finished_before})")


def _warn(line: str) -> None:
    tqdm.write(f"warning: {line}", file=sys.stderr)


def _split_rows(split: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int):
    """(train, val, test) source indices: test = the test split; val = the val split, else a stratified
    `val_fraction` of the other labeled rows; train = the rest. Unlabeled rows take no part."""
    labeled = labels >= 0
    test = np.flatnonzero(labeled & (split == "test"))
    if not len(test):
        raise FeaturizeError("finetune scores the source's test split and this source has none; give it one (an "
                             "image folder's test/ folder, a CSV split column) -- compare-heads joins a fine-tuned "
                             "run on the same test rows")
    fit = labeled & (split != "test")
    val = np.flatnonzero(fit & (split == "val"))
    rest = np.flatnonzero(fit & (split != "val"))
    if not len(val):
        if not 0 < val_fraction < 1:
            raise FeaturizeError(f"--val-fraction must be in (0, 1), got {val_fraction}")
        from sklearn.model_selection import train_test_split

        counts = np.bincount(labels[rest])
        stratify = labels[rest] if counts[counts > 0].min() >= 2 else None
        rest, val = train_test_split(rest, test_size=val_fraction, random_state=seed, stratify=stratify)
        rest, val = np.sort(rest), np.sort(val)
    if len(rest) < 2 or not len(val):
        raise FeaturizeError(f"too few training rows to fine-tune ({len(rest)} train, {len(val)} validation)")
    return rest, val, test


def _store_mismatch(store, backbone, fingerprint: str, task: str) -> str:
    """Why `store`'s features are not the frozen features of this backbone on this source ('' when they are)."""
    attrs = store.attrs
    checks = [("backbone", attrs.get("backbone"), backbone.name),
              ("weights", attrs.get("weights_sha256"), backbone.weights["sha256"]),
              ("preprocessing", attrs.get("data_config"), backbone.data_config),
              ("pooling", (attrs.get("pooling") or {}).get("kind"), "pre_logits"),
              ("dataset", attrs.get("dataset_fingerprint"), fingerprint)]
    for name, theirs, ours in checks:
        if theirs != ours:
            return f"its {name} differs"
    if task not in store.task_names:
        return f"it has no task {task}"
    return ""


def _frozen_features(src, backbone, rows: np.ndarray, store_path, fingerprint: str, task: str, device, precision,
                     progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Frozen features of `rows` and which of them decoded: from `store_path` when it holds exactly these
    features, else computed by the engine. Returns (X, ok, where)."""
    if store_path is not None:
        store = read_store(store_path)
        why = _store_mismatch(store, backbone, fingerprint, task)
        if not why:
            return (np.asarray(store.features[rows], dtype=np.float32), store.status[rows] == STATUS_OK,
                    f"store {Path(store_path).name}")
        _warn(f"--store {store_path}: not this backbone's features of this source ({why}); computing them")
    with tqdm(total=len(rows), unit="img", desc="frozen features (linear probe)", disable=not progress) as bar:
        X, errors = frozen_features(backbone, src, rows, device=device, precision=precision,
                                    batch_size=default_batch_size(device), workers=default_workers(device),
                                    progress=bar.update)
    return X, np.array([not e for e in errors], bool), "computed"


def _linear_probe(X_train, y_train, X_val, y_val, n_classes: int, seed: int, folds: int = 5
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """torch-logreg on standardised frozen features, C chosen over its registered grid by stratified K-fold CV on
    the training rows (as compare-heads tunes it; ties: the stronger penalty), folded into one linear layer on the
    raw features: W = coef / scale, b = intercept - W . mean. Returns W, b and the choice (C, CV and validation
    accuracy)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(), TorchLogisticRegression())
    grid = sorted(get_head("torch-logreg").grid["C"])  # GridSearchCV keeps the first of tied settings
    counts = np.bincount(y_train)
    k = int(min(folds, counts[counts > 0].min()))
    if k >= 2:
        search = GridSearchCV(pipeline, {"torchlogisticregression__C": grid},
                              cv=StratifiedKFold(k, shuffle=True, random_state=seed)).fit(X_train, y_train)
        model, C, cv_accuracy = search.best_estimator_, search.best_params_["torchlogisticregression__C"], \
            float(search.best_score_)
    else:  # a class with a single row: nothing to cross-validate on
        C, cv_accuracy = grid[0], 0.0
        model = pipeline.set_params(torchlogisticregression__C=C).fit(X_train, y_train)
    scaler, logreg = model[0], model[-1]
    W = np.zeros((n_classes, X_train.shape[1]), np.float32)
    b = np.full(n_classes, -30.0, np.float32)  # a class absent from the training rows is never predicted
    W[logreg.classes_] = logreg.coef_ / scaler.scale_
    b[logreg.classes_] = logreg.intercept_ - W[logreg.classes_] @ scaler.mean_
    val_accuracy = float((model.predict(X_val) == y_val).mean()) if len(y_val) else None
    return W, b, {"C": C, "cv_accuracy": cv_accuracy, "cv_folds": k, "val_accuracy": val_accuracy}


def _config(**parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def _head_model(W: np.ndarray, b: np.ndarray, n_classes: int) -> TorchLogisticRegression:
    """The trained head as a fitted scikit-learn estimator (what predict loads)."""
    head = TorchLogisticRegression()
    head.classes_ = np.arange(n_classes)
    head.coef_, head.intercept_ = W.astype(np.float32), b.astype(np.float32)
    head.n_features_in_ = W.shape[1]
    head.n_iter_ = np.array([0])
    return head


def finetune(
    source: str,
    out: str | Path,
    *,
    model: str = "tf_efficientnet_lite0",
    weights: str = "auto",
    train_blocks: int | str = 1,
    epochs: int = 5,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    patience: int | None = 3,
    val_fraction: float = 0.1,
    device: str = "auto",
    precision: str = "auto",
    image_size: int | None = None,
    crop_pct: float | None = None,
    augment: str = "timm",
    hflip: float = 0.5,
    crop_scale: float = 0.08,
    head_init: str = "probe",
    store: str | Path | None = None,
    workers: int | None = None,
    task: str | None = None,
    source_options: dict[str, Any] | None = None,
    fresh: bool = False,
    n_boot: int = 1000,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the last `train_blocks` blocks of `model` and a linear head on `source`; write the run to `out`.

    Args:
        train_blocks: blocks to train from the top (timm's block structure), ``all`` for the whole backbone, 0 for
            the head alone by gradient descent.
        head_init: ``probe`` (LP-FT: torch-logreg on frozen features, C chosen by 5-fold CV on the training rows,
            the features taken from `store` when it holds this backbone's features of this source) or ``random``.
        store: a feature store of this backbone on this source, for the probe (computed when it does not fit).
        fresh: discard a checkpoint or finished run in `out` and start over.
        Other arguments as ``cli.py finetune --help`` describes them.

    Raises:
        FeaturizeError: bad source or options, a source without a test split, a run in `out` started with
            other settings, weights that cannot be found.
    """
    called = time.perf_counter()
    out = Path(out)
    blocks = parse_train_blocks(train_blocks)
    if head_init not in HEAD_INIT_CHOICES:
        raise FeaturizeError(f"--head-init must be one of {', '.join(HEAD_INIT_CHOICES)}, got {head_init!r}")
    if patience is not None and patience < 1:
        raise FeaturizeError(f"--patience must be at least 1, got {patience}")
    check_model_name(model)
    if model == PIXELS:
        raise FeaturizeError("--model pixels has no weights to fine-tune; choose a timm model")
    if out.exists() and not out.is_dir():
        raise FeaturizeError(f"--out {out} is a file; give a folder for the run")
    source_options = {k: v for k, v in (source_options or {}).items() if v is not None}
    src = open_source(source, **source_options)
    label_set = src.task(task)
    task_name = task or src.default_task
    labels = np.asarray(label_set.labels, dtype=np.int64)
    classes = list(label_set.classes)
    split = np.array([s.split for s in src.samples])
    train_rows, val_rows, test_rows = _split_rows(split, labels, val_fraction, seed)
    fingerprint = src.fingerprint()

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    backbone = create_backbone(model, weights, image_size=image_size, crop_pct=crop_pct)
    trained_names = trainable_parameters(backbone.model, blocks)
    transform = train_transform(backbone.data_config, augment, hflip, crop_scale)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                             patience=patience, precision=prec,
                             workers=workers if workers is not None else default_workers(dev),
                             eval_batch_size=default_batch_size(dev))
    name = f"finetune-{blocks}"
    config = _config(
        format=RUN_FORMAT, source={"kind": src.kind, "fingerprint": fingerprint}, task=task_name, model=model,
        weights=backbone.weights, data_config=backbone.data_config, train_blocks=blocks, epochs=epochs, lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience, val_fraction=val_fraction,
        precision=prec, device=dev.type, augment=augment, hflip=hflip if augment == "timm" else None,
        crop_scale=crop_scale if augment == "timm" else None,
        head_init=head_init, versions=package_versions(("torch", "timm", "numpy", "headbench")),
        # where frozen features may come from (the probe, the head alone on cached features): that store's hash
        store=read_store(store, features=False).attrs.get("config_hash") if store is not None else None,
    )

    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in RUN_FILES.items()}
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeaturizeError(f"another finetune is writing into {out} (it holds {out / '.lock'}); wait for it or "
                             "choose another --out") from None
    try:
        if fresh:
            for path in paths.values():
                path.unlink(missing_ok=True)
        finished = _finished(paths["results"], config)
        if finished is not None:
            return FinetuneResult(out, finished["rows"][0], finished["meta"]["history"], finished_before=True)
        if paths["results"].exists():  # a finished run of other settings: never overwritten silently
            raise FeaturizeError(f"{out} holds a finished run of other settings; rerun it with its own settings, use "
                                 "--fresh to replace it, or choose another --out")
        return _run(src, backbone, classes, labels, train_rows, val_rows, test_rows, trained_names, transform,
                    settings, config, paths, dev, name, blocks, head_init, augment, store, fingerprint, task_name,
                    n_boot, called, progress)
    finally:
        lock.release()


def _finished(path: Path, config: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("meta", {}).get("config") == config else None


def _run(src, backbone, classes, labels, train_rows, val_rows, test_rows, trained_names, transform, settings,
         config, paths, dev, name, blocks, head_init, augment, store, fingerprint, task_name, n_boot, called,
         progress):
    import torch

    n_classes = len(classes)
    net = FinetuneNet(backbone.model, backbone.num_features, n_classes)
    probe: dict[str, Any] | None = None
    started = time.perf_counter()
    resuming = paths["checkpoint"].exists()
    # The head alone on unaugmented images: its inputs are the same frozen features every epoch, computed once.
    cached = not trained_names and augment == "none"
    X = ok = None
    n_train = len(train_rows)
    if cached or (head_init == "probe" and not resuming):
        X, ok, where = _frozen_features(src, backbone, np.concatenate([train_rows, val_rows]), store, fingerprint,
                                        task_name, dev, settings.precision, progress)
        X[~ok] = np.nan
    if head_init == "probe" and not resuming:
        tr, va = ok[:n_train], ok[n_train:]
        W, b, probe = _linear_probe(X[:n_train][tr], labels[train_rows][tr], X[n_train:][va], labels[val_rows][va],
                                    n_classes, settings.seed)
        probe.update(features=where, seconds=time.perf_counter() - started, failed_rows=int((~ok).sum()))
        write_atomic(paths["probe"], lambda tmp: tmp.write_text(json.dumps(probe)))
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(W))
            net.head.bias.copy_(torch.from_numpy(b))
    elif head_init == "probe" and paths["probe"].exists():  # resuming: the head is in the checkpoint
        probe = json.loads(paths["probe"].read_text())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net.head.reset_parameters()
    probe_seconds = time.perf_counter() - started

    def evaluate(model: FinetuneNet) -> tuple[float, float]:
        if cached:
            logits, valid = head_logits(model, X[n_train:]), ok[n_train:]
        else:
            logits, errors = predict_logits(model, backbone, src, val_rows, device=dev, precision=settings.precision,
                                            batch_size=settings.eval_batch_size, workers=default_workers(dev))
            valid = np.array([not e for e in errors], bool)
        if not valid.any():
            return 0.0, float("nan")
        y = labels[val_rows][valid]
        logp = torch.log_softmax(torch.from_numpy(logits[valid]).double(), dim=1)
        return (float((logits[valid].argmax(1) == y).mean()),
                float(-logp[torch.arange(len(y)), torch.from_numpy(y)].mean()))

    result = train(net, trained_names, src, train_rows, labels[train_rows], evaluate, transform, settings,
                   input_size=backbone.data_config["input_size"], device=dev, checkpoint=paths["checkpoint"],
                   config=config, features=X[:n_train] if cached else None, progress=progress)

    started = time.perf_counter()
    with tqdm(total=len(test_rows), unit="img", desc="test rows", disable=not progress) as bar:
        logits, errors = predict_logits(net, backbone, src, test_rows, device=dev, precision=settings.precision,
                                        batch_size=settings.eval_batch_size, workers=default_workers(dev),
                                        progress=bar.update)
    predict_seconds = time.perf_counter() - started
    ok = np.array([not e for e in errors], bool)
    scored = test_rows[ok]
    proba = torch.softmax(torch.from_numpy(logits[ok]).double(), dim=1).numpy()
    y_true, y_pred = labels[scored], proba.argmax(1)

    ids = [src.samples[i].id for i in scored]
    write_prediction_csv(paths["predictions"], ids, classes, y_true, y_pred, proba)
    _write_backbone(paths["backbone"], net)
    weights_sha = sha256_file(paths["backbone"])
    W = net.head.weight.detach().float().cpu().numpy()
    b = net.head.bias.detach().float().cpu().numpy()
    provenance = {
        "head": name, "params": {"train_blocks": blocks}, "representation": f"finetune:{paths['results'].parent.name}",
        "layer": None, "blocks": None, "classes": classes, "task": task_name, "backbone": backbone.name,
        "weights_source": f"file:{paths['backbone'].name}", "weights_sha256": weights_sha,
        "data_config": backbone.data_config, "pooling": backbone.pooling, "decode": {"jpeg_draft": True},
        "precision": settings.precision, "runtime": "torch", "dtype": "float32", "num_features": backbone.num_features,
        "layers": [], "protocol": "fine-tuned on the source's train rows, early-stopped on its validation rows",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "library_versions": library_versions(),
    }
    settings_json = json.loads(config)
    seconds = probe_seconds + result.seconds
    row = {
        "representation": provenance["representation"],
        "backbone": backbone.name,
        "layer": None,
        "store": None,
        "run_dir": str(paths["results"].parent),
        "head": name,
        "task": task_name,
        **score_fields(y_true, y_pred, len(classes), scores=proba, proba=proba, n_boot=n_boot,
                       seed=settings.seed),
        "fit_seconds": seconds,
        "tune_seconds": 0.0,
        "predict_us_per_sample": predict_seconds / max(len(scored), 1) * 1e6,
        "params": {"train_blocks": blocks, "epochs": len(result.history), "best_epoch": result.best_epoch,
                   "lr": settings.lr, "batch_size": settings.batch_size},
        "n_scored": int(len(scored)),
        "mode": "finetune",
        "tune_rows": int(len(train_rows)),
        "planned_tune_rows": int(len(train_rows)),
        "approximated": False,
        "components": None,
        "method": (f"{'LP-FT' if head_init == 'probe' else 'fine-tuning'}: "
                   + ("a linear head alone" if blocks == 0 else "the whole backbone and a linear head"
                      if blocks == ALL_BLOCKS else f"the last {blocks} block{'s' if blocks != 1 else ''} and a "
                                                  "linear head")
                   + f", AdamW + cosine, {settings.precision}"),
        "share_seconds": None,
        "predicted_seconds": None,
        "actual_seconds": seconds,
        "probe_seconds": 0.0,  # the race's probes (none); the linear probe's seconds are in meta.seconds
        "budget_note": "",
        "cached": False,
        "trained_params": result.trained_parameters,
        "device": str(dev),
    }
    provenance.update(accuracy=row["accuracy"], accuracy_ci=row["accuracy_ci"])
    write_atomic(paths["head"], lambda tmp: save_head(tmp, _head_model(W, b, len(classes)), provenance))
    meta = {
        "format": RUN_FORMAT,
        "config": config,
        "settings": settings_json,
        "source": src.describe(),
        "dataset_fingerprint": settings_json["source"]["fingerprint"],
        "classes": classes,
        "rows": {"train": int(len(train_rows)), "val": int(len(val_rows)), "test": int(len(test_rows)),
                 "test_failed": int((~ok).sum()), "train_failed": result.failed_rows},
        "probe": probe,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "initial_val_accuracy": result.initial_val_accuracy,
        "stopped_early": result.stopped_early,
        "steps_per_epoch": result.steps_per_epoch,
        "head_on_cached_features": cached,
        "resumed_from_epoch": result.resumed_from,
        "weights": {"file": paths["backbone"].name, "sha256": weights_sha},
        "seconds": {"probe": probe_seconds, "train": result.seconds, "predict": predict_seconds,
                    "wall_this_run": time.perf_counter() - called},
        "created": provenance["created"],
        "library_versions": library_versions(),
    }
    results = {"rows": [row], "meta": meta}
    write_atomic(paths["results"], lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=float)))
    return FinetuneResult(paths["results"].parent, row, result.history, resumed_from=result.resumed_from,
                          probe=probe)


def _write_backbone(path: Path, net: FinetuneNet) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "headbench-finetuned-backbone"}))


@dataclass
class FinetuneRun:
    """A finished run folder read back (:func:`load_run`)."""

    path: Path
    row: dict[str, Any]
    meta: dict[str, Any]
    ids: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    proba: np.ndarray | None

    def join(self, ids: np.ndarray, y: np.ndarray, classes: list[str], task: str, fingerprint: str | None,
             n_boot: int, seed: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
        """This run's row, predictions and probabilities on exactly the scored rows `ids` (in their order), the
        scores recomputed on them (the run may have scored more rows: those failed in some store).

        Raises:
            HeadsError: other classes, task or data, or a scored row this run has no prediction for.
        """
        where = f"--include {self.path}"
        if list(self.meta.get("classes", [])) != list(classes):
            raise HeadsError(f"{where}: its classes differ from the stores'; fine-tune on the same source")
        if self.row.get("task") != task:
            raise HeadsError(f"{where}: it predicts task {self.row.get('task')!r}, the comparison task {task!r}")
        if fingerprint and self.meta.get("dataset_fingerprint") != fingerprint:
            raise HeadsError(f"{where}: it was fine-tuned on other data than the stores were extracted from "
                             "(dataset fingerprints differ)")
        position = {sample: i for i, sample in enumerate(self.ids)}
        missing = [str(s) for s in ids if str(s) not in position]
        if missing:
            raise HeadsError(f"{where}: {len(missing)} of the {len(ids)} scored test rows have no prediction in it "
                             f"(e.g. {missing[0]}); fine-tune on the same source and split")
        at = np.array([position[str(s)] for s in ids], dtype=np.int64)
        if not np.array_equal(self.labels[at], y):
            raise HeadsError(f"{where}: its labels of the scored rows differ from the stores'")
        predictions, proba = self.predictions[at], None if self.proba is None else self.proba[at]
        row = {**self.row, **score_fields(y, predictions, len(classes), scores=proba, proba=proba, n_boot=n_boot,
                                          seed=seed), "n_scored": int(len(ids))}
        return row, predictions, proba


def load_run(path: str | Path) -> FinetuneRun:
    """Read a finished finetune run folder.

    Raises:
        HeadsError: not a finished run folder, or its files are damaged.
    """
    path = Path(path)
    results_path, predictions_path = path / RUN_FILES["results"], path / RUN_FILES["predictions"]
    if not results_path.is_file():
        unfinished = (path / RUN_FILES["checkpoint"]).exists()
        hint = " (it has a checkpoint: rerun its finetune command to finish it)" if unfinished else ""
        raise HeadsError(f"--include {path}: not a finished finetune run, no {RUN_FILES['results']}{hint}")
    try:
        results = json.loads(results_path.read_text())
        meta, row = results["meta"], results["rows"][0]
        if meta.get("format") != RUN_FORMAT:
            raise ValueError("not a finetune run's results")
        ids, labels, predictions, proba = read_prediction_csv(predictions_path, list(meta["classes"]))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise HeadsError(f"--include {path}: damaged run folder ({type(e).__name__}: {e}); rerun its finetune "
                         "command with --fresh") from None
    return FinetuneRun(path, row, meta, ids, labels, predictions, proba)
