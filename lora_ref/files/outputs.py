"""Safe output: write to a temporary sibling, rename at the end; refuse to write into a non-empty folder.

Every command that writes files goes through :func:`output_dir` or :func:`atomic_write`, so an error or an
interrupt leaves no partial output behind and never touches an existing file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out_dir(path: str | os.PathLike, *, replace_marker: str | None = None) -> Path:
    """Check that ``path`` may be written: missing, empty, or (with ``replace_marker``) a folder we wrote before.

    Raises ``ValueError`` naming the path otherwise. Nothing is created here.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output path exists and is not a folder: {p}")
    if p.is_dir() and any(p.iterdir()):
        if replace_marker is None or not (p / replace_marker).is_file():
            raise ValueError(f"output folder is not empty: {p} (choose a new folder or empty it)")
    parent = p.resolve().parent
    existing = parent
    while not existing.exists():  # missing parents are created by output_dir (e.g. runs/ on a fresh clone)
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output path is inside a file, not a folder: {existing}")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"output folder is not writable: {existing}")
    return p


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, replace_marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` atomically.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and ``path`` is left as it was.
    With ``replace_marker``, an existing folder that holds that marker file (one we wrote before) is replaced.
    """
    final = check_out_dir(path, replace_marker=replace_marker)
    parent = final.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder the user gets follows their umask
    try:
        yield tmp
        if replace_marker is not None:
            (tmp / replace_marker).write_text("written by lora_ref; this folder may be replaced by the same command\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file the user gets follows their umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming ``what`` and the path if it is missing, not JSON, or not
    an object (a list, a number)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} not found: {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} is not valid JSON ({e}): {p}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} does not hold a JSON object: {p}")
    return obj


def require_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} not found: {p}" if not p.exists() else f"{what} is not a folder: {p}")
    return p
