"""``lora-ref tour``: the real command end to end (quick, twice: the second run from the cache), refusal of foreign folders,
and nothing written when a section's check fails."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_ref.tour as tour_sections
from lora_ref import cli
from lora_ref.commands import tour
from lora_ref.modeling.llama import Llama
from lora_ref.training import tutorial


def run_tour(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lora-ref"
    return subprocess.run([str(script), "tour", "--quick", "--out", str(out), *extra], capture_output=True,
                          text=True, timeout=1800, env=env)


@pytest.mark.slow
def test_quick_tour_twice(tmp_path):
    # the user's cache (as make tour uses it): the quick base is trained on first use and shared with other tests;
    # building and reusing cache entries is tested in test_cache.py
    out = tmp_path / "tour"
    first = run_tour(out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / tour.MARKER).is_file()
    assert (out / "pretraining_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![" in report and "(pretraining_loss.png)" in report
    assert "[tour] section 1/" in first.stderr  # progress goes to stderr
    # the number the summary prints is the base checkpoint's validation loss, recomputed here independently
    m = re.search(r"validation (\d+\.\d+) bits/byte \(unigram baseline (\d+\.\d+)\)", first.stdout)
    assert m, first.stdout
    base = Llama.from_pretrained(out / "base")
    assert tutorial.bits_per_byte(tutorial.validation_loss(base)) == pytest.approx(float(m.group(1)), abs=6e-4)
    assert "**Validation loss: " in report and m.group(1) in report
    assert "sample: " in first.stdout and "report: " in first.stdout
    # the cache entry: the HF checkpoint, the history and the key description
    entry = tutorial.pretrained_base_dir(quick=True)
    assert sorted(p.name for p in entry.iterdir()) == ["history.json", "key.json", "model"]
    assert sorted(p.name for p in (entry / "model").iterdir()) == ["config.json", "model.safetensors"]

    # a second tour into the same folder reuses the cache and replaces the folder the first one wrote
    (out / "stale.txt").write_text("left by someone")
    second = run_tour(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from the cache" in second.stdout
    assert not (out / "stale.txt").exists()
    lines = lambda s: [ln for ln in s.splitlines() if not ln.startswith(("report:", "pretrained base"))]  # noqa: E731
    assert lines(second.stdout) == lines(first.stdout)  # the same sample: deterministic from the same base
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tour.")]  # no temporary folders left


def test_tour_refuses_a_foreign_non_empty_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_tour(out, env={**os.environ, "LORA_REF_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and str(out) in err[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_failed_check_writes_nothing(tmp_path, monkeypatch, capsys):
    def failing_section(ctx):
        ctx.text("a paragraph that must never reach a report")
        ctx.check(1 + 1 == 3, "arithmetic works")

    monkeypatch.setattr(tour_sections, "SECTIONS", [("Failing", failing_section)])
    out = tmp_path / "tour"
    assert cli.main(["tour", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lora-ref tour: error: tour check failed: arithmetic works"
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_json_is_one_document_with_the_report_figures_and_summary(tmp_path, monkeypatch, capsys):
    import json

    import matplotlib.pyplot as plt

    def tiny_section(ctx):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ctx.figure(fig, "line", "a line")
        ctx.summarize("tiny: 42")

    monkeypatch.setattr(tour_sections, "SECTIONS", [("Tiny", tiny_section)])
    out = tmp_path / "tour"
    assert cli.main(["tour", "--quick", "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == ["tiny: 42"] and doc["figures"] == ["line.png"]
    assert doc["report"] == str(out / "report.md") and [s["title"] for s in doc["sections"]] == ["Tiny"]
    assert (out / "line.png").is_file() and "(line.png)" in (out / "report.md").read_text()
