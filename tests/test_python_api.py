"""The Python API: every exported name documented in docs/python-api.md, and every ``python`` code block of the
README and of that page runs as written (in one session per file, in a temporary folder; the backbone swapped for
timm's tiny test_resnet with random weights, the only change, so the examples stay fast)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import pipelines

from conftest import ROOT

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)  # exactly "python": "python skip" is not run
TINY = {'model="tf_efficientnet_lite0", weights="packaged"': 'model="test_resnet", weights="random"'}


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
