"""No notebook assertion that cannot fail.

A chapter "ends each section with assertions of what it just showed", and the book build stops when one fails; an
assertion whose two sides are the same expression, or are both literals, or become so once the notebook's own
simple definitions are substituted (``ALPHA_RS = ALPHA / math.sqrt(4)`` then ``assert ALPHA_RS / math.sqrt(4) ==
ALPHA / 4``), shows nothing. This walks the code cells' syntax trees (no execution): each ``name = <arithmetic>``
definition is remembered in order, each ``assert`` comparison is expanded with them, and a comparison whose sides
are identical, or are arithmetic in literals and free names only and hold for random values of those names, is
flagged.
"""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
SAFE_CALLS = {"abs": abs, "round": round, "min": min, "max": max, "float": float, "int": int}
ARITH = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop,
         ast.Call, ast.Attribute)


def _arithmetic(node: ast.AST) -> bool:
    """Literals, names, + − × / ** etc., ``math.f(...)`` and abs/round/min/max: nothing computed by code under test."""
    for n in ast.walk(node):
        if not isinstance(n, ARITH):
            return False
        if isinstance(n, ast.Attribute) and not (isinstance(n.value, ast.Name) and n.value.id == "math"):
            return False
        if isinstance(n, ast.Call):
            f = n.func
            if n.keywords or not ((isinstance(f, ast.Name) and f.id in SAFE_CALLS)
                                  or (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                                      and f.value.id == "math")):
                return False
    return True


class _Substitute(ast.NodeTransformer):
    def __init__(self, defs: dict[str, ast.AST], depth: int = 0):
        self.defs, self.depth = defs, depth

    def visit_Name(self, node):
        if node.id in self.defs and self.depth < 20:
            return _Substitute(self.defs, self.depth + 1).visit(ast.parse(ast.unparse(self.defs[node.id]),
                                                                          mode="eval").body)
        return node


def _free_names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - set(SAFE_CALLS) - {"math"}


def _always_holds(compare: ast.Compare) -> bool:
    """Arithmetic sides only: does the comparison hold for random values of its free names (or with none)?"""
    names = sorted(set().union(*(_free_names(s) for s in [compare.left, *compare.comparators])))
    code = compile(ast.fix_missing_locations(ast.Expression(compare)), "<assert>", "eval")
    rnd = random.Random(0)
    for _ in range(5):
        env = {"math": math, **SAFE_CALLS, **{n: rnd.uniform(0.5, 5.0) for n in names}}
        try:
            ok = eval(code, env)  # noqa: S307 (arithmetic on literals and random floats only)
        except Exception:
            return False
        if not ok:
            # equality of floats after different rounding: compare Eq sides with a relative tolerance too
            if len(compare.ops) == 1 and isinstance(compare.ops[0], ast.Eq):
                try:
                    a, b = (eval(compile(ast.Expression(s), "<side>", "eval"), env)
                            for s in (compare.left, compare.comparators[0]))
                    if math.isclose(a, b, rel_tol=1e-12):
                        continue
                except TypeError:  # an exercise's empty answer (`x = None`) compared with a number
                    return False
            return False
    return True


def trivial_asserts(sources: list[str]) -> list[str]:
    """The ``assert`` comparisons in these code cells (in order) that cannot fail, as unparsed text."""
    defs: dict[str, ast.AST] = {}
    found = []
    for src in sources:
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(src)
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.stmt) or isinstance(n, ast.comprehension)),
                       key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
        for n in nodes:
            if isinstance(n, ast.Assign):
                simple = len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                for t in n.targets:
                    for name in ast.walk(t):
                        if isinstance(name, ast.Name):
                            defs.pop(name.id, None)
                if simple and _arithmetic(n.value):
                    defs[n.targets[0].id] = n.value
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.comprehension)):
                for name in ast.walk(n.target):
                    if isinstance(name, ast.Name):
                        defs.pop(name.id, None)
            elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                defs.pop(n.name, None)
            elif isinstance(n, ast.Assert) and isinstance(n.test, ast.Compare):
                test = _Substitute(defs).visit(ast.parse(ast.unparse(n.test), mode="eval").body)
                sides = [test.left, *test.comparators]
                same = any(ast.dump(a) == ast.dump(b) for a, b in zip(sides, sides[1:]))
                if same or (all(_arithmetic(s) for s in sides) and _always_holds(test)):
                    found.append(ast.unparse(n.test))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_notebook_assert_is_trivially_true(path):
    nb = nbformat.read(path, as_version=4)
    assert trivial_asserts([c.source for c in nb.cells if c.cell_type == "code"]) == []


@pytest.mark.parametrize("cells", [
    ["ALPHA = ex.BOOK['alpha']\nALPHA_RS = ALPHA / math.sqrt(4)\nassert ALPHA_RS / math.sqrt(4) == ALPHA / 4"],
    ["macs_merged = 512 * 1024 * 1024", "macs_unmerged = macs_merged + 512 * 8 * (1024 + 1024)\n"
     "assert abs(macs_unmerged / macs_merged - 1 - 8 * 2048 / 1024 ** 2) < 1e-12"],
    ["y = model(x)\nassert y.shape == y.shape"],
    ["assert 2 + 2 == 4"],
    ["n = 3\nm = 2 * n\nassert m == n + n"],
])
def test_the_scan_flags_assertions_that_cannot_fail(cells):
    assert len(trivial_asserts(cells)) == 1


@pytest.mark.parametrize("cells", [
    ["assert count_parameters(cfg) == 8_030_261_248"],
    ["ALPHA = 16\nassert scaling(run) == ALPHA / 4"],
    ["n = 3\nn = f(n)\nassert n == 3"],
    ["x = 2\nfor x in range(3):\n    pass\nassert x * 2 == 4"],
    ["ratio = 0.5\nassert abs(measured / ratio - 1) < 0.1"],
    ["answer = None  # your answer", "assert answer == 42"],
])
def test_the_scan_leaves_real_assertions_alone(cells):
    assert trivial_asserts(cells) == []
