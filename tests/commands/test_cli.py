"""The ``lora-ref`` command line: help for the program and every command, exit codes for bad usage."""

import subprocess
import sys
from pathlib import Path

import pytest

from lora_ref import cli


def lora_ref_command() -> list[str]:
    """The installed console script next to this interpreter (what users run)."""
    script = Path(sys.executable).parent / "lora-ref"
    assert script.is_file(), f"the lora-ref console script is not installed next to {sys.executable}"
    return [str(script)]


def test_program_help_runs_as_a_console_script():
    proc = subprocess.run(lora_ref_command() + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name in proc.stdout


def test_unknown_command_is_one_line_and_exit_2():
    proc = subprocess.run(lora_ref_command() + ["no-such-command"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown command 'no-such-command'" in lines[0]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help_with_examples(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lora-ref {name}")
    assert "examples:" in out  # EXAMPLES is shown under --help


def test_no_command_prints_usage_and_exit_2(capsys):
    assert cli.main([]) == 2
    assert "usage: lora-ref" in capsys.readouterr().err


def test_unknown_flag_exit_2(capsys):
    assert cli.main(["tour", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0]


def test_bad_flag_value_exit_2(capsys):
    assert cli.main(["bench", "train", "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
