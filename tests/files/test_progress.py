"""lora_ref.files.progress: the progress lines a cached run writes for the book's builds, and nothing without them."""

from __future__ import annotations

import pytest

from lora_ref.files import cache, progress


@pytest.fixture
def logfile(tmp_path, monkeypatch):
    path = tmp_path / "progress.log"
    monkeypatch.setenv(progress.ENV, str(path))
    return path


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_log_writes_one_line_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.log("nowhere")  # no variable: nothing is written, nothing fails
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "p.log"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.log("first line")
    progress.log("second\nline  with   spaces")
    assert lines(path) == ["first line", "second line with spaces"]


def test_bar_logs_start_progress_and_end(logfile, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every update
    with progress.bar(4, "lora fine-tune") as bar:
        for step in range(4):
            bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}", refresh=False)
            bar.update(1)
    got = lines(logfile)
    assert got[0] == "lora fine-tune: started (4 steps)"
    assert got[1].startswith("lora fine-tune: 1/4 steps, ") and got[1].endswith("s left (loss 1.000)")
    assert got[4].startswith("lora fine-tune: 4/4 steps, ")
    assert got[5].startswith("lora fine-tune: done in ") and got[5].endswith(" s (loss 0.250)")
    assert len(got) == 6
    assert "lora fine-tune" in capsys.readouterr().err, "the tqdm bar is still drawn on stderr"


def test_bar_interrupted_says_where(logfile):
    bar = progress.bar(10, "pretraining")
    bar.update(3)
    bar.close()
    bar.close()  # closing twice logs once
    assert lines(logfile)[-1].startswith("pretraining: stopped at 3/10 steps in ")
    assert len(lines(logfile)) == 2


def test_bar_without_tqdm_still_logs(logfile, capsys):
    """progress=False hides the bar (chapters keep their pages clean) but the build's log still hears the run."""
    with progress.bar(3, "quiet run", enabled=False) as bar:
        bar.update(3)
    got = lines(logfile)
    assert got[0] == "quiet run: started (3 steps)" and got[-1].startswith("quiet run: done in ")
    assert capsys.readouterr().err == ""


def test_no_variable_no_kernel_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with progress.bar(2, "silent", enabled=False) as bar:
        bar.update(2)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_get_or_build_logs_builds_not_hits(logfile, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))

    def build(folder):
        (folder / "x.json").write_text("{}")

    folder = cache.get_or_build("toy-run", {"a": 1}, build)
    got = lines(logfile)
    assert got[0] == f"cache: building toy-run/{folder.name} (not in the cache yet)"
    assert got[1].startswith(f"cache: built toy-run/{folder.name} in ")
    cache.get_or_build("toy-run", {"a": 1}, build)
    assert len(lines(logfile)) == 2, "a cache hit builds and logs nothing"


def test_notebook_status_line(tmp_path, monkeypatch):
    """In a Jupyter kernel a cached build shows one status line, updated in place, ending on what was built; a
    training run with its bar off reports on that line too; a cache hit shows nothing."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))
    build = ("from lora_ref.files import cache, progress\n"
             "def build(folder):\n"
             "    with progress.bar(3, 'toy run', enabled=False) as bar:\n"
             "        for _ in range(3):\n"
             "            bar.update(1)\n"
             "    (folder / 'x.json').write_text('{}')\n"
             "folder = cache.get_or_build('toy-run', {'a': 1}, build)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(build), nbformat.v4.new_code_cell(build)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    first, second = ([o for o in c.outputs] for c in nb.cells)
    assert [o.output_type for o in first] == ["display_data"], first
    assert first[0].data["text/plain"].startswith("cache: built toy-run/")  # the final state of the line
    assert second == [], "a cache hit shows nothing"
