"""book/build.py's machinery around Sphinx, without building the book: what the notebook kernels are started with
(the figure rule, the progress log), the progress lines printed while they run, the execution-time report, and the
scan for exercise self-checks that do not fail on the empty answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from book_script import build_module

ROOT = Path(__file__).resolve().parents[2]
build = build_module()


def test_kernels_start_with_the_figure_rule_and_a_progress_log(tmp_path, monkeypatch, capsys):
    """run_sphinx gives the Sphinx process (and so every kernel) an IPYTHONDIR whose startup installs the figure
    rule, and a progress log whose lines are printed on the console while it runs."""
    seen = {}

    def fake_run(cmd, cwd, env):
        startup = Path(env["IPYTHONDIR"]) / "profile_default" / "startup"
        seen["startup"] = "".join(p.read_text() for p in sorted(startup.glob("*.py")))
        seen["cmd"] = cmd
        Path(env["LORA_REF_PROGRESS_LOG"]).write_text("lora fine-tune: started (100 steps)\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    code, _ = build.run_sphinx(tmp_path / "html")
    assert code == 0
    assert "figure_rule.install(get_ipython())" in seen["startup"]
    assert str(ROOT / "book" / "_ext") in seen["startup"]
    assert "-W" in seen["cmd"] and "-E" in seen["cmd"]
    assert "[book]   lora fine-tune: started (100 steps)" in capsys.readouterr().out


def test_progress_tail_prints_whole_lines_only(tmp_path):
    log = tmp_path / "p.log"
    printed = []
    tail = build.ProgressTail(log, prefix="> ", emit=printed.append)
    tail._print_new()  # no file yet: nothing
    log.write_text("first\nsecond, still being writ")
    tail._print_new()
    assert printed == ["> first"]
    with open(log, "a") as f:
        f.write("ten\nthird\n")
    tail._print_new()
    assert printed == ["> first", "> second, still being written", "> third"]


def test_execution_times_reported(tmp_path, capsys):
    doctrees = tmp_path / "doctrees"
    doctrees.mkdir()
    (doctrees / "execution.json").write_text(json.dumps({
        "notebooks/01_autograd": {"seconds": 4.2, "succeeded": True},
        "notebooks/07_qlora": {"seconds": 61.0, "succeeded": False}}))
    total = build.report_execution_times(tmp_path / "html")
    out = capsys.readouterr().out
    assert total == 65.2
    assert "4.2 s  notebooks/01_autograd\n" in out
    assert "61.0 s  notebooks/07_qlora  FAILED" in out
    assert build.report_execution_times(tmp_path / "nowhere" / "html") == 0.0


PAGE = """<html><body>
<div class="cell docutils container"><div class="cell_input">x = None</div></div>
<div class="cell tag_raises-exception docutils container"><div class="cell_input">assert x == 3</div>
<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb notranslate">
AssertionError</div></div></div>
<p>Some text.</p>
<div class="cell tag_raises-exception docutils container"><div class="cell_input">assert True</div>
<div class="cell_output docutils container"><div class="output stream highlight-myst-ansi">ok</div></div></div>
<div class="cell tag_diagram docutils container"><div class="cell_input">draw()</div></div>
</body></html>"""


def test_self_checks_that_pass_on_the_empty_answer_are_found(tmp_path):
    chapters = tmp_path / "notebooks"
    (chapters / "solutions").mkdir(parents=True)
    (chapters / "03_lora.html").write_text(PAGE)
    (chapters / "solutions" / "03_lora.html").write_text(PAGE)  # solutions run untagged: not scanned
    found = build.scan_unfailed_self_checks(tmp_path, root=tmp_path)
    assert found == ["notebooks/03_lora.html: code cell 3 is tagged raises-exception but ran without an error"]
