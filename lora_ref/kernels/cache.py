"""Numba's on-disk cache, made stale by an edit to any module of lora_ref, not only the one that defines a kernel.

Numba saves a compiled function (``njit(cache=True)``) and loads it again in later processes when the *source stamp*
of the file that defines it is unchanged (its content hash in Numba 0.68, its timestamp and size before). A kernel
that inlines a helper or an intrinsic from another file (every 4-bit kernel inlines :mod:`lora_ref.kernels.jit`),
calls a compiled function defined elsewhere, or reads a module-level constant of another module (Numba freezes
globals at compile time: ``KC`` of :mod:`lora_ref.kernels.reference`, the thresholds of :mod:`lora_ref.quant.nf4`)
carries that code or value in its own cache entry, so after an edit to the other file alone it keeps running the
old machine code. Numba documents this: "Cache invalidation fails to recognize changes in functions defined in a
different file" and "Global variables are treated as constants" (the notes on ``cache=True`` in its user guide,
``docs/source/user/jit.rst``; numba/numba#1833, #9304). For a library whose readers change the kernels to see what
happens, that is a trap: the tests then run the old code and pass (seen here: a deliberately wrong
:func:`lora_ref.kernels.jit.rank16` left every encoder test green until the cache files were deleted).

:func:`install` (run when :mod:`lora_ref.kernels.jit` is imported, which every module with cached kernels imports
before defining any) puts, in front of Numba's own cache
locators, a keyed twin of each that takes only functions defined in this package and adds :func:`source_key` (a
hash of every ``.py`` file of the package) to their source stamp. The cache stays where Numba puts it (the
``__pycache__`` beside each module, ``NUMBA_CACHE_DIR`` when set); after an edit to any module of the package the
stamps no longer match, and every kernel compiles once more (the test suite then spends a few minutes compiling, as
on a fresh clone). Other packages' functions and child processes are untouched: nothing goes through the
environment. The list of locators is Numba's internals (``numba.core.caching.CacheImpl._locator_classes``; the
classes in it are named with a leading underscore before Numba 0.68, which the twins' names drop): if it is not found
nothing is installed and ``tests/kernels/test_numba_cache.py`` fails, so a Numba upgrade that moves it is noticed.
Numba's ``NUMBA_CACHE_LOCATOR_CLASSES`` setting replaces the list altogether, and then the twins are not asked. A
package run from a zip file has no ``.py`` files to hash, so there the key never changes.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

__all__ = ["source_key", "install", "PACKAGE", "installed"]

PACKAGE = Path(__file__).resolve().parents[1]


def source_key(package: Path = PACKAGE) -> str:
    """16 hex digits of the SHA-256 of every ``.py`` file under ``package`` (``__pycache__`` folders skipped): each
    file's path relative to ``package`` and its bytes, in sorted path order. A file that cannot be read (an editor's
    lock file, a file removed during the walk) counts by its name alone."""
    paths = []
    for folder, subfolders, files in os.walk(package):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _process_key() -> str:
    """:func:`source_key` of the installed package, once per process (Numba asks for a stamp at every load and
    save)."""
    return source_key(PACKAGE)


def _inside_package(py_file) -> bool:
    try:
        return Path(py_file).resolve().is_relative_to(PACKAGE)
    except (OSError, ValueError):
        return False


def _keyed(locator: type) -> type:
    """A subclass of Numba locator class ``locator`` for this package's functions only, its source stamp extended by
    the package's :func:`source_key`."""

    class Keyed(locator):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not _inside_package(py_file):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), "lora_ref", _process_key())

    Keyed.__name__ = f"LoraRefKeyed{locator.__name__.lstrip('_')}"
    return Keyed


def _cache_impl():
    from numba.core import caching

    return getattr(caching, "CacheImpl", None)


def installed() -> bool:
    """Whether Numba's cache asks :func:`_keyed` locators first."""
    impl = _cache_impl()
    return impl is not None and any(getattr(c, "__name__", "").startswith("LoraRefKeyed")
                                    for c in getattr(impl, "_locator_classes", ()))


def install() -> bool:
    """Put a keyed twin of each of Numba's cache locators in front of them (once); True if they are in place."""
    impl = _cache_impl()
    classes = getattr(impl, "_locator_classes", None)
    if impl is None or not isinstance(classes, list):
        return False
    if not installed():
        impl._locator_classes = [_keyed(c) for c in classes] + list(classes)
    return True
