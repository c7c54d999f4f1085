"""Partial fine-tuning: the last K blocks of a timm backbone and a new linear head, trained on a source's rows.

This is the training loop behind ``cli.py finetune`` (:mod:`pipelines.finetuning` orchestrates it): it consumes what
featurize already knows -- a :class:`~featurize.backbones.Backbone` (timm model, weights, data config), a source,
the engine -- and produces fine-tuned backbone weights that ``extract --weights`` reads back.

* **What trains** (:func:`trainable_parameters`): timm's own block structure, the fine-grained groups of the
  model's ``group_matcher`` -- the stem, then one group per block, the layers after the last block (final conv,
  final norm) belonging to it. ``K`` trains the last K blocks and the head; ``all`` the whole backbone; ``0`` the
  head alone. Frozen modules stay in eval mode; trained ones are in train mode (dropout, drop path), batch norms
  excepted: their running statistics stay as they are (their scale and shift train).
* **How** (:func:`train`): AdamW (no weight decay on biases and norms) under a cosine schedule per step, timm's
  train augmentation, autocast at the resolved precision (fp16 on CUDA with a gradient scaler), early stopping
  on validation accuracy with the best epoch's weights restored.
* **Determinism**: every random choice is a function of (seed, epoch, step or row): the epoch's order, each
  image's augmentation and the dropout of each step. A run resumed from an epoch's checkpoint therefore continues
  exactly as the uninterrupted run did -- bit for bit on a CPU with the same thread count.
* **Safety**: a checkpoint (model, optimizer, best weights, history; tensors and plain values only, read back with
  ``weights_only=True``) is written atomically at the end of every epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .engine import autocast, iter_features
from .errors import FeaturizeError, error_text
from .sources import Source
from .store import config_changes, write_atomic

__all__ = [
    "ALL_BLOCKS",
    "FinetuneNet",
    "TrainSettings",
    "TrainResult",
    "block_groups",
    "parse_train_blocks",
    "trainable_parameters",
    "train_transform",
    "predict_logits",
    "train",
    "frozen_features",
    "head_logits",
]

ALL_BLOCKS = "all"
AUGMENT_CHOICES = ("timm", "none")
CHECKPOINT_FORMAT = "headbench-finetune-checkpoint"
# Crash tests set HEADBENCH_FAULT=finetune-step:N to SIGKILL the process after its N-th optimizer step (counted
# over the whole run, so N = steps per epoch + 2 dies inside epoch 2).
_FAULT_ENV = "HEADBENCH_FAULT"


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block group, input side first: the stem, then one group per block (timm's
    fine-grained ``group_matcher``; what follows the last block belongs to it).

    Raises:
        FeaturizeError: the model has no timm block structure.
    """
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        raise FeaturizeError(f"{type(model).__name__} has no timm block structure (group_matcher); it cannot be "
                             "fine-tuned by blocks, use --train-blocks all or 0") from None
    groups = group_parameters(model, matcher)
    return [list(names) for _, names in sorted(groups.items())]


def parse_train_blocks(value: str | int) -> int | str:
    """``all`` or a number of blocks (0: the head alone).

    Raises:
        FeaturizeError: anything else.
    """
    text = str(value).strip().lower()
    if text == ALL_BLOCKS:
        return ALL_BLOCKS
    if text.isdigit():
        return int(text)
    raise FeaturizeError(f"--train-blocks must be a number of blocks (0: the head alone) or 'all', got {value!r}")


def trainable_parameters(model: nn.Module, train_blocks: int | str) -> list[str]:
    """Names of the backbone parameters that train for `train_blocks` (see :func:`parse_train_blocks`).

    Raises:
        FeaturizeError: more blocks than the model has.
    """
    names = [n for n, _ in model.named_parameters()]
    if train_blocks == ALL_BLOCKS:
        return names
    if train_blocks == 0:
        return []
    groups = block_groups(model)
    blocks = len(groups) - 1  # the first group is the stem
    if train_blocks > blocks:
        raise FeaturizeError(f"--train-blocks {train_blocks}: this model has {blocks} blocks after its stem; use 0 "
                             f"to {blocks}, or all (the stem too)")
    chosen = {n for group in groups[-train_blocks:] for n in group}
    return [n for n in names if n in chosen]


class FinetuneNet(nn.Module):
    """A timm backbone (classifier removed) and a linear head on its pooled pre-logit features."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_transform(data_config: dict[str, Any], augment: str = "timm", hflip: float = 0.5,
                    crop_scale: float = 0.08) -> Callable:
    """PIL image -> normalised tensor for training: timm's train augmentation (random resized crop of
    `crop_scale` to all of the image's area, flip with probability `hflip`, colour jitter) at the backbone's size
    and normalisation, or with ``none`` the eval transform."""
    from timm.data import create_transform

    if augment not in AUGMENT_CHOICES:
        raise FeaturizeError(f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got {augment!r}")
    if not 0 <= hflip <= 1:
        raise FeaturizeError(f"--hflip must be a probability in [0, 1], got {hflip}")
    if not 0 < crop_scale <= 1:
        raise FeaturizeError(f"--crop-scale must be in (0, 1], got {crop_scale}")
    keys = ("input_size", "interpolation", "mean", "std")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in keys}
    if augment == "none":
        return create_transform(**args, crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode"),
                                is_training=False)
    return create_transform(**args, is_training=True, hflip=hflip, scale=(crop_scale, 1.0))


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, the epoch, a step or row)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _TrainRows(Dataset):
    """(image, label, ok) per training row; the augmentation of row `i` in epoch `e` depends on (seed, e, i) only,
    whichever process or order decodes it. A row that fails to decode is a zero image with ok False (its loss is
    left out), never another sample."""

    def __init__(self, source: Source, indices: Sequence[int], labels: Sequence[int], transform: Callable,
                 seed: int):
        self.source, self.indices, self.labels = source, list(indices), list(labels)
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                seed = _seed(self.seed, self.epoch, index)
                random.seed(seed)
                torch.manual_seed(seed)
                x = self.transform(self.source.load(index))
            ok = True
        except Exception:
            x, ok = None, False
        finally:
            random.setstate(state)
        return x, self.labels[position], ok


def _collate(items, shape: tuple[int, ...]):
    images = torch.stack([x if ok else torch.zeros(shape) for x, _, ok in items])
    return images, torch.tensor([y for _, y, _ in items]), torch.tensor([ok for _, _, ok in items])


def frozen_features(backbone: Backbone, source: Source, indices: Sequence[int], *, device: torch.device,
                    precision: str, batch_size: int, workers: int = 0,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Pooled features [n, width] of `indices` (in that order) through the engine, and an error per row ('' when
    it decoded; its features are NaN otherwise)."""
    features, errors = [], []
    for batch in iter_features(source, backbone, indices, device=device, precision=precision, batch_size=batch_size,
                               workers=workers):
        features.append(batch.features)
        errors += batch.errors
        if progress is not None:
            progress(len(batch.errors))
    return (np.concatenate(features) if features else np.zeros((0, backbone.num_features), np.float32)), errors


def head_logits(net: FinetuneNet, features: np.ndarray) -> np.ndarray:
    """The net's head applied to features [n, width] (numpy, float32)."""
    weight = net.head.weight.detach().float().cpu().numpy()
    return features @ weight.T + net.head.bias.detach().float().cpu().numpy()


def predict_logits(net: FinetuneNet, backbone: Backbone, source: Source, indices: Sequence[int], *,
                   device: torch.device, precision: str, batch_size: int, workers: int = 0,
                   progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Logits [n, classes] of `indices` (eval transform, eval mode, the engine's streams; the trained backbone as
    a :class:`Backbone`), and an error per row ('' when it decoded; its logits are NaN otherwise)."""
    net.eval()
    trained = dataclasses.replace(backbone, model=net.backbone, layers=[])
    features, errors = frozen_features(trained, source, indices, device=device, precision=precision,
                                       batch_size=batch_size, workers=workers, progress=progress)
    return head_logits(net, features), errors


@dataclass
class TrainSettings:
    """How :func:`train` trains (everything here is part of the run's config).

    Attributes:
        epochs: passes over the training rows (at most; early stopping may end sooner).
        lr: AdamW's peak learning rate, decayed by a cosine over every step of every epoch.
        weight_decay: AdamW's decoupled weight decay (not applied to biases and normalisation weights).
        batch_size: training rows per step.
        seed: seed of the order, the augmentation, dropout.
        patience: stop after this many epochs without a better validation accuracy (None: never).
        precision: resolved precision (``fp32``, ``bf16``, ``fp16``) of the autocast.
        workers: decode worker processes for the training rows (0: decode in this process).
        eval_batch_size: rows per forward pass of the validation (engine).
    """

    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 32
    seed: int = 0
    patience: int | None = 3
    precision: str = "fp32"
    workers: int = 0
    eval_batch_size: int = 8


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        history: per epoch: ``epoch``, ``loss`` (mean training loss), ``val_accuracy``, ``val_loss``, ``lr`` (at
            the epoch's end), ``seconds``.
        best_epoch: the epoch whose weights the net holds now (1-based): the best validation accuracy over the
            trained epochs (never the initial weights: the run answers what fine-tuning gives).
        best_val_accuracy: its validation accuracy.
        initial_val_accuracy: the validation accuracy before the first step (LP-FT: the linear probe's).
        stopped_early: early stopping ended the run before its last epoch.
        seconds: training time over every run that contributed (resumed runs add up).
        resumed_from: the epoch this run resumed after (0: started afresh).
        trained_parameters: parameters that trained (the head included).
        failed_rows: training rows that failed to decode in an epoch (left out of the loss).
        steps_per_epoch: optimizer steps per epoch (the rows that do not fill a last batch wait for the next
            epoch's order).
    """

    history: list[dict[str, Any]]
    best_epoch: int
    best_val_accuracy: float
    initial_val_accuracy: float
    stopped_early: bool
    seconds: float
    resumed_from: int
    trained_parameters: int
    failed_rows: int = 0
    steps_per_epoch: int = 0


def _feature_batches(features: np.ndarray, labels: Sequence[int], order: np.ndarray, batch_size: int):
    """(features, labels, ok) per batch of `order`, as the image loader gives (images, labels, ok)."""
    labels = np.asarray(labels)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        x = features[rows]
        ok = np.isfinite(x).all(axis=1)
        yield torch.from_numpy(np.where(ok[:, None], x, 0).astype(np.float32)), torch.from_numpy(labels[rows]), \
            torch.from_numpy(ok)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def _set_modes(net: FinetuneNet, trained: set[str]) -> None:
    """Eval mode everywhere, then train mode on every module whose parameters all train -- except batch norms,
    which keep their running statistics (their scale and shift still train): the head's linear probe was fitted
    on features normalised by those statistics, and small batches of another domain would replace them by noisy
    batch statistics."""
    net.eval()
    for name, module in net.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if own and all(p in trained for p in own):
            module.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _load_checkpoint(path: Path, config: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeaturizeError(f"cannot read the checkpoint {path} ({error_text(e)}); delete it or rerun with --fresh")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FeaturizeError(f"{path} is not a headbench fine-tuning checkpoint; delete it or rerun with --fresh")
    if state["config"] != config:
        changed = config_changes(json.loads(state["config"]), json.loads(config))
        raise FeaturizeError(f"{path.parent} holds a run started with other settings (changed: {', '.join(changed)}); "
                             "rerun with the same settings to resume it, --fresh to start over, or another --out")
    return state


def train(net: FinetuneNet, trained_names: Sequence[str], source: Source, train_rows: Sequence[int],
          train_labels: Sequence[int], evaluate: Callable[[FinetuneNet], tuple[float, float]],
          transform: Callable, settings: TrainSettings, *, input_size: Sequence[int], device: torch.device,
          checkpoint: Path, config: str, features: np.ndarray | None = None, progress: bool = True) -> TrainResult:
    """Train the head and the backbone parameters `trained_names` of `net` on `train_rows`.

    Args:
        net: the backbone and its head, initialised (the head from a linear probe, for LP-FT).
        trained_names: backbone parameter names that train (:func:`trainable_parameters`); the head always trains.
        source: where the rows' images come from.
        train_rows, train_labels: the training rows (source indices) and their class indices.
        evaluate: validation accuracy and loss of the net as it is (called after every epoch, and once before
            the first, for the record: the best epoch is chosen among the trained ones).
        transform: the training transform (:func:`train_transform`).
        input_size: (C, H, W) of what `transform` gives.
        settings: epochs, learning rate, ...
        device: where the net trains.
        checkpoint: the checkpoint file: resumed from when it exists (its `config` must be the same), written
            atomically after every epoch.
        config: the run's canonical JSON config; a checkpoint of another config is refused, naming what changed.
        features: the training rows' frozen features ([rows, width], NaN where a row failed), for a run in which
            nothing in the backbone trains and nothing is augmented: the head then trains on them (the same
            order, batches and steps), instead of running the frozen network over the same images every epoch.
        progress: show a progress bar (loss, validation accuracy).

    Raises:
        FeaturizeError: a checkpoint of other settings or unreadable; a precision the device cannot train in.
    """
    from tqdm.auto import tqdm

    if settings.precision == "fp16" and device.type != "cuda":
        raise FeaturizeError("--precision fp16 trains only on CUDA (with a gradient scaler); use fp32 or bf16")
    if settings.epochs < 1 or settings.batch_size < 1:
        raise FeaturizeError("--epochs and --batch-size must be at least 1")
    if len(train_rows) < 2:
        raise FeaturizeError(f"only {len(train_rows)} training rows; fine-tuning needs more")
    if features is not None and (trained_names or len(features) != len(train_rows)):
        raise FeaturizeError("cached features serve a run that trains the head alone, one row per training row")
    net.to(device, memory_format=torch.channels_last)  # from the start: a resumed run runs the same kernels
    trained = {f"backbone.{n}" for n in trained_names} | {"head.weight", "head.bias"}
    params = dict(net.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in trained)
    groups = [
        {"params": [p for n, p in params.items() if n in trained and not _no_decay(n, p)],
         "weight_decay": settings.weight_decay},
        {"params": [p for n, p in params.items() if n in trained and _no_decay(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    n_trained = sum(p.numel() for n, p in params.items() if n in trained)

    data = _TrainRows(source, train_rows, train_labels, transform, settings.seed)
    shape = tuple(int(v) for v in input_size)
    steps_per_epoch = max(1, len(data) // settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch

    state = _load_checkpoint(checkpoint, config)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = json.loads(state["history"])
        best = {"epoch": state["best_epoch"], "accuracy": state["best_accuracy"], "model": state["best_model"],
                "initial": state["initial_accuracy"]}
        start, seconds, failed, stopped = state["epoch"], state["seconds"], state["failed_rows"], state["stopped"]
    else:
        history, start, seconds, failed, stopped = [], 0, 0.0, 0, False
        initial, _ = evaluate(net)
        best = {"epoch": 0, "accuracy": -1.0, "model": None, "initial": initial}
    resumed_from = start
    fault = os.environ.get(_FAULT_ENV, "")
    kill_after = int(fault.split(":", 1)[1]) if fault.startswith("finetune-step:") else None
    devices = [device.index or 0] if device.type == "cuda" else []
    bar = tqdm(total=total_steps, initial=start * steps_per_epoch, unit="step", desc="finetune", disable=not progress)
    try:
        with torch.random.fork_rng(devices=devices):
            for epoch in range(start + 1, settings.epochs + 1):
                if stopped:
                    break
                started = time.perf_counter()
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(_seed(settings.seed, epoch)))
                order = order[: steps_per_epoch * settings.batch_size]  # whole batches (all rows when fewer)
                data.epoch = epoch
                if features is None:
                    loader = DataLoader(data, batch_size=settings.batch_size, sampler=order.tolist(),
                                        num_workers=settings.workers, collate_fn=partial(_collate, shape=shape),
                                        pin_memory=device.type == "cuda")
                else:
                    loader = _feature_batches(features, data.labels, order.numpy(), settings.batch_size)
                _set_modes(net, trained)
                losses, failed_now = [], 0
                for step, (images, labels, ok) in enumerate(loader):
                    global_step = (epoch - 1) * steps_per_epoch + step
                    for group in optimizer.param_groups:
                        group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))
                    torch.manual_seed(_seed(settings.seed, epoch, step, 1))  # dropout / drop path of this step
                    failed_now += int((~ok).sum())
                    if not ok.any():
                        bar.update(1)
                        continue
                    labels, ok = labels.to(device), ok.to(device)
                    with autocast(device, settings.precision):
                        if features is None:
                            logits = net(images.to(device, non_blocking=True)
                                         .contiguous(memory_format=torch.channels_last))
                        else:
                            logits = net.head(images.to(device))
                    loss = nn.functional.cross_entropy(logits.float()[ok], labels[ok])
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch} loss {np.mean(losses[-20:]):.3f}"
                                        + (f" val {best['accuracy'] * 100:.1f}% (best)" if best["epoch"] else ""))
                    if kill_after is not None and global_step + 1 >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                failed = max(failed, failed_now)
                accuracy, val_loss = evaluate(net)
                seconds += time.perf_counter() - started
                history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                                "val_accuracy": accuracy, "val_loss": val_loss,
                                "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started})
                if accuracy > best["accuracy"]:
                    best.update(epoch=epoch, accuracy=accuracy, model=copy.deepcopy(net.state_dict()))
                elif settings.patience is not None and epoch - best["epoch"] >= settings.patience:
                    stopped = epoch < settings.epochs
                bar.set_postfix_str(f"epoch {epoch} loss {history[-1]['loss'] or 0:.3f} val {accuracy * 100:.1f}% "
                                    f"(best {best['accuracy'] * 100:.1f}% at {best['epoch']})")
                payload = {"format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch,
                           "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict() if scaler is not None else {},
                           "history": json.dumps(history), "best_epoch": best["epoch"],
                           "best_accuracy": best["accuracy"], "best_model": best["model"], "seconds": seconds,
                           "initial_accuracy": best["initial"],
                           "failed_rows": failed, "stopped": stopped}
                write_atomic(checkpoint, lambda tmp: torch.save(payload, tmp))
    finally:
        bar.close()
    net.load_state_dict(best["model"])
    net.eval()
    return TrainResult(history=history, best_epoch=best["epoch"], best_val_accuracy=best["accuracy"],
                       initial_val_accuracy=best["initial"], stopped_early=stopped, seconds=seconds,
                       resumed_from=resumed_from,
                       trained_parameters=n_trained, failed_rows=failed, steps_per_epoch=steps_per_epoch)
