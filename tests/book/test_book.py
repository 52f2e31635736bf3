"""The book as a whole: enough chapters, enough labelled figures, and a chapter index that lists them all.

tests/book/test_notebooks.py checks each notebook on its own (format, no outputs, assertions per section). This file
checks what only the set of notebooks can show, statically, without executing anything:

- at least 10 chapter notebooks;
- at least 15 code cells that produce a labelled figure: the cell makes or shows a matplotlib figure
  (``plt.subplots``, ``plt.figure``, ``plt.subplot_mosaic``, ``plt.show`` or any ``.savefig``) and labels both
  axes (``set_xlabel``/``xlabel``/``supxlabel`` and ``set_ylabel``/``ylabel``/``supylabel``);
- every notebook in the chapter index of ``book/chapters.md`` and every row of that index a notebook.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHAPTER_INDEX = ROOT / "book" / "chapters.md"

FIGURE_CALLS = {"subplots", "figure", "subplot_mosaic", "show"}
X_LABELS = {"set_xlabel", "xlabel", "supxlabel"}
Y_LABELS = {"set_ylabel", "ylabel", "supylabel"}


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def cell_trees(path: Path) -> list[ast.Module]:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    trees = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        # IPython magics and shell escapes are not Python
        src = "\n".join("# " + l if l.lstrip().startswith(("%", "!")) else l for l in cell.source.splitlines())
        trees.append(ast.parse(src))
    return trees


def method_calls(tree: ast.AST) -> list[ast.Attribute]:
    return [n.func for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]


def makes_figure(tree: ast.AST) -> bool:
    for f in method_calls(tree):
        if f.attr == "savefig":
            return True
        if isinstance(f.value, ast.Name) and f.value.id == "plt" and f.attr in FIGURE_CALLS:
            return True
    return False


def labels_axes(tree: ast.AST) -> bool:
    names = {f.attr for f in method_calls(tree)}
    return bool(names & X_LABELS) and bool(names & Y_LABELS)


def labelled_figure_cells() -> dict[str, int]:
    """{notebook name: number of code cells that make a figure and label both its axes}."""
    return {p.name: sum(makes_figure(t) and labels_axes(t) for t in cell_trees(p)) for p in notebooks()}


def index_stems() -> list[str]:
    text = CHAPTER_INDEX.read_text()
    block = re.search(r"```\{chapter-index\}\n(.*?)```", text, re.S)
    assert block, f"{CHAPTER_INDEX} has no chapter-index block"
    return [line.split("|")[0].strip() for line in block.group(1).splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- the criterion

def test_figure_criterion():
    """The static criterion itself: a labelled figure counts, an unlabelled one or a non-figure does not."""
    labelled = ast.parse("fig, ax = plt.subplots()\nax.plot(x, y)\nax.set_xlabel('r')\nax.set_ylabel('loss')\nplt.show()")
    no_y = ast.parse("fig, ax = plt.subplots()\nax.bar(x, y)\nax.set_xlabel('method')\nplt.show()")
    saved = ast.parse("fig.savefig('a.png')\nplt.xlabel('a')\nplt.ylabel('b')")
    not_a_figure = ast.parse("ax.set_xlabel('a')\nax.set_ylabel('b')\nprint(plt)")
    assert makes_figure(labelled) and labels_axes(labelled)
    assert makes_figure(no_y) and not labels_axes(no_y)
    assert makes_figure(saved) and labels_axes(saved)
    assert not makes_figure(not_a_figure)


# --------------------------------------------------------------------------------------------- the book

def test_at_least_ten_chapters():
    found = [p.name for p in notebooks()]
    assert len(found) >= 10, f"the book needs at least 10 chapter notebooks in {NOTEBOOKS}, found {len(found)}: {found}"


def test_at_least_fifteen_labelled_figures():
    per_notebook = labelled_figure_cells()
    total = sum(per_notebook.values())
    assert total >= 15, f"the book needs at least 15 figures with labelled axes, found {total}: {per_notebook}"


def test_every_notebook_in_the_chapter_index():
    stems = index_stems()
    found = [p.stem for p in notebooks()]
    missing = [s for s in found if s not in stems]
    assert not missing, f"notebooks missing from the chapter index in {CHAPTER_INDEX}: {missing}"
    orphans = [s for s in stems if s not in found]
    assert not orphans, f"{CHAPTER_INDEX} lists chapters with no notebook in {NOTEBOOKS}: {orphans}"
    assert len(stems) == len(set(stems)), f"{CHAPTER_INDEX} lists a chapter twice: {stems}"
    assert stems == sorted(stems), f"{CHAPTER_INDEX} lists the chapters out of teaching order: {stems}"


def test_every_section_ends_in_assertions():
    """The last code cell of each '## ' section asserts: a section ends by checking what it showed."""
    missing = []
    for path in notebooks():
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        last: dict[str, str] = {}  # section title -> source of its last code cell
        title = None
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                for line in cell.source.splitlines():
                    if line.startswith("## "):
                        title = line[3:].strip()
            elif cell.cell_type == "code" and title is not None:
                last[title] = cell.source
        for title, source in last.items():
            src = "\n".join("# " + l if l.lstrip().startswith(("%", "!")) else l for l in source.splitlines())
            if not any(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(src))):
                missing.append(f"{path.name}: {title}")
    assert not missing, f"sections whose last code cell has no assert: {missing}"
