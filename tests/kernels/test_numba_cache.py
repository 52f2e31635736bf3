"""Numba's cache folder is keyed by the source of every module with compiled code (lora_ref/kernels/cache.py)."""

import os
import shutil

import numba

from lora_ref.kernels import cache


def _tree(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "jit.py").write_text("from numba import njit\n\n@njit\ndef helper(x):\n    return x + 1\n")
    (pkg / "kernels" / "user.py").write_text("from numba import njit\nfrom .jit import helper\n")
    (pkg / "cli.py").write_text("print('no compiled code here')\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "stale.py").write_text("import numba  # not source: skipped\n")
    return pkg


def test_the_key_follows_every_file_that_mentions_numba_and_only_those(tmp_path):
    pkg = _tree(tmp_path)
    key = cache.source_key(pkg)
    assert len(key) == 16 and key == cache.source_key(pkg)

    (pkg / "cli.py").write_text("print('edited, still no compiled code')\n")
    (pkg / "__pycache__" / "stale.py").write_text("import numba  # edited\n")
    assert cache.source_key(pkg) == key                     # neither holds compiled code

    (pkg / "kernels" / "jit.py").write_text("from numba import njit\n\n@njit\ndef helper(x):\n    return x + 2\n")
    edited = cache.source_key(pkg)
    assert edited != key                                     # the helper another module inlines

    shutil.move(pkg / "kernels" / "user.py", pkg / "kernels" / "caller.py")
    assert cache.source_key(pkg) != edited                   # a renamed module too


def test_the_folder_is_keyed_and_a_users_choice_wins(tmp_path, monkeypatch):
    pkg = _tree(tmp_path)
    assert cache.cache_dir(pkg, "0123456789abcdef") == pkg / "__pycache__" / "numba-0123456789abcdef"
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "keyed" / "numba-k")
    env = {"NUMBA_CACHE_DIR": "/somewhere/else"}
    assert cache.use_keyed_cache(env) is None and env == {"NUMBA_CACHE_DIR": "/somewhere/else"}
    env = {}
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", numba.core.config.CACHE_DIR)   # restored afterwards
    monkeypatch.setattr(cache, "FOLDER", cache.FOLDER)
    assert cache.use_keyed_cache(env) == tmp_path / "keyed" / "numba-k"
    assert env["NUMBA_CACHE_DIR"] == str(tmp_path / "keyed" / "numba-k") == numba.core.config.CACHE_DIR


def test_old_folders_beyond_the_newest_few_are_removed(tmp_path):
    parent = tmp_path / "__pycache__"
    olds = []
    for i in range(cache.KEEP + 2):
        d = parent / f"numba-old{i}"
        d.mkdir(parents=True)
        os.utime(d, (1000 + i, 1000 + i))
        olds.append(d)
    current = parent / "numba-current"
    current.mkdir()
    cache._prune(current)
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        ["numba-current"] + [d.name for d in olds[-cache.KEEP:]])


def test_this_session_compiles_into_the_keyed_folder_or_the_users():
    """The test session itself caches in the keyed folder of the sources it runs (make test and CI start without
    NUMBA_CACHE_DIR), so an edited kernel helper is never loaded stale from its callers' cache entries; a folder
    the user chose is used as it is."""
    assert numba.core.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"]
    if cache.FOLDER is not None:
        assert cache.FOLDER == cache.cache_dir() and os.environ["NUMBA_CACHE_DIR"] == str(cache.FOLDER)
