"""No dangling references: what the package, the tests and the book cite, a reader can open.

Chapters, docstrings and tests cite papers (book/references.bib), upstream files and issues (``peft#2321``,
``peft/tuners/lora/layer.py``) or the book's own pages. They must not cite notes a reader of the repository does not
have: a facts or research file, a sibling ``shared`` folder, or the development tracker's own issue numbers (an
upstream issue names its project: "peft issue #3741", "PR #3449").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
SOURCES = sorted(p for folder in ("lora_ref", "tests", "book", "notebooks")
                 for p in (ROOT / folder).rglob("*")
                 if p.suffix in {".py", ".md", ".ipynb", ".rst", ".txt"} and "_build" not in p.parts
                 and ".ipynb_checkpoints" not in p.parts and p.resolve() != THIS)

DANGLING = [
    (re.compile(r"facts\.md|facts §|\bfacts\s+§"), "a facts file"),
    (re.compile(r"research\.md|research §"), "a research notes file"),
    (re.compile(r"\.\./shared\b"), "a shared folder outside the repository"),
    (re.compile(r"performance issue", re.I), "the tracker's performance issue"),
    (re.compile(r"\b(?:BRIEF(?:-[a-z]+)?\.md|/work/dl)\b"), "a development note or download folder"),
    (re.compile(r"\bthe issue's\b|\bwhat the issue asks\b"), "this project's tracker"),
]


ISSUE = re.compile(r"\b[Ii]ssue #?\d+")
UPSTREAM = re.compile(r"peft|bitsandbytes|transformers|torch|llama\.cpp|numba|numpy|PR #|github", re.I)


def dangling(text: str) -> list[str]:
    found = [f"{why}: {m.group(0)!r}" for pattern, why in DANGLING for m in pattern.finditer(text)]
    for m in ISSUE.finditer(text):  # an issue number must name its upstream project shortly before it
        if not UPSTREAM.search(text[max(0, m.start() - 200):m.start()]):
            found.append(f"an issue number of this project's tracker: {m.group(0)!r}")
    return found


def test_the_scan_finds_what_it_should_and_spares_upstream_issues():
    assert dangling("see facts §4.7") and dangling("(research.md §0.1)") and dangling("the reference cases of issue 17")
    assert dangling("goals of the project's performance issue") and dangling("# the issue's checks")
    assert not dangling("PEFT forgets the scaling, peft issue #3741") and not dangling("(PR #3449, issue #3761)")
    assert not dangling("bitsandbytes issue #1342") and not dangling("peft#2321")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dangling_reference(path):
    found = dangling(path.read_text(errors="replace"))
    assert not found, f"{path.relative_to(ROOT)} cites what a reader does not have: {found}"
