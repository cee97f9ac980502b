"""The layout's promises, read from the sources: no import cycle among the cce_inductor modules,
no private torch API outside cce_inductor/compat.py in production code (cce_inductor/,
lowering/, tools/), and a cache key that covers every source shaping the generated kernels and
nothing that only drives them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cce_inductor.lowering import cache

ROOT = Path(__file__).resolve().parent.parent
# checkout folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"cce_inductor": "cce_inductor", "lowering": "cce_inductor.lowering",
            "templates": "cce_inductor.templates", "tools": "cce_inductor.tools"}
PRODUCTION = ("cce_inductor", "lowering", "tools")
COMPAT = ROOT / "cce_inductor" / "compat.py"
PRIVATE_TORCH = re.compile(r"^torch(\.\w+)*\._[A-Za-z]")
# Private attributes of torch objects that the name rule cannot see.
PRIVATE_ATTRIBUTES = {"_cdata", "kineto_results", "_local_shard_size_and_offset"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The cce_inductor modules `path` imports, anywhere in it (lazy imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    targets = set()
    for name in names:
        while name.startswith("cce_inductor") and name not in known:
            name = name.rpartition(".")[0]
        if name in known:
            targets.add(name)
    return targets


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return groups


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    known = modules()
    edges = {name: imports(path, known) - {name} for name, path in known.items()}
    assert len(edges) > 20 and sum(map(len, edges.values())) > 50  # the walk found the code
    assert cycles(edges) == []


def private_uses(source: str) -> list[str]:
    """Private torch API in code (docstrings and comments are not code)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            if PRIVATE_TORCH.match(ast.unparse(node)) or node.attr in PRIVATE_ATTRIBUTES:
                uses.append(ast.unparse(node))
        elif isinstance(node, ast.Import):
            uses += [alias.name for alias in node.names if PRIVATE_TORCH.match(alias.name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            if PRIVATE_TORCH.match(node.module) or any(a.name.startswith("_") for a in node.names):
                uses.append(f"from {node.module} import ...")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings and PRIVATE_TORCH.match(node.value)):
            uses.append(repr(node.value))
    return uses


def test_private_api_finder_finds_uses():
    source = ('"""torch._dynamo in a docstring"""\nimport torch._inductor.config\n'
              'from torch.distributed import _functional_collectives\n'
              'torch._dynamo.reset()\nname = "torch._inductor.lowering"\nt.untyped_storage()._cdata\n')
    assert len(private_uses(source)) == 5


def test_private_torch_api_only_in_compat():
    paths = [path for folder in PRODUCTION for path in sorted((ROOT / folder).glob("*.py"))
             if path != COMPAT]
    assert len(paths) > 20
    found = {str(path.relative_to(ROOT)): uses for path in paths
             if (uses := private_uses(path.read_text()))}
    assert found == {}
    assert private_uses(COMPAT.read_text())  # the adapter is where they are


def test_cache_key_covers_what_shapes_the_kernels():
    files = {path.resolve() for path in cache.source_files()}
    assert COMPAT in files
    assert {path.resolve() for path in (ROOT / "lowering").glob("*.py")} <= files
    assert {path.resolve() for path in (ROOT / "templates").glob("*.py.jinja")} <= files
    assert not [path for path in files if path.parent.name in ("tools", "tests")]
