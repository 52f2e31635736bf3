"""The package's layering contract, read from the source (every import counts: top level, inside functions, under
``if TYPE_CHECKING:``).

1. No import cycle among lora_ref's modules.
2. Packages import only downward, in the book's order (:data:`LAYERS`); a module may import modules of its own
   package, and ``lora_ref.errors`` may be imported from anywhere.
3. At most 8 Python files directly in ``lora_ref/``; every other module lives in a package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lora_ref"

# lowest first; a package may import from packages before it
LAYERS = ["errors", "threads", "heap", "quick", "files", "kernels", "quant", "autograd", "modeling", "adapters", "merging", "serving", "training",
          "analysis", "testing", "reference", "bench", "tour", "commands", "cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """lora_ref modules that ``path`` imports, wherever the statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("lora_ref"):
                while t not in known and "." in t:  # lora_ref.x.attr -> lora_ref.x
                    t = t.rpartition(".")[0]
                if t != name:
                    found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if m not in g or m == "lora_ref":
                continue
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE and (c := visit(m)):
                return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(g):
        if color[n] == WHITE and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_only_downward():
    bad = []
    for name, deps in graph().items():
        mine = layer(name)
        if mine is None:  # lora_ref/__init__.py: lazy names and the finder for old paths
            continue
        assert mine in LAYERS, f"{name}: package {mine!r} has no place in LAYERS"
        for d in deps:
            theirs = layer(d)
            if theirs is None or theirs == mine or theirs in ("errors", "threads", "quick"):
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{name} imports {d} ({theirs} is above {mine})")
    assert not bad, "\n".join(sorted(bad))


def test_the_library_imports_no_old_module_path():
    """Old paths (``lora_ref.llama``, ``from lora_ref import tensor`` …) resolve for users, but inside lora_ref
    they would hide an import from the layering checks above."""
    import lora_ref

    old = {f"lora_ref.{k}" for k in lora_ref.MOVED}
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if a.name in old]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if node.module in old or f"{node.module}.{a.name}" in old]
    assert not bad, "\n".join(bad)


def test_top_level_stays_small():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 8, top


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The contract's own machinery, on a made-up graph: it must see what it is there to see."""
    g = {"lora_ref.a.x": {"lora_ref.a.y"}, "lora_ref.a.y": {"lora_ref.a.z"}, "lora_ref.a.z": {"lora_ref.a.x"}}
    assert find_cycle(g) == ["lora_ref.a.x", "lora_ref.a.y", "lora_ref.a.z", "lora_ref.a.x"]
    assert find_cycle({"lora_ref.a.x": {"lora_ref.a.y"}, "lora_ref.a.y": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from lora_ref.kernels import matmul\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lora_ref.autograd.tensor\n")
    known = {"lora_ref.kernels.matmul", "lora_ref.autograd.tensor", "lora_ref.kernels"}
    assert imports_of("lora_ref.x.m", src, known) == {"lora_ref.kernels.matmul", "lora_ref.autograd.tensor"}


@pytest.mark.parametrize("old, new", [("llama", "modeling.llama"), ("lora", "adapters.lora"), ("fast", "kernels.switch"),
                                      ("memory_numpy", "analysis.memory_measure"), ("quant.fused", "quant.dequant_matmul")])
def test_old_module_paths_are_the_same_objects(old, new):
    import importlib

    assert importlib.import_module(f"lora_ref.{old}") is importlib.import_module(f"lora_ref.{new}")


def test_every_old_path_resolves_and_gradcheck_is_the_function():
    import importlib

    import lora_ref

    for old, new in lora_ref.MOVED.items():
        assert (ROOT / (new.replace(".", "/") + ".py")).is_file(), f"{old} -> {new}: no such module"
        assert importlib.import_module(f"lora_ref.{old}") is importlib.import_module(f"lora_ref.{new}")
    assert callable(lora_ref.gradcheck) and not isinstance(lora_ref.gradcheck, type(lora_ref))
