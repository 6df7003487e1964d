"""The package's imports go one way: losses → primitives → backends → extension, with no cycle.

Reads every module of ``contrastive_ops`` with ``ast`` (imports inside
functions included) and checks the edges against the layers below; also
that the loss modules import primitives, never each other (only the shared
private helpers ``losses._common`` and ``losses._present_first``).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "contrastive_ops"
PKG = "contrastive_ops"

# Rank of each layer: a module may import modules of its own rank or lower.
LAYERS: List[Tuple[str, int]] = [
    # the package's front: public API, modules, command line, benchmarking
    (PKG, 4), (f"{PKG}.nn", 4), (f"{PKG}.cli", 4), (f"{PKG}.__main__", 4), (f"{PKG}.benchmarking", 4),
    (f"{PKG}.losses", 3),
    (f"{PKG}.primitives", 2),
    (f"{PKG}.backends", 1),
    # the extension and the utilities every layer may use (they import none of the layers above)
    (f"{PKG}._ext", 0), (f"{PKG}._build_info", 0), (f"{PKG}._C", 0),
    (f"{PKG}._numerics", 0), (f"{PKG}._checks", 0), (f"{PKG}.distributed", 0), (f"{PKG}._version", 0),
]
LOSS_HELPERS = {f"{PKG}.losses._common", f"{PKG}.losses._present_first"}


def rank(module: str) -> int:
    """The rank of the most specific layer that holds ``module``."""
    best = None
    for prefix, r in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, r)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules that ``name`` imports (relative imports resolved; ``from x import m`` of a module m)."""
    is_pkg = path.name == "__init__.py"
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + "."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs)
            if len(subs) < len(node.names):  # some names are attributes of ``target`` itself
                out.add(target)
    out.discard(name)
    return out


def violations(edges: Dict[str, Set[str]]) -> List[str]:
    """Every edge that goes up a layer, and every import of a loss module by another loss module."""
    bad = []
    for src, dsts in sorted(edges.items()):
        for dst in sorted(dsts):
            if rank(dst) > rank(src):
                bad.append(f"{src} (rank {rank(src)}) imports {dst} (rank {rank(dst)})")
            elif (src.startswith(f"{PKG}.losses.") and dst.startswith(f"{PKG}.losses.")
                  and dst not in LOSS_HELPERS):
                bad.append(f"loss module {src} imports loss module {dst}")
    return bad


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The import cycles (each as a list of modules), found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


@pytest.fixture(scope="module")
def edges() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_every_module_is_in_a_layer(edges):
    for m in edges:
        rank(m)


def test_imports_go_down_the_layers(edges):
    assert violations(edges) == []


def test_no_import_cycle(edges):
    assert cycles(edges) == []


def test_the_primitives_are_what_the_losses_import(edges):
    """Sanity of the parser on the real tree: the losses reach the primitives, the primitives the backends."""
    assert f"{PKG}.primitives.sim_lse" in edges[f"{PKG}.losses.info_nce"]
    assert f"{PKG}.primitives.siglip_pairs" in edges[f"{PKG}.losses.siglip"]
    assert f"{PKG}.backends" in edges[f"{PKG}.primitives.sim_lse"]
    assert f"{PKG}._ext" in edges[f"{PKG}.backends._cext"]


def test_the_checks_catch_bad_graphs():
    """An upward edge, a loss importing a loss, and a cycle are each reported."""
    up = {f"{PKG}.primitives.sim_lse": {f"{PKG}.losses.info_nce"}}
    assert violations(up) and "imports" in violations(up)[0]
    sideways = {f"{PKG}.losses.supcon": {f"{PKG}.losses.multiview", f"{PKG}.losses._common"}}
    assert violations(sideways) == [f"loss module {PKG}.losses.supcon imports loss module {PKG}.losses.multiview"]
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycles(loop) == [["a", "b", "c", "a"]]


def test_relative_imports_resolve(tmp_path):
    """``from ..x import y`` in a package module and in a plain module resolve to the same targets."""
    mod = tmp_path / "m.py"
    mod.write_text("from .. import backends\nfrom ..primitives.sim_lse import sim_lse\nfrom ._common import unit\n")
    known = {f"{PKG}.backends", f"{PKG}.primitives.sim_lse", f"{PKG}.losses._common"}
    got = _imports(f"{PKG}.losses.m", mod, known)
    assert got == {f"{PKG}.backends", f"{PKG}.primitives.sim_lse", f"{PKG}.losses._common"}
