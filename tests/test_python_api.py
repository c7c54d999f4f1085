"""The Python API: every exported name documented in docs/python-api.md, and every ``python`` code block of the
README and of that page runs as written (in one session per file, in a temporary folder; the backbone swapped for
timm's tiny test_resnet with random weights at 64 px, the only change, so the examples stay fast)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import pipelines

from conftest import ROOT

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)  # exactly "python": "python skip" is not run
TINY = {'model="tf_efficientnet_lite0", weights="packaged"': 'model="test_resnet", weights="random", image_size=64'}


def _blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def test_every_exported_name_is_documented():
    text = (ROOT / "docs" / "python-api.md").read_text()
    documented = set(re.findall(r"^### `(\w+)`", text, re.MULTILINE))
    assert documented == set(pipelines.__all__)
    for name in pipelines.__all__:
        assert getattr(pipelines, name) is not None


@pytest.mark.parametrize("page", ["README.md", "docs/python-api.md"])
def test_python_examples_run_as_written(page, tmp_path, monkeypatch):
    blocks = _blocks(ROOT / page)
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADBENCH_RUNTIME", "torch")
    namespace: dict = {"__name__": "__example__"}
    for i, code in enumerate(blocks):
        for real, tiny in TINY.items():
            code = code.replace(real, tiny)
        assert "tf_efficientnet_lite0" not in code or "run_benchmark" in code, f"{page} block {i}: swap the model"
        exec(compile(code, f"{page}:block{i}", "exec"), namespace)  # noqa: S102 -- our own documentation
    assert not os.environ.get("HEADBENCH_FAULT")


# Where each CLI option of a job's command goes when it is not the function parameter of the same name: another
# parameter (its Python name), "source_options" (the packed sources' options, one dict), or "cli: ..." (what
# only the shell needs). A new option, or a renamed parameter, fails the test until it is mapped here.
SOURCE_OPTIONS = {k: "source_options" for k in ("label_key", "image_column", "label_column", "split_column",
                                                "id_column")}
CLI_TO_PYTHON = {
    "extract": ("extract_features", {"compile_model": "compile", "ray_address": "ray", "quiet": "progress",
                                     **SOURCE_OPTIONS}),
    "compare-heads": ("compare_heads", {
        "stores": "store_paths", "head_names": "heads", "ray_address": "cli: joblib's Ray backend around the call",
        "out_dir": "cli: write_results(comparison, out_dir) and cache_dir=out_dir/.runs",
        "save_predictions": "cli: write_results(..., predictions=True)", "save_best": "cli: save_best_head",
        "exhaustive": "cli: budget=None", "quiet": "progress"}),
    "predict": ("predict_images", {"quiet": "progress", **SOURCE_OPTIONS}),
    "finetune": ("finetune", {"quiet": "progress", **SOURCE_OPTIONS}),
    "rank": ("rank_candidates", {"candidates": "specs", "all_rows": "cli: max_rows=None",
                                 "json_out": "cli: the rows as JSON", "quiet": "progress"}),
    "bench": ("run_benchmark", {"compile_model": "compile", "no_quality": "quality",
                                "json_out": "cli: the result as JSON"}),
    "bench-heads": ("run_heads_benchmark", {"n_rows": "n", "dim": "d", "cs": "Cs", "no_compare": "compare",
                                            "json_out": "cli: the result as JSON"}),
    "select-labels": ("select_labels", {"n_classes": "n_classes"}),
    "inspect": ("summarize_store", {"store": "path", "as_json": "cli: the summary as JSON"}),
}


@pytest.mark.parametrize("command", sorted(CLI_TO_PYTHON))
def test_every_cli_option_maps_to_a_parameter(command):
    import inspect

    import cli

    function, aliases = CLI_TO_PYTHON[command]
    parameters = set(inspect.signature(getattr(pipelines, function)).parameters)
    for option in cli.main.commands[command].params:
        target = aliases.get(option.name, option.name)
        assert target.startswith("cli: ") or target in parameters, \
            f"{command} {option.opts}: no parameter {target!r} of pipelines.{function}; map it in CLI_TO_PYTHON"
    for name in aliases:
        assert name in {o.name for o in cli.main.commands[command].params}, f"{command}: no option {name!r} any more"
