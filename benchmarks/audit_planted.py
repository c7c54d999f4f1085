"""audit on planted defects: near-duplicates copied across splits and labels flipped, on real images, measured
against the truth the audit never sees.

    python benchmarks/audit_planted.py fashion --work bench/audit/fashion   # Fashion-MNIST, 28 px
    python benchmarks/audit_planted.py photos  --work bench/audit/photos    # tiles of scikit-image's photographs

fashion: the first 5 000 train and 1 000 test images of Debian's dataset-fashion-mnist
(apt-get install dataset-fashion-mnist). photos: 160 px tiles cut without overlap from scikit-image's bundled
photographs (each photograph a class; tiles split 80/20 at random).

Planted (with settings of their own, not the audit's calibration copies): copies of train images written into
the test split, in equal numbers of four kinds -- JPEG re-encoded (quality 50-90), rescaled (80-95 %, or 120-200 %
for images under 64 px), cropped (2-10 % off one to four sides), mirrored -- and 3 % of the original rows'
labels flipped to another class uniformly (--flips similar: to a confusable class instead; Fashion-MNIST only).
The truth goes to WORK/truth.json, outside the image folder. Then lite0 (packaged weights) extracts the folder,
`audit` runs with its defaults, and the script prints:

- duplicates: recall of the planted pairs (per kind), and for the reported pairs that contain a planted copy,
  the share whose partner is the copy's true source; pairs among the original images (natural duplicates) are
  counted apart;
- label issues: the share of flipped rows among the k lowest label qualities (k = number of flips);
- the audit's own seconds per step;
- what --exclude-duplicates does to a kNN head (compare-heads, the full protocol): its test accuracy on all test
  rows, without the rows the audit marks as twinned, and on the clean test set (the original test rows only:
  the same comparison, excluding exactly the planted copies through a duplicates.csv written from the truth).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.fashion_mnist_to_folder import CLASSES, FASHION, read_idx  # noqa: E402

KINDS = ("jpeg", "rescale", "crop", "flip")
SIMILAR = {"t-shirt": "shirt", "shirt": "t-shirt", "pullover": "coat", "coat": "pullover", "sneaker": "sandal",
           "sandal": "sneaker", "boot": "sneaker", "dress": "coat", "trouser": "dress", "bag": "pullover"}


def fashion_images(train: int = 5000, test: int = 1000):
    """(images as PIL, class names, splits) of the first `train` and `test` Fashion-MNIST images."""
    from PIL import Image

    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} not found: apt-get install dataset-fashion-mnist")
    out = []
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        out += [(Image.fromarray(im), CLASSES[label], split) for im, label in zip(images, labels)]
    return out


def photo_tiles(side: int = 160, seed: int = 0):
    """Non-overlapping `side`-pixel tiles of scikit-image's bundled photographs (RGB), the photograph as label."""
    import skimage.data as data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "skin", "motorcycle_left", "lily", "eagle", "camera", "coins", "moon", "page", "grass", "gravel", "brick",
             "colorwheel", "logo", "text", "clock", "horse"]
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception:  # not bundled in this scikit-image (or needs pooch): skip it
            continue
        array = np.asarray(array)
        if array.dtype != np.uint8:
            array = (255 * (array.astype(float) / max(array.max(), 1))).astype(np.uint8)
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")
        w, h = image.size
        for y in range(0, h - side + 1, side):
            for x in range(0, w - side + 1, side):
                out.append((image.crop((x, y, x + side, y + side)), name, "train" if rng.random() < 0.8 else "test"))
    return out


def plant_copy(image, kind: str, rng: np.random.Generator) -> tuple[object, str]:
    """(copy, file extension) with the benchmark's own settings."""
    from PIL import Image, ImageOps

    w, h = image.size
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=int(rng.integers(50, 91)))
        return Image.open(io.BytesIO(buffer.getvalue())), ".jpg"
    if kind == "rescale":
        f = rng.uniform(0.8, 0.95) if min(w, h) >= 64 else rng.uniform(1.2, 2.0)
        return image.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS), ".png"
    if kind == "crop":
        sides = rng.choice(4, size=int(rng.integers(1, 5)), replace=False)
        cut = np.zeros(4, int)
        cut[sides] = np.maximum(1, (rng.uniform(0.02, 0.10, len(sides)) * np.array([w, h, w, h])[sides]).astype(int))
        return image.crop((cut[0], cut[1], w - cut[2], h - cut[3])), ".png"
    return ImageOps.mirror(image), ".png"


def build(work: Path, base, copies: int, flip_share: float, flips: str, seed: int) -> tuple[Path, dict]:
    """The image folder with planted defects and the truth about them."""
    rng = np.random.default_rng(seed)
    folder = work / "images"
    truth_path = work / "truth.json"
    if folder.exists() and truth_path.exists():
        return folder, json.loads(truth_path.read_text())
    classes = sorted({label for _, label, _ in base})
    tmp = work / "images.tmp"
    rows = []
    for i, (image, label, split) in enumerate(base):
        rows.append({"id": f"{split}/{{label}}/{i:06d}.png", "image": image, "label": label, "split": split})
    originals = np.arange(len(rows))
    flipped = rng.choice(originals, size=int(round(flip_share * len(rows))), replace=False)
    truth = {"flips": {}, "copies": [], "classes": classes}
    for i in flipped:
        given = rows[i]["label"]
        new = SIMILAR[given] if flips == "similar" else rng.choice([c for c in classes if c != given])
        truth["flips"][int(i)] = [given, str(new)]
        rows[i]["label"] = str(new)
    train = [i for i in originals if rows[i]["split"] == "train" and i not in truth["flips"]]
    sources = rng.choice(train, size=copies, replace=False)
    for n, i in enumerate(sources):
        kind = KINDS[n % len(KINDS)]
        copy, ext = plant_copy(rows[i]["image"], kind, rng)
        j = len(rows)
        rows.append({"id": f"test/{{label}}/{j:06d}{ext}", "image": copy, "label": rows[i]["label"], "split": "test"})
        truth["copies"].append({"copy": j, "source": int(i), "kind": kind})
    for r in rows:
        r["id"] = r["id"].format(label=r["label"])
        path = tmp / r["id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        r["image"].save(path, quality=95) if path.suffix == ".jpg" else r["image"].save(path)
    truth["ids"] = [r["id"] for r in rows]
    tmp.rename(folder)
    truth_path.write_text(json.dumps(truth))
    return folder, truth


def evaluate(out: Path, truth: dict) -> dict:
    ids = truth["ids"]
    with open(out / "duplicates.csv") as f:
        reported = [(r["id_a"], r["id_b"]) for r in csv.DictReader(f)]
    pairs = {frozenset(p) for p in reported}
    copy_of = {ids[c["copy"]]: ids[c["source"]] for c in truth["copies"]}
    found = {k: [] for k in KINDS}
    for c in truth["copies"]:
        found[c["kind"]].append(frozenset((ids[c["copy"]], ids[c["source"]])) in pairs)
    with_copy = [p for p in reported if p[0] in copy_of or p[1] in copy_of]
    right = [p for p in with_copy if copy_of.get(p[0]) == p[1] or copy_of.get(p[1]) == p[0]]
    natural = [p for p in reported if p[0] not in copy_of and p[1] not in copy_of]
    result = {"planted": len(truth["copies"]), "recall": float(np.mean(sum(found.values(), []))),
              "recall_by_kind": {k: float(np.mean(v)) for k, v in found.items()},
              "reported_with_copy": len(with_copy), "partner_is_source": len(right) / max(len(with_copy), 1),
              "natural_pairs": len(natural), "reported": len(reported)}
    if (out / "label_issues.csv").exists():
        with open(out / "label_issues.csv") as f:
            quality = [(r["id"], float(r["quality"]), r["issue"] == "1") for r in csv.DictReader(f)]
        flipped = {ids[int(i)] for i in truth["flips"]}
        k = len(flipped)
        ranked = [i for i, _, _ in sorted(quality, key=lambda r: r[1])]
        flagged = {i for i, _, issue in quality if issue}
        result["label_issues"] = {"flips": k, "top_k_share": len(flipped & set(ranked[:k])) / max(k, 1),
                                  "flagged": len(flagged), "flagged_precision": len(flagged & flipped) / max(len(flagged), 1),
                                  "flagged_recall": len(flagged & flipped) / max(k, 1)}
    return result


def exclusion(store: Path, work: Path, truth: dict) -> dict:
    """kNN's test accuracy: on all test rows, without the audit's twinned rows, and on the original test rows."""
    from pipelines.compare import compare_heads
    from pipelines.scoring import write_csv

    ids = truth["ids"]
    planted = work / "planted-pairs"  # an audit folder holding only the truth's pairs: excluding them = a clean set
    planted.mkdir(exist_ok=True)
    write_csv(planted / "duplicates.csv", ["id_a", "id_b", "split_a", "split_b", "cosine", "pixel", "cluster"],
              ([ids[c["copy"]], ids[c["source"]], "test", "train", "", "", n] for n, c in enumerate(truth["copies"])))
    out = {}
    for name, folder in (("audit", work / "audit"), ("clean", planted)):
        row = compare_heads([store], ["knn"], exclude_duplicates=folder, budget=None, progress=False).rows[0]
        out["all_test_rows"] = row["accuracy"]
        out["without_audit_twins" if name == "audit" else "clean_test_set"] = row["accuracy_without_twins"]
        if name == "audit":
            out["without_audit_twins_ci"] = row["accuracy_without_twins_ci"]
    return out


def main() -> None:
    from pipelines.auditing import audit
    from pipelines.extract import extract_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["fashion", "photos"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=None, help="planted copies [fashion 200, photos 40]")
    parser.add_argument("--flips", choices=["uniform", "similar"], default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = fashion_images() if args.dataset == "fashion" else photo_tiles()
    copies = args.copies or (200 if args.dataset == "fashion" else 40)
    folder, truth = build(work, base, copies, 0.03, args.flips, args.seed)
    store = work / "lite0.h5"
    if not store.exists():
        started = time.perf_counter()
        extract_features(str(folder), store, model="tf_efficientnet_lite0", weights="packaged", progress=True)
        print(f"extract: {time.perf_counter() - started:.1f} s")
    result = audit(store, work / "audit", progress=True)
    measured = evaluate(work / "audit", truth)
    measured.update(rows=result.rows, rule=result.duplicates["rule"], seconds=result.seconds, notes=result.notes)
    measured["knn"] = exclusion(store, work, truth)
    (work / "measured.json").write_text(json.dumps(measured, indent=2))
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
