"""The layering of docs/architecture.md, checked on the source: an acyclic import graph, a core that imports
neither argparse, MLflow, Optuna nor the layers above it, imports at the top of modules, short modules.

The graph is read from the syntax tree, so function-local imports count like any other; plugin loading by
name (``importlib.import_module`` of ``prunebench.methods`` and entry points) is dynamic by design and is
not an import edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"prunebench": ROOT / "prunebench", "prunebench.methods": ROOT / "methods"}
CORE_FORBIDDEN = ("argparse", "mlflow", "optuna", "prunebench.tracking", "prunebench.commands", "prunebench.cli")
OPTIONAL = ("ray", "onnxruntime", "onnx", "psycopg", "triton")  # may be imported inside a function
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a name imported from a module resolves to the module)
    local: bool  # inside a function or method


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "prunebench" and parts[:1] == ["methods"]:
                continue
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """``name`` if it is a module of the project, else its longest module prefix (or ``name`` itself)."""
    probe = name
    while probe:
        if probe in MODULES:
            return probe
        probe = probe.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(module, _resolve(a.name), local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base]) if base else ".".join(parent)
                if base == "__future__":
                    continue
                for a in child.names:
                    full = f"{base}.{a.name}"
                    out.append(Import(module, _resolve(full) if full in MODULES else _resolve(base), local))
            visit(child, inner)

    visit(tree, False)
    return out


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    if module == "prunebench.__main__":
        return "cli"
    for layer in ("prunebench.cli", "prunebench.commands", "prunebench.tracking", "prunebench.methods"):
        if module == layer or module.startswith(layer + "."):
            return layer.rpartition(".")[2]
    return "core"


def _cycle() -> list[str] | None:
    graph = {
        m: sorted({i.target for i in imps if i.target in MODULES and i.target != m}) for m, imps in IMPORTS.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for m in graph:
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_the_walk_sees_the_whole_package() -> None:
    assert {"prunebench.engine", "prunebench.tracking.schema", "prunebench.methods.oicsr", "prunebench.cli"} <= set(
        MODULES
    )
    probe = _imports("prunebench.x", Path(__file__))
    assert Import("prunebench.x", "ast", False) in probe
    local = _imports("prunebench.cli.run", MODULES["prunebench.cli.run"])  # the cli loads a command when it runs
    assert any(i.local and i.target.startswith("prunebench.commands") for i in local)


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_imports_neither_argparse_mlflow_optuna_nor_the_layers_above() -> None:
    bad = [
        f"{i.module} imports {i.target}"
        for imps in IMPORTS.values()
        for i in imps
        if _layer(i.module) == "core" and i.target.startswith(CORE_FORBIDDEN)
    ]
    assert not bad, bad


def test_each_layer_imports_only_the_layers_below() -> None:
    allowed = {
        "core": {"core"},
        "methods": {"core", "methods"},
        "tracking": {"core", "tracking"},
        "commands": {"core", "tracking", "commands"},
        "cli": {"core", "cli", "commands"},
    }
    bad = [
        f"{i.module} ({_layer(i.module)}) imports {i.target} ({_layer(i.target)})"
        for imps in IMPORTS.values()
        for i in imps
        if i.target in MODULES and _layer(i.target) not in allowed[_layer(i.module)]
    ]
    assert not bad, bad
    argparse_users = sorted({i.module for imps in IMPORTS.values() for i in imps if i.target == "argparse"})
    assert all(_layer(m) == "cli" for m in argparse_users), argparse_users


def test_imports_are_at_the_top_except_optional_dependencies_and_the_cli_loading_a_command() -> None:
    bad = [
        f"{i.module} imports {i.target} inside a function"
        for imps in IMPORTS.values()
        for i in imps
        if i.local and _layer(i.module) != "cli" and not i.target.startswith(OPTIONAL)
    ]
    assert not bad, bad


def test_no_module_is_longer_than_the_limit() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_a_cycle_is_found_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dict(IMPORTS)
    fake["prunebench.errors"] = [*IMPORTS["prunebench.errors"], Import("prunebench.errors", "prunebench.engine", True)]
    monkeypatch.setitem(globals(), "IMPORTS", fake)
    assert _cycle() is not None
