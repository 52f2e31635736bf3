"""An artifact cache: folders keyed by a hash of everything that determines their contents.

A cached artifact (for example the pretrained tutorial model) lives in ``<cache root>/<kind>/<key>/``, where
``key`` is the SHA-256 of the canonical JSON of a description: model config, corpus fingerprint, training settings,
seed, library version. Change any of them and the key changes, so a stale artifact is never reused. The
description is stored next to the files as ``key.json`` so a cache folder explains itself.

The cache root is ``$LORA_REF_CACHE`` if set, else ``~/.cache/lora_ref``. Artifacts are written into a temporary
sibling folder and renamed into place only when complete, so an interrupted build leaves nothing that looks finished;
two processes building the same artifact at once both succeed and one result is kept. Only safetensors and JSON
files are written (no pickle). A build reports when it starts and ends (:func:`lora_ref.files.progress.log`: a
status line in a Jupyter notebook, a line in ``$LORA_REF_PROGRESS_LOG`` when set; nothing otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from lora_ref.files import progress

KEY_FILE = "key.json"


def cache_root() -> Path:
    """``$LORA_REF_CACHE`` if set and non-empty, else ``~/.cache/lora_ref``."""
    env = os.environ.get("LORA_REF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora_ref"


def _canonical(obj) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cache key description must be plain JSON (dicts, lists, str, finite numbers): {e}") from e


def cache_key(description: dict) -> str:
    """First 20 hex digits of SHA-256 of the canonical JSON (sorted keys) of ``description``."""
    return hashlib.sha256(_canonical(description).encode()).hexdigest()[:20]


def artifact_dir(kind: str, description: dict) -> Path:
    """Where the artifact of this kind and description lives (whether or not it exists yet)."""
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"cache kind must be a plain folder name, got {kind!r}")
    return cache_root() / kind / cache_key(description)


def lookup(kind: str, description: dict) -> Path | None:
    """The finished artifact's folder, or None if it has not been built (or was built for another description)."""
    path = artifact_dir(kind, description)
    key_file = path / KEY_FILE
    if not key_file.is_file():
        return None
    try:
        stored = json.loads(key_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return path if _canonical(stored) == _canonical(description) else None


def get_or_build(kind: str, description: dict, build: Callable[[Path], None]) -> Path:
    """Return the artifact's folder, calling ``build(tmp_folder)`` to make it first if it is not cached.

    ``build`` writes its files into the (empty) folder it is given; on success the folder is renamed into place
    atomically, together with ``key.json``. If ``build`` raises, nothing is kept.
    """
    found = lookup(kind, description)
    if found is not None:
        return found
    final = artifact_dir(kind, description)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    started = time.monotonic()
    progress.log(f"cache: building {kind}/{final.name} (not in the cache yet)")
    try:
        build(tmp)
        progress.log(f"cache: built {kind}/{final.name} in {time.monotonic() - started:.0f} s")
        progress.end_status()
        (tmp / KEY_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
        if lookup(kind, description) is not None:  # another process finished the same artifact meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():  # an unfinished or foreign folder from an earlier run: move it aside
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, stale / "x")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if lookup(kind, description) is None:  # not a concurrent builder that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        progress.end_status()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


ABANDONED_AFTER_S = 24 * 3600


def _remove_abandoned(final: Path) -> None:
    """Delete temporary folders of this artifact left by a build that was killed (untouched for a day)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
