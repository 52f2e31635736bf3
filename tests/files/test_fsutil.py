"""lora_ref.files.outputs: outputs appear whole, with missing parents created, and with the permissions of the user's umask."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from lora_ref import cli
from lora_ref.files.outputs import atomic_write, output_dir


@pytest.fixture
def umask():
    """A function that sets the process umask for one test; the old umask is put back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                          (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, folder_mode, file_mode):
    umask(mask)
    out = tmp_path / "missing" / "parents" / "out"
    with output_dir(out) as tmp:
        atomic_write(tmp / "a.json", "{}")
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode  # mkdtemp alone would give 0o700
    assert stat.S_IMODE((out / "a.json").stat().st_mode) == file_mode  # mkstemp alone would give 0o600
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary sibling left


def test_output_dir_refuses_a_path_inside_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="inside a file"):
        with output_dir(tmp_path / "f" / "out"):
            pass


def test_sigterm_unwinds_like_ctrl_c():
    """The CLI turns SIGTERM into KeyboardInterrupt, so `with output_dir(...)` removes its temporary folder."""
    old = signal.getsignal(signal.SIGTERM)
    try:
        cli._interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode of this thread
    finally:
        signal.signal(signal.SIGTERM, old)


def test_interrupt_inside_output_dir_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out) as tmp:
            atomic_write(tmp / "a.json", "{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
