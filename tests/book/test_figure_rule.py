"""The book's figure rule (book/_ext/figure_rule.py): every figure titled, every visible axes labelled.

First the rule on figures made here (what passes, what fails and why), then the hook as the book build installs it:
a real kernel started with the IPYTHONDIR that book/build.py writes, executing a small notebook, must fail the cell
that draws a bad figure and leave every other cell, and the value a cell displays, as they were.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import nbformat
import pytest
from matplotlib.figure import Figure
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
EXT = ROOT / "book" / "_ext"
sys.path.insert(0, str(EXT))
import figure_rule  # noqa: E402

matplotlib.use("Agg")


def labelled(ax, title="t", x="x", y="y"):
    ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return ax


def test_titled_and_labelled_passes():
    fig = Figure()
    labelled(fig.add_subplot())
    assert figure_rule.problems(fig) == []


def test_missing_title_and_labels_are_named():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set_xlabel("step")
    assert figure_rule.problems(fig) == ["no title (set a suptitle or an axes title)", "'axes 0' has no y label"]
    ax.set_title("loss")
    assert figure_rule.problems(fig) == ["'loss' has no y label"]


def test_suptitle_is_a_title_and_every_panel_needs_labels():
    fig = Figure()
    fig.suptitle("two panels")
    left, right = fig.subplots(1, 2)
    labelled(left, title="")
    right.plot([0, 1], [1, 0])
    assert figure_rule.problems(fig) == ["'axes 1' has no x label", "'axes 1' has no y label"]
    fig.supxlabel("step")
    fig.supylabel("loss")
    assert figure_rule.problems(fig) == []


def test_shared_axes_labelled_on_the_outer_panels():
    fig = Figure()
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    for ax in axes.flat:
        ax.plot([0, 1], [0, 1])
    axes[0, 0].set_title("grid")
    for ax in axes[1]:
        ax.set_xlabel("rank r")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss")
    assert figure_rule.problems(fig) == []
    unshared = Figure()
    a, b = unshared.subplots(1, 2)
    labelled(a)
    b.plot([0, 1], [0, 1])
    b.set_xlabel("x")
    assert figure_rule.problems(unshared) == ["'axes 1' has no y label"]


def test_diagram_with_axes_off_needs_only_a_title():
    fig = Figure()
    ax = fig.add_subplot()
    ax.annotate("", xy=(0.8, 0.5), xytext=(0.2, 0.5), arrowprops={"arrowstyle": "->"})
    ax.axis("off")
    assert figure_rule.problems(fig) == ["no title (set a suptitle or an axes title)"]
    ax.set_title("x → W → y")
    assert figure_rule.problems(fig) == []


def test_twin_axes_and_colorbars():
    fig = Figure()
    ax = labelled(fig.add_subplot())
    twin = ax.twinx()
    twin.plot([0, 1], [3, 2])
    assert figure_rule.problems(fig) == ["'axes 1' has no y label"], "the twin shows a y axis: it needs its label"
    twin.set_ylabel("bits per byte")
    image = ax.imshow([[0, 1], [1, 0]])
    fig.colorbar(image, ax=ax)
    assert figure_rule.problems(fig) == [], "a colorbar is not an x/y axes"


def test_empty_figure_passes():
    assert figure_rule.problems(Figure()) == []


def test_check_new_figures_raises_and_forgets():
    figure_rule._created.clear()
    bad = Figure()
    bad.add_subplot().plot([0, 1])
    figure_rule._created.append(bad)
    with pytest.raises(figure_rule.FigureRuleError, match="no title"):
        figure_rule.check_new_figures()
    figure_rule.check_new_figures()  # checked once: the next cell starts clean


CELLS = [
    # 0: a good figure shown inline, then a value: the cell passes and still displays its last expression
    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1], [1, 2])\n"
    "ax.set_title('loss per step')\nax.set_xlabel('step')\nax.set_ylabel('loss (nats per token)')\n6 * 7",
    # 1: a figure without a y label, shown with plt.show() in the middle of the cell: the cell fails
    "fig, ax = plt.subplots()\nax.plot([0, 1])\nax.set_title('untitled axis')\nax.set_xlabel('step')\nplt.show()\n"
    "print('after show')",
    # 2: figures made in a loop, one panel of one figure unlabelled: fails, naming it
    "for k in range(2):\n    fig, axes = plt.subplots(1, 2)\n    fig.suptitle(f'pair {k}')\n"
    "    for j, ax in enumerate(axes):\n        ax.plot([0, 1])\n        ax.set_xlabel('x')\n"
    "        if (k, j) != (1, 1):\n            ax.set_ylabel('y')",
    # 3: a diagram (axes off, a title): passes; a cell with no figure at all: passes
    "fig, ax = plt.subplots()\nax.axis('off')\nax.set_title('the LoRA block')\nx = 1",
    # 4: the last expression of a later cell is still the cell's value
    "x + 1",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    ipython_dir = tmp_path_factory.mktemp("ipython")
    figure_rule.write_ipython_dir(ipython_dir, EXT)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPYTHONDIR", str(ipython_dir))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        NotebookClient(nb, timeout=120, allow_errors=True, kernel_name="python3").execute()
    return nb.cells


def errors(cell) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]


def test_kernel_good_figure_passes_and_keeps_value(executed):
    cell = executed[0]
    assert errors(cell) == []
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert [r.data["text/plain"] for r in results] == ["42"]
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), "the figure is still shown"


def test_kernel_bad_figure_fails_the_cell(executed):
    (message,) = errors(executed[1])
    assert message.startswith("FigureRuleError: every figure in the book needs a title and labelled axes")
    assert "'untitled axis' has no y label" in message


def test_kernel_names_the_bad_panel_in_a_loop(executed):
    (message,) = errors(executed[2])
    assert "pair 1" in message and "'axes 1' has no y label" in message
    assert "pair 0" not in message


def test_kernel_diagram_and_later_cells_pass(executed):
    assert errors(executed[3]) == []
    assert errors(executed[4]) == []
    assert [o.data["text/plain"] for o in executed[4].outputs if o.output_type == "execute_result"] == ["2"]
