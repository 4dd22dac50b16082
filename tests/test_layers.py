"""The package's layers, read from its import graph: imports only go down, and no module imports itself back.

Layers, bottom to top (README, "How it works"): `core` (recipe schema, run folder, paths, readers, errors,
processes) -> `data` and `model` (side by side, neither imports the other) -> `serving` (merge, fidelity,
servability) -> `training` (the run) -> `commands` -> the command line (`cli`, `__main__`) and the public API
(`lora_causal/__init__.py`). Every import counts, also the ones inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_causal"
RANKS = {"core": 0, "data": 1, "model": 1, "serving": 2, "training": 3, "commands": 4, "": 5}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else ""


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (anywhere in its body)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name and t.startswith("lora_causal."))
        graph[name] = edges
    return graph


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if there == here:
                continue
            if RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} ({here or 'top'}) imports {target} ({there or 'top'})")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        folder = path.parent.relative_to(PACKAGE).as_posix()
        assert folder in ("." , *RANKS), f"{path}: a folder outside the layers {sorted(RANKS)}"


def test_imports_only_go_down():
    assert upward_edges(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_should():
    """The rules themselves, on a graph with one upward edge and one cycle."""
    graph = {
        "lora_causal.core.errors": {"lora_causal.training.run"},
        "lora_causal.training.run": {"lora_causal.core.errors"},
        "lora_causal.data.dataset": {"lora_causal.model.loading"},
        "lora_causal.model.loading": set(),
    }
    assert upward_edges(graph) == [
        "lora_causal.core.errors (core) imports lora_causal.training.run (training)",
        "lora_causal.data.dataset (data) imports lora_causal.model.loading (model)",
    ]
    assert cycles(graph) == [["lora_causal.core.errors", "lora_causal.training.run"]]


def test_modules_are_small_and_say_their_job():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {len(lines)} lines (at most {MAX_LINES})"
        if path.name != "__main__.py":
            assert ast.get_docstring(ast.parse("\n".join(lines))), f"{path.relative_to(PACKAGE)}: no docstring"


def test_the_public_api_loads_lazily_and_names_real_objects():
    """`import lora_causal` imports no torch; every public name resolves to the object its module defines."""
    import subprocess
    import sys

    code = ("import sys, lora_causal; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [n for n in lora_causal.__all__ if n != '__version__']; "
            "[getattr(lora_causal, n) for n in names]; print(len(names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 9
    import lora_causal
    from lora_causal.data.collator import CausalLMCollator

    assert lora_causal.CausalLMCollator is CausalLMCollator
    try:
        lora_causal.not_a_name  # noqa: B018
    except AttributeError as exc:
        assert "not_a_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_readme_module_map_names_every_module():
    """README's module table lists each module of the package once, and only modules that exist."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## How it works"):readme.index("**The collator's rules.**")]
    listed: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            listed.update(re.findall(r"`([a-z_/]+\.py)`", row.split(" | ")[0]))
    modules = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
               if path.name != "__init__.py" or path.parent == PACKAGE}
    assert sorted(modules - listed) == [], "modules missing from README's module map"
    assert sorted(listed - modules) == [], "README's module map names modules that do not exist"
