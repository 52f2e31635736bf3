"""``lora_ref.threads``: wait-policy defaults set at import (never overriding the user's), one thread count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from lora_ref import threads
from lora_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env_after_import(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in threads.DEFAULTS}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    code = ("import os, json, lora_ref; "
            "print(json.dumps({k: os.environ.get(k) for k in lora_ref.threads.DEFAULTS}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_sets_the_wait_policies_and_keeps_the_users():
    assert _env_after_import({}) == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert _env_after_import({"OMP_WAIT_POLICY": "active"})["OMP_WAIT_POLICY"] == "active"


def test_set_threads_sets_numba_and_the_blas():
    before = threads.thread_info()
    try:
        info = threads.set_threads(1)
        assert info["numba_threads"] == numba.get_num_threads() == 1 and info["blas_threads"] == 1
        assert threads.set_threads(None)["numba_threads"] == 1  # None leaves things alone
    finally:
        numba.set_num_threads(before["numba_threads"])
        threads.set_threads(before["blas_threads"])
    for bad in (0, -1, 1.5, True, numba.config.NUMBA_NUM_THREADS + 1):
        with pytest.raises(ValueError, match="threads must be"):
            threads.set_threads(bad)


def test_limited_restores_both_pools():
    before = threads.thread_info()
    with threads.limited(1):
        inside = threads.thread_info()
    assert inside["numba_threads"] == 1 and inside["blas_threads"] == 1
    assert threads.thread_info() == before
    with threads.limited(None):
        assert threads.thread_info() == before


def test_threads_flag_on_compute_commands(capsys):
    for command in ("generate", "chat", "eval", "finetune", "merge", "quantize", "tour"):
        assert main([command, "--help"]) == 0
        assert "--threads N" in capsys.readouterr().out, command
    code = main(["eval", "--model", "x", "--data", "y", "--threads", str(numba.config.NUMBA_NUM_THREADS + 1)])
    err = capsys.readouterr().err
    assert code == 2 and "--threads must be at most" in err and err.count("\n") == 1
