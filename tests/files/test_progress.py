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


def test_disabled_bar_logs_nothing(logfile, capsys):
    with progress.bar(3, "quiet", enabled=False) as bar:
        bar.update(3)
    assert lines(logfile) == []
    assert capsys.readouterr().err == ""


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
