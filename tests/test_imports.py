"""No import circles in flashlm: every module imports on its own, first, in a fresh process, and the
graph of imports between flashlm modules (including imports inside functions) has no cycle."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flashlm

SRC = Path(flashlm.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the flashlm package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """flashlm modules that ``name`` imports anywhere (module level or inside functions), except
    under ``if TYPE_CHECKING:`` (annotations only, never run). A package's ``__init__`` counts only
    where a name is taken from it: importing ``pkg.sub`` runs ``pkg/__init__`` first in any case, and
    its own ``from . import sub`` is how a package is built, not a circle."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()  # `from pkg import submodule`
            found.update(subs)
            if len(subs) < len(node.names):  # a name defined in pkg itself: its __init__ must have run
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # the scanner sees the edges it must (a test of the test): generation uses the sampling module
    assert ("flashlm.generation.sampling" in graph["flashlm.generation.loop"]
            and "flashlm.generation.sampling" in graph["flashlm.generation.cuda_graph"])
    cycles = _cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {sorted(graph[a] & set(c))}" for a in c)
              for c in cycles]
    assert cycles == [], "import circles:\n" + "\n".join(detail)


# One fresh interpreter imports torch (and triton, if present) once, then forks one child per flashlm
# module, which imports that module first: no flashlm module is loaded before it, so a circle through
# module-level imports fails as an ImportError (a partially initialized module) in that child.
_ISOLATED = textwrap.dedent("""
    import importlib, importlib.util, os, sys, traceback
    import torch
    if importlib.util.find_spec("triton") is not None:
        import triton
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("FAILED", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_first_in_a_fresh_process():
    if not hasattr(os, "fork"):
        import pytest

        pytest.skip("needs os.fork")
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _ISOLATED, *names], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
