"""Candidates: the representations compare-heads, rank and predict work on, named on the command line.

* ``STORE.h5`` -- the store's default features (``/features``, the pooled pre-logits: layer ``last``);
* ``STORE.h5:LAYER`` -- one stored layer (``/layers/LAYER``; ``last`` names the default);
* ``STORE.h5:all`` -- every representation the store holds, each its own candidate;
* ``STORE.h5:concat`` -- all of them side by side, each block standardised inside the head
  (:class:`heads.blocks.BlockStandardScaler`).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurize.store import LAST_LAYER, FeatureStore, StoreError, read_features, read_store
from heads import HeadsError

__all__ = ["Candidate", "parse_candidates", "align_stores", "distinct_stores", "usable_rows", "layer_candidates",
           "concat_candidate", "name_candidates", "LAST", "ALL", "CONCAT"]

LAST, ALL, CONCAT = LAST_LAYER, "all", "concat"


@dataclass
class Candidate:
    """One representation: a store (metadata; matrices read on demand) and which of its layers.

    Attributes:
        spec: as given on the command line (``all`` expanded).
        store: the store, read without its feature matrix.
        layer: ``last``, a stored layer's name, or ``concat``.
        name: unique display name: the backbone, ``:LAYER`` unless last, and the file's stem when two stores
            share a backbone.
    """

    spec: str
    store: FeatureStore
    layer: str
    name: str = ""
    parts: tuple[str, ...] | None = None  # concat: the representations side by side (None: every stored one)

    @property
    def backbone(self) -> str:
        return str(self.store.attrs.get("backbone", self.store.path.stem))

    @property
    def blocks(self) -> list[str]:
        """The representations read, in column order: one, or every stored one for ``concat``."""
        if self.layer != CONCAT:
            return [self.layer]
        return list(self.parts) if self.parts else [LAST, *self.store.layer_names]

    @property
    def block_widths(self) -> tuple[int, ...] | None:
        """Column widths of the blocks of a ``concat`` candidate (None for a single representation)."""
        if self.layer != CONCAT:
            return None
        widths = {LAST: int(self.store.shape[1]), **{t["name"]: int(t["width"]) for t in self.store.layers}}
        return tuple(widths[b] for b in self.blocks)

    @property
    def width(self) -> int:
        if self.layer == LAST:
            return int(self.store.shape[1])
        if self.layer == CONCAT:
            return sum(self.block_widths)
        return next(int(t["width"]) for t in self.store.layers if t["name"] == self.layer)

    def load(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The candidate's features of `rows` (a boolean mask; all when None), float32."""
        parts = [read_features(self.store, block, rows).astype(np.float32) for block in self.blocks]
        return parts[0] if len(parts) == 1 else np.hstack(parts)


def _differs(a: np.ndarray, b: np.ndarray) -> int | None:
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if len(diff) else None


def align_stores(stores: list[FeatureStore]) -> None:
    """Refuse stores that do not describe the same samples (same ids, labels, splits and classes, in order).

    Raises:
        HeadsError: naming the first difference.
    """
    ref = stores[0]
    for other in stores[1:]:
        a, b = ref.path.name, other.path.name
        what = f"stores {a} and {b} describe different samples"
        if len(ref.ids) != len(other.ids):
            raise HeadsError(f"{what}: {len(ref.ids)} rows vs {len(other.ids)}; extract both from the same source")
        if ref.classes != other.classes:
            raise HeadsError(f"{what}: classes {ref.classes[:5]} vs {other.classes[:5]}")
        row = _differs(ref.ids, other.ids)
        if row is not None:
            raise HeadsError(f"{what}: row {row} is {ref.ids[row]!r} in {a} but {other.ids[row]!r} in {b}")
        row = _differs(ref.labels, other.labels)
        if row is not None:
            raise HeadsError(f"{what}: {ref.ids[row]!r} has label {ref.labels[row]} in {a} but {other.labels[row]} in {b}")
        row = _differs(ref.split, other.split)
        if row is not None:
            raise HeadsError(
                f"{what}: {ref.ids[row]!r} is in split {ref.split[row]!r} in {a} but {other.split[row]!r} in {b}"
            )


def _split(spec: str) -> tuple[Path, str]:
    """A path and a layer: the spec itself when it names an existing file, else what follows the last ':'."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), LAST
    path, layer = spec.rsplit(":", 1)
    return Path(path), layer or LAST


def parse_candidates(specs: list[str | os.PathLike], task: str | None = None) -> list[Candidate]:
    """Turn ``STORE.h5[:LAYER|:all|:concat]`` arguments into candidates, reading each store's metadata once;
    with `task`, the stores' labels and classes are that label set's (:meth:`FeatureStore.with_task`).

    Raises:
        StoreError: a store that is missing or unreadable, a layer it does not hold (naming those it does),
            ``concat`` on a store without layers, a task it does not have.
        HeadsError: no candidates, or the same candidate twice.
    """
    if not specs:
        raise HeadsError("give at least one feature store")
    stores: dict[Path, FeatureStore] = {}
    out: list[Candidate] = []
    for raw in map(str, specs):
        path, layer = _split(raw)
        key = path.resolve()
        if key not in stores:
            stores[key] = read_store(path, features=False).with_task(task)
        store = stores[key]
        if layer == ALL:
            out += [Candidate(f"{path}:{name}", store, name) for name in [LAST, *store.layer_names]]
            continue
        if layer == CONCAT and not store.layer_names:
            raise StoreError(f"{path} holds no layers to concatenate; extract it with --layers stages first")
        if layer not in (LAST, CONCAT) and layer not in store.layer_names:
            have = ", ".join([LAST, *store.layer_names, ALL] + ([CONCAT] if store.layer_names else []))
            raise StoreError(f"{path} has no layer {layer!r}; use one of: {have}")
        out.append(Candidate(raw, store, layer))
    seen = collections.Counter((c.store.path.resolve(), c.layer) for c in out)
    twice = next((c for c in out if seen[(c.store.path.resolve(), c.layer)] > 1), None)
    if twice is not None:
        raise HeadsError(f"candidate {twice.spec} is given twice")
    _name(out)
    return out


def layer_candidates(candidate: Candidate) -> list[Candidate]:
    """A store's default features and each of its stored layers, as single candidates (the store's own when it
    holds no layers)."""
    return [candidate] + [Candidate(f"{candidate.store.path}:{name}", candidate.store, name)
                          for name in candidate.store.layer_names]


def concat_candidate(store: FeatureStore, parts: list[str]) -> Candidate:
    """The representations `parts` of `store` side by side (in the store's order: the last layer first)."""
    order = [LAST, *store.layer_names]
    parts = sorted(set(parts), key=order.index)
    return Candidate(f"{store.path}:concat", store, CONCAT, parts=tuple(parts))


def name_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Give candidates made in code (not parsed) their display names; returns them."""
    _name(candidates)
    return candidates


def distinct_stores(candidates: list[Candidate]) -> list[FeatureStore]:
    """The stores behind the candidates, each once, in order."""
    return list({id(c.store): c.store for c in candidates}.values())


def usable_rows(stores: list[FeatureStore]) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, usable): rows with a label, and rows with a label and status ok in every store.

    Raises:
        HeadsError: the stores describe different samples, or no row is usable.
    """
    align_stores(stores)
    ref = stores[0]
    labeled = ref.labels >= 0
    usable = labeled & np.logical_and.reduce([s.ok for s in stores])
    if not usable.any():
        what = "no labeled rows" if not labeled.any() else "no labeled rows with status ok in every store"
        raise HeadsError(f"nothing to compare: {ref.path.name} has {what}")
    return labeled, usable


def _name(candidates: list[Candidate]) -> None:
    """Display names: ``backbone[:layer]``, with the store's file stem added where two stores share a backbone."""
    stores_per_backbone = collections.defaultdict(set)
    for c in candidates:
        stores_per_backbone[c.backbone].add(c.store.path.resolve())
    for c in candidates:
        base = c.backbone if len(stores_per_backbone[c.backbone]) == 1 else f"{c.backbone} ({c.store.path.stem})"
        layer = f"concat({'+'.join(c.parts)})" if c.parts else c.layer
        c.name = base if c.layer == LAST else f"{base}:{layer}"
    names = collections.Counter(c.name for c in candidates)
    for c in candidates:  # same backbone and file name in two folders: the path tells them apart
        if names[c.name] > 1:
            c.name = str(c.store.path) if c.layer == LAST else f"{c.store.path}:{c.layer}"
