"""The package's imports: no module-level cycle, and no import, module-level or inside a function, that points up
the layers docs/design.md#dependencies states (the CLI alone may import everything)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vpgtrans": ROOT / "vpgtrans", "vpgtrans_adapters": ROOT / "vpgtrans_adapters"}


def _module_name(path: Path) -> str:
    for pkg, base in PACKAGES.items():
        if path.is_relative_to(base):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _edges(modules: dict[str, Path], *, local: bool = False) -> dict[str, set[str]]:
    """Module → project modules it imports at module level (top-level statements, incl. if/try blocks); with
    `local`, inside functions and classes too."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.If, ast.Try)) or (local and not isinstance(node, (ast.Import, ast.ImportFrom))):
                stack.extend(ast.iter_child_nodes(node))
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module)
                # `from pkg import submodule` depends on the submodule, not on pkg/__init__'s contents
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_module_level_imports_have_no_cycle():
    modules = {_module_name(p): p for base in PACKAGES.values() for p in base.rglob("*.py")}
    graph = _edges(modules)
    assert sum(len(v) for v in graph.values()) > 20, "the import graph looks empty: the scanner is broken"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_detects_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


# The layers of docs/design.md#dependencies: what each folder may import (the core is vpgtrans/*.py).
FOLDERS: dict[str, set[str]] = {
    "vpgtrans_adapters": {"core"},
    "data": {"core"},
    "train": {"core", "data"},
    "transfer": {"core", "data", "train"},
    "formats": {"core", "vpgtrans_adapters"},  # never transfer/: what both read lives in hf_dirs
    # transfer's token pairing scores the world's tokenizers; its stage-1 Q-Former is a recipe run (train, data)
    "world": {"core", "data", "train", "transfer"},
    "serve": {"core", "vpgtrans_adapters"},
}
# The core modules that sit above folders, and which; every other core module imports no folder and none of these.
CORE_ABOVE: dict[str, set[str]] = {
    "vpgtrans": {"transfer"},  # the public API, each name loaded on first use
    "vpgtrans.recipes": {"data", "train"},
    "vpgtrans.evaluation": {"data"},
    "vpgtrans.memory": {"data", "train"},
    "vpgtrans.surrogate": {"data", "train"},
    "vpgtrans.lmms_eval_plugin": {"data", "vpgtrans_adapters"},
    "vpgtrans.demo": {"world", "train", "transfer", "formats"},
}


def _group(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "vpgtrans_adapters":
        return "vpgtrans_adapters"
    if len(parts) > 1 and (ROOT / "vpgtrans" / parts[1]).is_dir():
        return parts[1]
    return "core"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers (the CLI is exempt: its commands import what they run)."""
    bad = []
    for module, targets in sorted(graph.items()):
        group = _group(module)
        if group == "cli":
            continue
        for target in sorted(targets):
            to = _group(target)
            if to == "cli":
                ok = False
            elif group == "core":
                ok = to == "core" and (target not in CORE_ABOVE or module in CORE_ABOVE) \
                    or to in CORE_ABOVE.get(module, set())
            else:
                ok = to in (group, *FOLDERS[group]) and (to != "core" or target not in CORE_ABOVE
                                                         or CORE_ABOVE[target] <= FOLDERS[group] | {group})
            if not ok:
                bad.append(f"{module} ({group}) imports {target} ({to})")
    return bad


def test_no_import_points_up_the_layers_not_even_inside_a_function():
    modules = {_module_name(p): p for base in PACKAGES.values() for p in base.rglob("*.py")}
    assert set(FOLDERS) | {"core", "cli"} == {_group(m) for m in modules}, "a folder is missing from FOLDERS"
    graph = _edges(modules, local=True)
    assert sum(len(v) for v in graph.values()) > sum(len(v) for v in _edges(modules).values()), \
        "function-local imports were not found: the scanner is broken"
    assert _upward(graph) == []


def test_the_layer_check_catches_what_issue_31_found():
    found = _upward({"vpgtrans.serve.app": {"vpgtrans.cli.generate"}, "vpgtrans.plot": {"vpgtrans.transfer.report"},
                     "vpgtrans.checkpoint": {"vpgtrans.recipes"}, "vpgtrans.data.cache": {"vpgtrans.memory"},
                     "vpgtrans.transfer.race": {"vpgtrans.plot", "vpgtrans.recipes"},
                     "vpgtrans.cli.x": {"vpgtrans.demo"}})
    assert found == ["vpgtrans.checkpoint (core) imports vpgtrans.recipes (core)",
                     "vpgtrans.data.cache (data) imports vpgtrans.memory (core)",
                     "vpgtrans.plot (core) imports vpgtrans.transfer.report (transfer)",
                     "vpgtrans.serve.app (serve) imports vpgtrans.cli.generate (cli)"]
