"""Numba's on-disk cache, in a folder named by the source of every module that holds compiled code.

Numba saves a compiled function (``njit(cache=True)``) and loads it again in later processes, checking only the
timestamp and size of the file that *defines* it. A kernel that inlines a helper or an intrinsic from another file
(every 4-bit kernel inlines :mod:`lora_ref.kernels.jit`), or calls a compiled function defined elsewhere, carries
that code in its own cache entry; after an edit to the other file alone it keeps running the old machine code.
Numba documents this ("Cache invalidation fails to recognize changes in functions defined in a different file",
the notes on ``cache=True`` in its user guide, ``docs/source/user/jit.rst``; numba/numba#1833). For a library whose
readers change the kernels to see what happens, that is a trap: the tests then run the old code and pass (seen
here: a deliberately wrong :func:`lora_ref.kernels.jit.rank16` left every encoder test green until the cache
files were deleted).

:func:`use_keyed_cache` runs when ``lora_ref`` is imported, before any kernel module is. Unless the user set
``NUMBA_CACHE_DIR``, it points Numba's cache at ``lora_ref/__pycache__/numba-<key>`` (or
``~/.cache/lora_ref/numba-<key>`` where the package folder is read-only), ``<key>`` a hash of the source of every
``lora_ref`` module that mentions Numba (:func:`source_key`). An edit to any of them starts a fresh folder, where
every kernel compiles once more (a minute or two of compiling across the test suite); other modules (the command
line, the book's text) leave the key alone. Only the newest few folders are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

__all__ = ["source_key", "cache_dir", "use_keyed_cache", "KEEP", "FOLDER"]

PACKAGE = Path(__file__).resolve().parents[1]
KEEP = 3
"""Keyed cache folders kept beside the current one's siblings (the newest by modification time); older ones are
removed."""
FOLDER: Path | None = None
"""The keyed folder this process caches in, or None when the user's ``NUMBA_CACHE_DIR`` (or Numba's default) is in
use."""


def source_key(package: Path = PACKAGE) -> str:
    """16 hex digits of the SHA-256 of every ``.py`` file under ``package`` whose text mentions ``numba``: its path
    relative to ``package`` and its bytes, in sorted path order."""
    paths = []
    for folder, subfolders, files in os.walk(package):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]      # thousands of cache files, no source
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    digest = hashlib.sha256()
    for path in sorted(paths):
        data = path.read_bytes()
        if b"numba" in data:
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


def cache_dir(package: Path = PACKAGE, key: str | None = None) -> Path:
    """The keyed folder: ``package/__pycache__/numba-<key>``, or ``~/.cache/lora_ref/numba-<key>`` (under
    ``$LORA_REF_CACHE`` if set) when ``package`` cannot be written."""
    key = key or source_key(package)
    if os.access(package, os.W_OK):
        return package / "__pycache__" / f"numba-{key}"
    root = Path(os.environ.get("LORA_REF_CACHE") or Path.home() / ".cache" / "lora_ref")
    return root / f"numba-{key}"


def _prune(current: Path) -> None:
    """Remove the keyed siblings of ``current`` beyond the newest :data:`KEEP`."""
    try:
        siblings = [p for p in current.parent.glob("numba-*") if p.is_dir() and p != current]
        siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in siblings[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def use_keyed_cache(environ=os.environ) -> Path | None:
    """Point Numba's cache at :func:`cache_dir` unless ``NUMBA_CACHE_DIR`` is set (then None, nothing changed).
    Sets the environment variable, and Numba's configuration too if Numba is already imported."""
    if environ.get("NUMBA_CACHE_DIR"):
        return None
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # nowhere to write: Numba's own default
    environ["NUMBA_CACHE_DIR"] = str(folder)
    config = sys.modules.get("numba.core.config")
    if config is not None:
        config.CACHE_DIR = str(folder)
    _prune(folder)
    global FOLDER
    FOLDER = folder
    return folder
