"""Book-wide rules a learner relies on, checked statically over every chapter, solutions notebook and page.

- **No dangling references**: no notebook, book page, docstring, test or README cites a document the reader does not
  have (a facts or research file, the shared folder of the people who wrote the book, an issue of this project's
  tracker); cite papers, upstream files and issues, or the book's own pages.
- **Diagrams**: at least :data:`MIN_DIAGRAMS` code cells tagged ``diagram`` across the chapters. Their titles, like
  every figure's title and axis labels, are checked while the book executes (book/_ext/figure_rule.py;
  tests/book/test_figure_rule.py).
- **Exercises**: every chapter has at least :data:`MIN_EXERCISES` Markdown headings ``## Exercise N:`` (numbered
  1, 2, 3, ...), each followed, before the next heading, by a self-check code cell tagged ``raises-exception`` that
  asserts; and a solutions notebook ``notebooks/solutions/<chapter file>`` with the same exercise headings, each
  followed by the same self-check, untagged (the build executes it, so it must pass). The build also checks that
  every chapter self-check does fail on the empty answer (book/build.py, ``scan_unfailed_self_checks``).
- **Solutions in the book**: every solutions notebook is in a toctree of book/index.md; every solutions notebook is
  a clean notebook (no outputs) titled by its first Markdown cell.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
INDEX = ROOT / "book" / "index.md"
MIN_DIAGRAMS = 6
MIN_EXERCISES = 3

# Spelled in pieces so that this file does not match itself.
DANGLING = [
    re.compile(re.escape("facts" + ".md"), re.I),
    re.compile(r"\bfacts" + r"\s+§"),
    re.compile(re.escape(".." + "/shared")),
    re.compile(re.escape("research" + ".md"), re.I),
    re.compile(re.escape("BRIEF" + ".md")),
    re.compile(r"the\s+project's\s+performance" + r"\s+issue", re.I),
]
EXERCISE = re.compile(r"^## Exercise (\d+):", re.M)
HEADING = re.compile(r"^#{1,2} ", re.M)  # a chapter (#) or section (##) heading ends an exercise

CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
CHAPTER_PARAMS = [pytest.param(p, id=p.stem) for p in CHAPTERS] or [pytest.param(None, id="no-chapters")]


def read(path: Path) -> nbformat.NotebookNode:
    assert path is not None, f"{NOTEBOOKS} holds no chapter"
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def python_of(source: str) -> str:
    return "\n".join("# " + l if l.lstrip().startswith(("%", "!")) else l for l in source.splitlines())


def asserts(source: str) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(python_of(source))))


def exercises(nb) -> list[tuple[str, list]]:
    """[(heading line, the code cells after it up to the next heading)] for each ``## Exercise N:`` heading."""
    found: list[tuple[str, list]] = []
    current = None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            if HEADING.search(cell.source):
                current = None
            match = EXERCISE.search(cell.source)
            if match:
                line = cell.source[match.start():].splitlines()[0].strip()
                current = (line, [])
                found.append(current)
        elif cell.cell_type == "code" and current is not None:
            current[1].append(cell)
    return found


def self_check(cells: list):
    """The exercise's self-check: its last code cell that asserts, or None."""
    checks = [c for c in cells if asserts(c.source)]
    return checks[-1] if checks else None


# --------------------------------------------------------------------------------------------- references

def text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "lora_ref").rglob("*.py"))
    # tests/book/ holds the book's rule tests, which must spell out what they forbid: not scanned
    files += sorted(p for p in (ROOT / "tests").rglob("*") if p.suffix in {".py", ".md"} and p.is_file()
                    and (ROOT / "tests" / "book") not in p.parents)
    book = ROOT / "book"
    files += sorted(p for p in book.rglob("*") if p.is_file() and p.suffix in {".md", ".py", ".bib", ".css"}
                    and not {"_build", "_static", "notebooks"} & set(p.relative_to(book).parts))
    return files


def notebook_texts() -> list[tuple[str, str]]:
    out = []
    for path in sorted(NOTEBOOKS.rglob("*.ipynb")):
        nb = read(path)
        for i, cell in enumerate(nb.cells):
            out.append((f"{path.relative_to(ROOT)} cell {i} ({cell.get('id', '?')})", cell.source))
    return out


def dangling_in(items: list[tuple[str, str]]) -> list[str]:
    found = []
    for where, text in items:
        flat = " ".join(text.split())
        for pattern in DANGLING:
            for m in pattern.finditer(flat):
                found.append(f"{where}: ...{flat[max(0, m.start() - 40): m.end() + 20]}...")
    return found


def test_dangling_patterns_match_what_they_must():
    samples = [("a", "see " + "facts" + ".md §3"), ("b", "(PEFT, facts" + " §4.7)"), ("c", ".." + "/shared/x"),
               ("d", "the project's\n performance" + " issue"), ("e", "research" + ".md §0.1")]
    assert len(dangling_in(samples)) == len(samples)
    assert dangling_in([("ok", "see peft/tuners/lora/layer.py and peft#2321, {doc}`03_lora`; facts about NF4")]) == []


def test_no_dangling_references_in_sources_pages_and_tests():
    items = [(str(p.relative_to(ROOT)), p.read_text(errors="replace")) for p in text_files()]
    found = dangling_in(items)
    assert not found, "references a reader cannot follow (cite a paper, an upstream file or issue, or a page " \
                      "of the book):\n" + "\n".join(found)


def test_no_dangling_references_in_notebooks():
    found = dangling_in(notebook_texts())
    assert not found, "references a reader cannot follow (cite a paper, an upstream file or issue, or a page " \
                      "of the book):\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------- diagrams

def test_at_least_six_diagrams():
    cells = [(p.name, c) for p in CHAPTERS for c in read(p).cells if c.cell_type == "code" and "diagram" in tags(c)]
    per = {}
    for name, _ in cells:
        per[name] = per.get(name, 0) + 1
    assert len(cells) >= MIN_DIAGRAMS, (f"the book needs at least {MIN_DIAGRAMS} code cells tagged 'diagram', found "
                                        f"{len(cells)}: {per}")


# --------------------------------------------------------------------------------------------- exercises

def test_exercise_parsing():
    """The exercise reader on a small notebook: headings, sections and self-checks."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_markdown_cell("## Exercises\nHow they work."),
        nbformat.v4.new_markdown_cell("## Exercise 1: predict the slope\nStore it in `slope`."),
        nbformat.v4.new_code_cell("slope = None  # your answer"),
        nbformat.v4.new_code_cell("assert slope == -1", metadata={"tags": ["raises-exception"]}),
        nbformat.v4.new_markdown_cell("## Exercise 2: second"),
        nbformat.v4.new_code_cell("x = None"),
        nbformat.v4.new_markdown_cell("## Summary"),
        nbformat.v4.new_code_cell("assert True"),
    ])
    found = exercises(nb)
    assert [h for h, _ in found] == ["## Exercise 1: predict the slope", "## Exercise 2: second"]
    assert self_check(found[0][1]).source == "assert slope == -1"
    assert self_check(found[1][1]) is None, "the summary's assert does not belong to exercise 2"


@pytest.mark.parametrize("path", CHAPTER_PARAMS)
def test_chapter_exercises_with_tagged_self_checks(path):
    nb = read(path)
    found = exercises(nb)
    numbers = [int(EXERCISE.match(h).group(1)) for h, _ in found]
    assert len(found) >= MIN_EXERCISES, (f"{path.name}: {len(found)} exercise heading(s) ('## Exercise N: ...'), "
                                         f"the book asks for at least {MIN_EXERCISES}")
    assert numbers == list(range(1, len(found) + 1)), f"{path.name}: exercises numbered {numbers}"
    for heading, cells in found:
        check = self_check(cells)
        assert check is not None, f"{path.name}: {heading!r} has no self-check (a code cell that asserts)"
        assert "raises-exception" in tags(check), (
            f"{path.name}: the self-check of {heading!r} must be tagged raises-exception (it fails on the empty "
            "answer, and the book still builds)")
        answers = [c for c in cells if c is not check]
        assert answers, f"{path.name}: {heading!r} has no answer cell before its self-check"


@pytest.mark.parametrize("path", CHAPTER_PARAMS)
def test_solutions_notebook_matches_the_chapter(path):
    chapter = read(path)
    solution_path = SOLUTIONS / path.name
    assert solution_path.is_file(), f"{path.name}: no solutions notebook {solution_path.relative_to(ROOT)}"
    solution = read(solution_path)
    mine = exercises(chapter)
    theirs = exercises(solution)
    assert [h for h, _ in theirs] == [h for h, _ in mine], (
        f"{solution_path.relative_to(ROOT)}: its exercise headings differ from the chapter's")
    for (heading, cells), (_, chapter_cells) in zip(theirs, mine):
        check = self_check(cells)
        assert check is not None, f"{solution_path.name}: {heading!r} has no self-check"
        assert "raises-exception" not in tags(check), (
            f"{solution_path.name}: the self-check of {heading!r} is tagged raises-exception; in the solutions it "
            "must run untagged, so the build proves it passes")
        expected = self_check(chapter_cells)
        assert expected is None or check.source.strip() == expected.source.strip(), (
            f"{solution_path.name}: the self-check of {heading!r} is not the chapter's self-check")
    tagged = [i for i, c in enumerate(solution.cells) if "raises-exception" in tags(c)]
    assert not tagged, f"{solution_path.name}: cells {tagged} are tagged raises-exception; a solution must run clean"


def test_every_solutions_notebook_has_its_chapter():
    orphans = [p.name for p in sorted(SOLUTIONS.glob("*.ipynb")) if not (NOTEBOOKS / p.name).is_file()]
    assert not orphans, f"solutions notebooks without a chapter of the same name: {orphans}"


def toctree_entries() -> list[tuple[str, bool]]:
    """[(entry, is a glob)] of every toctree in book/index.md."""
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", INDEX.read_text(), re.S):
        glob = ":glob:" in block
        entries += [(line.strip(), glob) for line in block.splitlines() if line.strip() and not
                    line.strip().startswith(":")]
    return entries


def test_solutions_in_the_toctree():
    solutions = sorted(SOLUTIONS.glob("*.ipynb"))
    assert solutions, f"{SOLUTIONS} holds no solutions notebook"
    entries = toctree_entries()
    missing = [p.name for p in solutions
               if not any(fnmatch.fnmatch(f"notebooks/solutions/{p.stem}", e) if g else e == f"notebooks/solutions/"
                          f"{p.stem}" for e, g in entries)]
    assert not missing, f"solutions notebooks in no toctree of {INDEX.relative_to(ROOT)}: {missing}"


@pytest.mark.parametrize("path", sorted(SOLUTIONS.glob("*.ipynb")) or [None])
def test_solutions_notebooks_are_clean(path):
    assert path is not None, f"{SOLUTIONS} holds no solutions notebook"
    nb = read(path)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), (
        f"{path.name}: the first cell is the title ('# ...')")
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; notebooks are stored clean"
