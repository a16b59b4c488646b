"""The package's modules import each other without cycles, and a worker
never imports the tooling.

Walks the source (module-level and function-local imports alike, without
importing anything), so a cycle hidden behind a function-local import counts.
The worker/tooling boundary is checked twice: on that graph (everything a
worker could ever reach), and by loading the plugin in a fresh interpreter
the way a vLLM worker does.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_ascend_ext"

KNOWN_CYCLES: list[list[str]] = []

#: Everything a vLLM worker never needs: the multi-node fixture, tiny models,
#: the local server, the demo, the CLI and planner, the image build gate.
TOOLING = f"{PACKAGE}.tools"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in (PACKAGE_ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts
    ``a.b`` where that is a module, else ``a``)."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, (path, is_pkg) in mods.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    names.add(full if full in mods else base)
        graph[mod] = {k for n in names if (k := known(n)) and k != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_walker_sees_a_function_local_cycle():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    # imported inside install_flashcomm2 only
    assert "vllm_ascend_ext.ops.tp_shard.storage" in import_graph()[
        "vllm_ascend_ext.models.flashcomm2_install"]


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], f"modules importing each other: {found}"


def test_one_torch_library_fragment():
    """Every custom op goes through custom_ops.register_custom_op, so the
    library and its re-registration guard exist once."""
    calls = []
    for mod, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "Library"):
                calls.append(mod)
    assert calls == ["vllm_ascend_ext.custom_ops"]


def _worker_roots() -> list[str]:
    """What a worker imports: the ``vllm.general_plugins`` entry point's module,
    then each model class module vLLM resolves from the registered names."""
    from importlib.metadata import entry_points

    from vllm_ascend_ext.models import MODEL_CLASSES

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == PACKAGE]
    assert ep.value == f"{PACKAGE}:register"
    return [ep.module, *sorted({target.split(":")[0] for target in MODEL_CLASSES.values()})]


def reachable(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    """Modules ``roots`` import, directly or not (a package counts its ``__init__``
    and every parent package, as Python imports them first)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.get(mod, ())
    return seen


def test_reachable_sees_parent_packages_and_transitive_imports():
    graph = {"p": set(), "p.a": {"p.b"}, "p.b": {"q"}, "q": set(), "p.c": set()}
    assert reachable(graph, ["p.a"]) == {"p", "p.a", "p.b", "q"}


def test_worker_import_graph_reaches_no_tooling():
    graph = import_graph()
    assert any(m.startswith(TOOLING + ".") for m in graph)  # the tooling exists
    worker = reachable(graph, _worker_roots())
    assert f"{PACKAGE}.models.flashcomm2_install" in worker  # the walk goes deep
    assert sorted(m for m in worker if m == TOOLING or m.startswith(TOOLING + ".")) == []


_LOAD_LIKE_A_WORKER = """
import importlib, json, sys
from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vllm_ascend_ext"]
ep.load()()
from vllm_ascend_ext.models import MODEL_CLASSES
for target in MODEL_CLASSES.values():
    module, cls = target.split(":")
    getattr(importlib.import_module(module), cls)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("vllm_ascend_ext"))))
"""


def test_loading_the_plugin_like_a_worker_imports_no_tooling():
    """A fresh interpreter runs the entry point's register() and imports every
    registered model class, as a vLLM worker does; no tooling module loads."""
    out = subprocess.run([sys.executable, "-c", _LOAD_LIKE_A_WORKER], capture_output=True,
                         text=True, timeout=300, cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert f"{PACKAGE}.models.flashcomm2_install" in loaded
    assert [m for m in loaded if m == TOOLING or m.startswith(TOOLING + ".")] == []
