"""The book's figure rule, enforced while the chapters execute: every figure has a title and labelled axes.

The rule (BRIEF of every chapter, checked here at run time, so a loop that draws twelve panels is checked panel by
panel):

- every matplotlib figure that has axes carries a **title**: a ``suptitle`` or the title of one of its axes;
- every **visible axes** (drawn with its axis on; a diagram's ``ax.axis("off")`` panels and colorbars are exempt)
  has an **x label and a y label** for each axis it shows. A label counts when it is the axes' own, the figure's
  ``supxlabel``/``supylabel``, or that of an axes sharing the axis (``sharex=True`` grids label the outer panels).

How it is enforced: `book/build.py` starts the notebook kernels with ``IPYTHONDIR`` pointing at a folder whose
startup file calls :func:`install`. That records every :class:`~matplotlib.figure.Figure` created, and registers an
IPython AST transformer that ends each cell with :func:`check_new_figures` (the cell's last expression is still
displayed as before). A figure that breaks the rule fails its cell with :class:`FigureRuleError`, so the notebook
fails and the build stops, naming the figure and what it lacks.
"""

from __future__ import annotations

import ast

CHECK_MODULE = "figure_rule"
LAST_VALUE = "__lora_ref_last_value__"

_created: list = []  # figures made since the last check (strong references, dropped at each check)
_installed = False


class FigureRuleError(AssertionError):
    """A figure without a title, or a visible axes without an x or y label."""


def _text(get) -> str:
    try:
        return (get() or "").strip()
    except AttributeError:
        return ""


def _shows(ax) -> bool:
    return ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"


def problems(fig) -> list[str]:
    """What ``fig`` lacks under the rule (empty: it passes). A figure with no axes passes (there is nothing drawn)."""
    axes = fig.get_axes()
    if not axes:
        return []
    found = []
    titled = _text(fig.get_suptitle) or any(ax.get_title(loc=loc).strip()
                                            for ax in axes for loc in ("left", "center", "right"))
    if not titled:
        found.append("no title (set a suptitle or an axes title)")
    sup = {"x": _text(fig.get_supxlabel), "y": _text(fig.get_supylabel)}
    for i, ax in enumerate(axes):
        if not _shows(ax):
            continue
        for name in ("x", "y"):
            axis = getattr(ax, f"{name}axis")
            if not axis.get_visible() or sup[name]:
                continue
            group = getattr(ax, f"get_shared_{name}_axes")().get_siblings(ax)
            if not any(getattr(other, f"get_{name}label")().strip() for other in group):
                what = ax.get_title().strip() or f"axes {i}"
                found.append(f"{what!r} has no {name} label")
    return found


def describe(fig) -> str:
    """``figure N ('its title')``, or, untitled, the labels of its first axes, so the reader can find it."""
    title = _text(fig.get_suptitle) or next((t for ax in fig.get_axes() if (t := ax.get_title().strip())), "")
    number = getattr(fig, "number", None)
    name = "a figure" if number is None else f"figure {number}"
    if title:
        return f"{name} ({title!r})"
    labels = [f"{a}={v!r}" for ax in fig.get_axes()[:1] for a, v in
              (("xlabel", ax.get_xlabel()), ("ylabel", ax.get_ylabel())) if v]
    return f"{name} (untitled{', first axes ' + ', '.join(labels) if labels else ''})"


def check_new_figures() -> None:
    """Check every figure created since the last call; raise :class:`FigureRuleError` listing what they lack."""
    figures = list(_created)
    _created.clear()
    bad = [f"{describe(fig)}: {'; '.join(p)}" for fig in figures if (p := problems(fig))]
    if bad:
        raise FigureRuleError("every figure in the book needs a title and labelled axes (book/_ext/figure_rule.py): "
                              + " | ".join(bad))


class CheckFiguresAtCellEnd(ast.NodeTransformer):
    """End every cell with ``check_new_figures()``; a final expression is kept as the cell's displayed value."""

    def visit_Module(self, node: ast.Module) -> ast.Module:
        check = ast.Expr(ast.Call(
            func=ast.Attribute(ast.Call(ast.Name("__import__", ast.Load()), [ast.Constant(CHECK_MODULE)], []),
                               "check_new_figures", ast.Load()),
            args=[], keywords=[]))
        body = list(node.body)
        if body and isinstance(body[-1], ast.Expr):
            last = body.pop()
            body += [ast.Assign([ast.Name(LAST_VALUE, ast.Store())], last.value), check,
                     ast.Expr(ast.Name(LAST_VALUE, ast.Load()))]
        else:
            body.append(check)
        node.body = body
        return ast.fix_missing_locations(node)


def install(shell) -> None:
    """Record every new Figure and check them at the end of each cell run by the IPython ``shell``."""
    global _installed
    from matplotlib.figure import Figure

    if not _installed:
        original = Figure.__init__

        def recording_init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _created.append(self)

        recording_init.__doc__ = original.__doc__
        Figure.__init__ = recording_init
        _installed = True
    if not any(isinstance(t, CheckFiguresAtCellEnd) for t in shell.ast_transformers):
        shell.ast_transformers.append(CheckFiguresAtCellEnd())


STARTUP = """# Written by book/build.py: the book's figure rule (book/_ext/figure_rule.py) in every notebook kernel.
import sys
sys.path.insert(0, {ext!r})
import figure_rule
figure_rule.install(get_ipython())
del sys, figure_rule
"""


def write_ipython_dir(folder, ext_dir) -> None:
    """Make ``folder`` an IPYTHONDIR whose default profile installs the rule at kernel start."""
    from pathlib import Path

    startup = Path(folder) / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-lora_ref_figure_rule.py").write_text(STARTUP.format(ext=str(ext_dir)))
