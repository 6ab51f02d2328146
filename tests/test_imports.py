"""The package's import structure: no module imports another that (directly or through others)
imports it back, every module imports on its own, and importing synfoc changes nothing process-wide.

The graph is read from the sources with ``ast``, lazy imports inside functions included (they are
the ones that hide cycles), and a module named in a string (``__import__("synfoc.report")``, the
CLI's verb table) counts as imported. docs/architecture.md describes the layers it enforces.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synfoc"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path, tree: ast.AST, modules) -> set[str]:
    """The modules of ``modules`` that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:   # `from pkg import submodule` imports the submodule
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            found.add(node.value)    # a dynamic import by name ("synfoc" alone is also the method)
    return {name for name in found if name in modules and name != module}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {m: imported_names(m, p, ast.parse(p.read_text()), modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none (depth-first search)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None   # a diamond is no cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_lazy_and_dynamic_imports_count(tmp_path):
    """A cycle closed by an import inside a function or by a module named in a string is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n")
    (pkg / "top.py").write_text("from pkg import low\nfrom pkg.sub.leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("from .. import low\ndef f():\n    return 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.top"] == {"pkg.low", "pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.low"}
    assert find_cycle(graph) is None
    (pkg / "low.py").write_text("def g():\n    from pkg.top import f\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.low", "pkg.top", "pkg.low"]
    (pkg / "low.py").write_text("VERBS = ['pkg.sub.leaf']\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.low", "pkg.sub.leaf", "pkg.low"]


def test_synfoc_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "synfoc.train" in graph and graph["synfoc.cli"]   # the scan did read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_module_imports_on_its_own():
    """In a fresh interpreter each module is imported with no synfoc module loaded before it (the
    third-party libraries stay loaded between modules: they are not what can go wrong here)."""
    modules = sorted(m for m in module_files(PACKAGE) if m != "synfoc.__main__")
    out = _run(f"""
        import importlib, sys, traceback
        failed = []
        for name in {modules!r}:
            for loaded in [m for m in sys.modules if m == "synfoc" or m.startswith("synfoc.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failed.append(name + ": " + traceback.format_exc(limit=-2))
        print("\\n".join(failed) or "ok")
    """)
    assert out.strip() == "ok", out


def test_importing_synfoc_leaves_the_environment_alone():
    """Process-wide settings (OMP_WAIT_POLICY, the allocator) are the command line's to make:
    ``import synfoc`` and ``import synfoc.train`` change no environment variable. The third-party
    libraries synfoc imports are loaded first, so that only synfoc's own doing is measured."""
    third_party = sorted({name.split(".")[0] for path in module_files(PACKAGE).values()
                          for node in ast.walk(ast.parse(path.read_text()))
                          for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                                       [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
                          if name and not name.startswith("synfoc")} - set(sys.builtin_module_names))
    out = _run(f"""
        import importlib, os
        for name in {third_party!r}:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        before = dict(os.environ)
        import synfoc
        after_package = dict(os.environ)
        import synfoc.train
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(after_package == before, changed)
    """)
    assert out.strip() == "True []", out
