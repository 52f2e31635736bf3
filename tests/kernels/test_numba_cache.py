"""Numba's cache goes stale when any module of the package changes (lora_ref/kernels/cache.py)."""

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import numba
import pytest

from lora_ref.kernels import cache


def _tree(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "jit.py").write_text("from numba import njit\n\n@njit\ndef helper(x):\n    return x + 1\n")
    (pkg / "cli.py").write_text("print('no compiled code here')\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "stale.py").write_text("# not source\n")
    return pkg


def test_the_key_follows_every_module_and_only_modules(tmp_path):
    pkg = _tree(tmp_path)
    key = cache.source_key(pkg)
    assert len(key) == 16 and key == cache.source_key(pkg)

    (pkg / "__pycache__" / "stale.py").write_text("# edited, still not source\n")
    (pkg / "notes.txt").write_text("not a module\n")
    assert cache.source_key(pkg) == key

    (pkg / "cli.py").write_text("print('edited')\n")              # constants of any module can be compiled in
    edited = cache.source_key(pkg)
    assert edited != key
    (pkg / "kernels" / "jit.py").rename(pkg / "kernels" / "intrinsics.py")
    assert cache.source_key(pkg) != edited


def test_an_unreadable_file_does_not_stop_the_key(tmp_path):
    """An editor's lock file (a dangling symbolic link named .#x.py) or a file removed during the walk."""
    pkg = _tree(tmp_path)
    os.symlink(tmp_path / "nowhere", pkg / "kernels" / ".#jit.py")
    assert len(cache.source_key(pkg)) == 16


def _cached_dispatchers():
    """Every cached Numba function of every lora_ref module that defines one."""
    found = []
    for path in sorted(cache.PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or "cache=True" not in path.read_text(encoding="utf-8"):
            continue
        name = ".".join(path.relative_to(cache.PACKAGE.parent).with_suffix("").parts)
        module = importlib.import_module(name)
        found += [(name, attr, obj) for attr, obj in vars(module).items()
                  if hasattr(getattr(obj, "_cache", None), "_impl") and inspect.getmodule(obj.py_func) is module]
    return found


_KEYED_IN_A_FRESH_PROCESS = """
import importlib, inspect, json, sys
module = importlib.import_module(sys.argv[1])           # the first lora_ref kernel module this process imports
found = [(attr, type(obj._cache._impl.locator).__name__, obj._cache._impl.locator.get_source_stamp()[-1])
         for attr, obj in vars(module).items()
         if hasattr(getattr(obj, "_cache", None), "_impl") and inspect.getmodule(obj.py_func) is module]
print(json.dumps(found))
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="no cache without the JIT")
def test_every_cached_kernel_of_the_package_is_keyed():
    """Each module with cached kernels, imported first in a fresh process (so no other module has installed the
    keyed locators for it), gives every one of its cached kernels a keyed locator, stamped with the package's key."""
    import json

    modules = sorted({name for name, _, _ in _cached_dispatchers()})
    assert cache.installed() and len(modules) >= 6
    key = cache.source_key()
    total = 0
    for name in modules:
        run = subprocess.run([sys.executable, "-c", _KEYED_IN_A_FRESH_PROCESS, name], capture_output=True, text=True,
                             cwd=cache.PACKAGE.parent, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        for attr, locator, stamp_key in json.loads(run.stdout.strip().splitlines()[-1]):
            assert locator.startswith("LoraRefKeyed"), f"{name}.{attr}: {locator}"
            assert stamp_key == key, f"{name}.{attr}"
            total += 1
    assert total >= 20


_STALE = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from lora_ref.kernels import cache
if {keyed}:
    cache.PACKAGE = Path({root!r}) / "pkg"
    cache._process_key.cache_clear()
    cache.install()
import pkg.user
print(pkg.user.f(1))
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="no cache without the JIT")
def test_an_edited_helper_in_another_file_is_not_loaded_stale(tmp_path):
    """A cached function that inlines a helper from another file: after an edit to the helper's file alone, a new
    process must run the new helper. Two runs in a package the keyed locators serve; the first compiles and saves,
    the helper changes, the second must print the new value. (With Numba's own locators, keyed=False, the second
    run printed the old 20 in place of 230.)"""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("from numba import njit\n\n@njit(inline='always')\ndef h(x):\n    return x + 1\n")
    (pkg / "user.py").write_text(textwrap.dedent("""
        from numba import njit
        from pkg.helper import h

        @njit(cache=True)
        def f(x):
            return h(x) * 10
    """))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"      # Python's own .pyc of the helper would be as stale within a second

    def run():
        out = subprocess.run([sys.executable, "-c", _STALE.format(root=str(tmp_path), keyed=True)],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert run() == "20"
    assert any((pkg / "__pycache__").glob("user.f-*.nbi"))           # saved in Numba's usual place
    (pkg / "helper.py").write_text("from numba import njit\n\n@njit(inline='always')\ndef h(x):\n    return x + 22\n")
    assert run() == "230"
