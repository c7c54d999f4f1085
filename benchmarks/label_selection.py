"""Which images to label, measured: learning curves of every label-selection strategy against random, the time
of select-labels on 60 000 rows, and the strategies at a million rows.

    python benchmarks/label_selection.py curves --work bench-select            # digits, lfw, Fashion-MNIST
    python benchmarks/label_selection.py timing --store bench-select/fashion-lite0.h5
    python benchmarks/label_selection.py scale --store bench-select/fashion-lite0.h5 --rows 1000000

curves: for each data set and representation (lite0 with its packaged ImageNet weights, and the pixels), the
CLI's own `compare-heads STORE --heads logreg --shots 1,2,4,8 --seeds 5 --selection random,typiclust,probcover,
kcenter,margin --out DIR`, written under --work/results/, and one Markdown table of every curve point with the
gain over random. Data sets (real, offline): scikit-learn's digits (its 75/25 split), scikit-image's lfw_subset
(100 faces, 100 non-faces; no test split), Fashion-MNIST (Debian's dataset-fashion-mnist: 60 000 train, 10 000
test; apt-get install dataset-fashion-mnist). Stores already in --work are reused.

timing: `python cli.py select-labels STORE --budget 100 --strategy S` for every strategy, wall time of the whole
command (start-up and reading the store included).

dims: the selection space's PCA width (128) against the store's full width, on its test rows.

scale: the store's rows repeated with a little Gaussian noise to --rows rows (real feature geometry, no
duplicates), then every strategy picks --budget rows, timed in this process (margin from 100 random labelled
rows; probcover's graph on its 100 000-row sample).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = "random,typiclust,probcover,kcenter,margin"


def _stores(work: Path) -> dict[str, Path]:
    """Extract (or reuse) lite0 and pixels stores of each data set under `work`."""
    from benchmarks.representations import _store
    from examples.fashion_mnist_to_folder import write_fashion, write_pngs

    out = {}
    sources = {"digits": "builtin:digits"}
    lfw = work / "lfw-images"
    if not lfw.exists():
        from skimage.data import lfw_subset

        write_pngs(work / "lfw-images.tmp", (lfw_subset() * 255).round().astype(np.uint8), np.repeat([0, 1], 100),
                   ["face", "not-face"])
        (work / "lfw-images.tmp").rename(lfw)
    sources["lfw"] = str(lfw)
    fashion = work / "fashion-images"
    if not fashion.exists() and Path("/usr/share/datasets/fashion-mnist").exists():
        write_fashion(fashion)
    if fashion.exists():
        sources["fashion"] = str(fashion)
    for name, source in sources.items():
        out[f"{name}-lite0"], _ = _store(work, f"{name}-lite0", source, model="tf_efficientnet_lite0",
                                         weights="packaged")
        size = {"fashion": 28, "lfw": 25}.get(name, 8)
        out[f"{name}-pixels"], _ = _store(work, f"{name}-pixels", source, model="pixels", grayscale=True,
                                          image_size=size, crop_pct=1.0)
    return out


def curves(args) -> None:
    stores = _stores(args.work)
    table = ["| data set | representation | strategy | 1 per class | 2 per class | 4 per class | 8 per class |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, store in stores.items():
        if args.only and name not in args.only.split(","):
            continue
        out = args.work / "results" / name
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "compare-heads", str(store), "--heads", "logreg",
                        "--shots", "1,2,4,8", "--seeds", str(args.seeds), "--selection", STRATEGIES,
                        "--budget", "8", "--out", str(out), "--quiet"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        rows = json.loads((out / "results.json").read_text())["learning_curve"]
        rows = [r for r in rows if r.get("selection") and r["accuracy"] is not None]
        summary[name] = {"seconds": seconds, "rows": rows}
        data, rep = name.split("-")
        for strategy in STRATEGIES.split(","):
            cells = []
            for k in (1, 2, 4, 8):
                r = next((r for r in rows if r["selection"] == strategy and r["shots"] == k), None)
                if r is None:
                    cells.append("–")
                    continue
                text = f"{r['accuracy'] * 100:.1f}"
                if r.get("gain_vs_random") is not None:
                    gain = f"{r['gain_vs_random'] * 100:+.1f} [{r['gain_ci'][0] * 100:+.1f}, {r['gain_ci'][1] * 100:+.1f}]"
                    text += f" ({'**' + gain + '**' if r['gain_ci'][0] > 0 else gain})"
                else:
                    text += f" [{r['accuracy_ci'][0] * 100:.1f}, {r['accuracy_ci'][1] * 100:.1f}]"
                cells.append(text)
            table.append(f"| {data} | {rep} | {strategy} | " + " | ".join(cells) + " |")
        print(f"{name}: {seconds:.0f} s", flush=True)
    (args.work / "label_selection.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(table))
    figure(args)


def figure(args) -> None:
    """One panel per data set and representation, one line per strategy (random dashed), from the results of
    `curves`: --work/label_selection.png (docs/images/label-selection.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.plots import selection_panel

    names = [n for n in ("digits-lite0", "lfw-lite0", "fashion-lite0", "digits-pixels", "lfw-pixels", "fashion-pixels")
             if (args.work / "results" / n / "results.json").exists()]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), dpi=90, squeeze=False)
    for ax, name in zip(axes.flat, names):
        document = json.loads((args.work / "results" / name / "results.json").read_text())
        rows = [r for r in document["learning_curve"] if r.get("selection")]
        selection_panel(ax, rows, STRATEGIES.split(","), len(document["meta"]["classes"]), args.seeds)
        ax.set_title(name.replace("-", ", "), fontsize=10)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("label selection vs random: logistic regression trained on the picked rows", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.work / "label_selection.png")
    print(f"wrote {args.work / 'label_selection.png'}")


def timing(args) -> None:
    for strategy in STRATEGIES.split(","):
        extra = []
        if strategy == "margin":  # margin extends labelled rows: 100 random ones, labels from the store
            from featurize.store import read_store

            meta = read_store(args.store, features=False)
            pool = np.flatnonzero((meta.split != "test") & meta.ok)
            rows = np.random.default_rng(0).choice(pool, 100, replace=False)
            labeled = args.work / "labeled.csv"
            labeled.parent.mkdir(parents=True, exist_ok=True)
            labeled.write_text("id\n" + "\n".join(str(meta.ids[r]) for r in rows) + "\n")
            extra = ["--labeled", str(labeled)]
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "select-labels", str(args.store), "--budget",
                        str(args.budget), "--strategy", strategy, "--out", str(args.work / f"to_label-{strategy}.csv"),
                        *extra], check=True, cwd=ROOT)
        print(f"{strategy}: {time.perf_counter() - started:.1f} s wall (the whole command)", flush=True)


def scale(args) -> None:
    from featurize.store import read_store
    from heads.selection import SelectionSpace, select

    store = read_store(args.store)
    X = store.features[(store.split != "test") & store.ok].astype(np.float32)
    y = store.labels[(store.split != "test") & store.ok]
    rng = np.random.default_rng(0)
    reps = -(-args.rows // len(X))
    big = np.empty((args.rows, X.shape[1]), dtype=np.float32)
    spread = X.std(axis=0).mean() * 0.1
    for i in range(reps):
        part = big[i * len(X):(i + 1) * len(X)]
        part[:] = X[:len(part)] + rng.normal(0, spread, size=(len(part), X.shape[1])).astype(np.float32)
    labels = np.tile(y, reps)[:args.rows]
    del X
    started = time.perf_counter()
    space = SelectionSpace(big)
    print(f"{args.rows} x {big.shape[1]}: selection space (L2, PCA to {space.X.shape[1]}) {time.perf_counter() - started:.1f} s",
          flush=True)
    del big
    labeled = rng.choice(args.rows, 100, replace=False)
    for strategy in STRATEGIES.split(","):
        started = time.perf_counter()
        if strategy == "margin":
            picks = select(space, args.budget, strategy, labeled=labeled, y_labeled=labels[labeled], seed=0)
        else:
            picks = select(space, args.budget, strategy, seed=0, n_classes=len(store.classes))
        print(f"{strategy}: {time.perf_counter() - started:.1f} s; {picks.summary}", flush=True)


def dims(args) -> None:
    """The selection space's PCA width against the full one: the same rounds (1, 2, 4 labels per class) in
    both, one fixed probe (standardise + logistic regression at its default C) on the picks, the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurize.store import read_store
    from heads.selection import SelectionSpace
    from pipelines.curves import draw_selection

    store = read_store(args.store)
    train = store.ok & (store.split != "test") & (store.labels >= 0)
    test = store.ok & (store.split == "test")
    X, y = store.features[train].astype(np.float32), store.labels[train]
    X_test, y_test = store.features[test].astype(np.float32), store.labels[test]
    n_classes = len(np.unique(y))
    budgets = [k * n_classes for k in (1, 2, 4)]
    for width in (128, X.shape[1]):
        started = time.perf_counter()
        space = SelectionSpace(X, dims=width)
        for strategy in ("typiclust", "probcover", "kcenter"):
            scores = []
            for seed in range(args.seeds):
                picks, _, _ = draw_selection(space, y, budgets, strategy, seed, n_classes)
                scores.append([make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
                    X[p], y[p]).score(X_test, y_test) if len(np.unique(y[p])) > 1 else np.mean(y_test == y[p][0])
                    for p in picks])
            mean = np.mean(scores, axis=0) * 100
            print(f"dims {space.X.shape[1]:>5} {strategy:<10} " + "  ".join(
                f"{k} per class {m:.1f}" for k, m in zip((1, 2, 4), mean)), flush=True)
        print(f"dims {space.X.shape[1]}: {time.perf_counter() - started:.0f} s; probcover radius "
              f"{space.radius(n_classes):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["curves", "figure", "timing", "scale", "dims"])
    parser.add_argument("--work", type=Path, default=Path("bench-select"))
    parser.add_argument("--store", type=Path, help="timing, scale, dims: the store")
    parser.add_argument("--only", help="curves: data-set-representation names, e.g. digits-lite0,lfw-pixels")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    {"curves": curves, "figure": figure, "timing": timing, "scale": scale, "dims": dims}[args.what](args)


if __name__ == "__main__":
    main()
