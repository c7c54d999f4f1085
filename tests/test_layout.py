"""The house: no import circles among the project's modules (function-level imports included), and no module
reaches for another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurize", "heads", "pipelines")


def _modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, resolved to project modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if base in modules:
                out.append((base, [n for n in names if f"{base}.{n}" not in modules]))
            out += [(m, []) for m in submodules]
    return [(m, names) for m, names in out if m != name]


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_circles():
    modules, graph = _graph()
    edges = {name: {m for m, _ in imports if not (name.startswith(m + ".") and modules[m].name == "__init__.py")}
             for name, imports in graph.items()}  # a module may use its own package's __init__ (the registry)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_reach_for_private_names_across_modules():
    _, graph = _graph()
    reaches = [f"{name} takes {m}.{n}" for name, imports in graph.items() for m, names in imports for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not reaches, "\n".join(reaches)


def test_the_cli_stands_on_the_public_api():
    """cli.py takes featurize's and heads' exported names only (package level), and the pipelines' jobs: a
    notebook has everything the CLI has."""
    modules, graph = _graph()
    reaches = [m for m, _ in graph["cli"] if m.split(".")[0] in ("featurize", "heads") and "." in m]
    assert not reaches, reaches
    import featurize
    import heads

    for package, names in (("featurize", featurize.__all__), ("heads", heads.__all__)):
        taken = {n for m, imported in graph["cli"] if m == package for n in imported}
        assert taken <= set(names), f"cli.py takes {sorted(taken - set(names))} that {package} does not export"
