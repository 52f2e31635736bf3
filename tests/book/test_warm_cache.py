"""`make warm-cache` (book/warm_cache.py) on two tiny chapters: it runs each, prints the progress lines the kernels
log while they work, honours `raises-exception`, reports a failing chapter with its cell and error, and exits 1."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


warm_cache = _load("lora_ref_book_warm_cache", ROOT / "book" / "warm_cache.py")


def notebook(path: Path, *cells) -> None:
    nb = nbformat.v4.new_notebook()
    for source, tags in cells:
        cell = nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def chapters(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_REF_PROGRESS_LOG", raising=False)
    notebook(tmp_path / "01_first.ipynb",
             ("from lora_ref.files import progress\nprogress.log('pretraining: 5/10 steps (from the kernel)')", None),
             ("raise ValueError('an empty exercise answer')", ["raises-exception"]),
             ("from pathlib import Path\nassert Path.cwd().name == 'book-chapters', Path.cwd()", None))
    notebook(tmp_path / "02_second.ipynb", ("1 / 0", None), ("print('never runs')", None))
    (tmp_path / "notes.ipynb").write_text("not a chapter")  # no NN_ prefix: ignored
    folder = tmp_path / "book-chapters"
    folder.mkdir()
    for p in tmp_path.glob("0*.ipynb"):
        p.rename(folder / p.name)
    return folder


def test_warm_cache_runs_reports_and_fails(chapters, capsys):
    code = warm_cache.main(["--notebooks", str(chapters)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    assert "[warm-cache]   pretraining: 5/10 steps (from the kernel)" in text
    assert "01_first: done in" in text
    assert "02_second: FAILED" in text and "ZeroDivisionError: division by zero" in text
    assert "1 of 2 chapters ran" in text
    assert "cell" in out.err  # the tqdm bar over the cells
    assert "LORA_REF_PROGRESS_LOG" not in os.environ


def test_choose_chapters(chapters):
    assert [p.name for p in warm_cache.chapters_in(chapters, ["02"])] == ["02_second.ipynb"]
    assert [p.name for p in warm_cache.chapters_in(chapters, ["01_first"])] == ["01_first.ipynb"]
    assert len(warm_cache.chapters_in(chapters)) == 2
    with pytest.raises(ValueError, match="no chapter 07"):
        warm_cache.chapters_in(chapters, ["07"])
    assert warm_cache.main(["--notebooks", str(chapters), "07"]) == 2
