"""The notebooks in notebooks/ are clean, runnable chapters of the book.

Executing them is the book build's job (`make book` runs every notebook and fails on any error);
these tests check, quickly, what git must hold: valid nbformat v4 files without outputs, each
importing lora_ref and checking what it shows with assertions, each listed in the book's chapter
index with modules that exist. An empty notebooks/ folder fails every test here, it does not skip.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from book_script import build_module

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHAPTER_INDEX = ROOT / "book" / "chapters.md"
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")

FOUND = sorted(NOTEBOOKS.glob("*.ipynb"))
# With no notebook, every test below still runs once and fails, instead of pytest skipping an
# empty parameter set.
PARAMS = [pytest.param(p, id=p.stem) for p in FOUND] or [pytest.param(None, id="no-notebooks")]


def read(path: Path | None) -> nbformat.NotebookNode:
    assert path is not None, f"{NOTEBOOKS} holds no notebook: the book has no chapters"
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def code_of(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def python_of(source: str) -> str:
    """A code cell's source with IPython magics and shell escapes turned into comments."""
    return "\n".join(
        "# " + line if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
    )


def parsed(nb: nbformat.NotebookNode) -> list[ast.Module]:
    return [ast.parse(python_of(src)) for src in code_of(nb)]


def imports_lora_ref(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            a.name == "lora_ref" or a.name.startswith("lora_ref.") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (
            node.module == "lora_ref" or node.module.startswith("lora_ref.")
        ):
            return True
    return False


def has_assert(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Assert) for node in ast.walk(tree))


def chapter_index() -> dict[str, list[str]]:
    """{notebook stem: [module, ...]} from the chapter-index directive in book/chapters.md."""
    text = CHAPTER_INDEX.read_text()
    block = re.search(r"```\{chapter-index\}\n(.*?)```", text, re.S)
    assert block, f"{CHAPTER_INDEX} has no chapter-index block"
    rows = {}
    for line in block.group(1).splitlines():
        if line.strip():
            stem, modules, _ = (part.strip() for part in line.split("|"))
            rows[stem] = [m.strip() for m in modules.split(",")]
    return rows


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_notebooks_folder_has_chapters():
    assert FOUND, f"{NOTEBOOKS} holds no notebook: the book has no chapters"


@pytest.mark.parametrize("path", PARAMS)
def test_valid_nbformat_v4(path):
    nb = read(path)
    assert nb.nbformat == 4, f"{path.name}: nbformat {nb.nbformat}, expected 4"
    nbformat.validate(nb)
    assert CHAPTER_NAME.match(path.name), (
        f"{path.name}: chapter notebooks are named NN_topic.ipynb (two digits give the teaching order)"
    )
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{path.name}: kernelspec {kernel!r}, expected 'python3'"
    assert nb.cells and nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), (
        f"{path.name}: the first cell must be markdown starting with the chapter title ('# ...')"
    )


@pytest.mark.parametrize("path", PARAMS)
def test_no_stored_outputs(path):
    nb = read(path)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts; notebooks are committed "
        "clean (in Jupyter: Edit > Clear Outputs of All Cells, then save)"
    )


@pytest.mark.parametrize("path", PARAMS)
def test_imports_lora_ref_and_asserts(path):
    nb = read(path)
    trees = parsed(nb)
    assert any(imports_lora_ref(t) for t in trees), f"{path.name}: no code cell imports lora_ref"
    assert any(has_assert(t) for t in trees), f"{path.name}: no code cell has an assert statement"


@pytest.mark.parametrize("path", PARAMS)
def test_every_section_with_code_asserts(path):
    """Each '## ' section that runs code checks what it showed with at least one assert."""
    nb = read(path)
    sections: list[tuple[str, list[ast.Module]]] = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    sections.append((line[3:].strip(), []))
        elif cell.cell_type == "code" and sections:
            sections[-1][1].append(ast.parse(python_of(cell.source)))
    missing = [title for title, trees in sections if trees and not any(has_assert(t) for t in trees)]
    assert not missing, f"{path.name}: sections without an assert: {missing}"


@pytest.mark.parametrize("path", PARAMS)
def test_listed_in_chapter_index(path):
    read(path)
    rows = chapter_index()
    assert path.stem in rows, f"{path.name} is missing from the chapter index in {CHAPTER_INDEX}"
    missing = [m for m in rows[path.stem] if not module_exists(m)]
    assert not missing, (
        f"{CHAPTER_INDEX} maps {path.stem} to modules that do not exist: {missing}; "
        "name the lora_ref modules the chapter teaches"
    )


def test_book_scan_flags_remote_assets(tmp_path):
    """book/build.py's remote-asset scan finds CDN scripts, stylesheets, imports and url()s."""
    build = build_module()
    (tmp_path / "page.html").write_text(
        '<link rel="stylesheet" href="https://fonts.example.org/css">\n'
        "<script async src='//cdn.example.org/x.js'></script>\n"
        '<script src="_static/local.js"></script>\n'
        '<a href="https://arxiv.org/abs/2106.09685">a link is not an asset</a>\n'
    )
    (tmp_path / "style.css").write_text(
        '@import "https://example.org/a.css";\n.a { background: url( "http://example.org/b.png") }\n'
        ".b { src: url(fonts/local.woff2) }\n"
    )
    found = build.scan_remote_assets(tmp_path, root=tmp_path)
    where = sorted((f.split(":")[0], int(f.split(":")[1])) for f in found)
    assert where == [("page.html", 1), ("page.html", 2), ("style.css", 1), ("style.css", 2)], found


def test_book_scan_flags_unrendered_tables(tmp_path):
    """book/build.py's table scan finds a Markdown table printed as a paragraph, and not a rendered one."""
    build = build_module()
    (tmp_path / "bad.html").write_text(
        "<div>\n<p>| r | loss |\n|\u2014|\u2014|\n| 1 | 1.9 |</p>\n</div>\n<p>| plain | text without a separator |</p>\n"
    )
    (tmp_path / "good.html").write_text("<table><tr><th>r</th><th>loss</th></tr><tr><td>1</td><td>1.9</td></tr></table>\n")
    found = build.scan_unrendered_tables(tmp_path, root=tmp_path)
    assert [(f.split(":")[0], int(f.split(":")[1])) for f in found] == [("bad.html", 2)], found
