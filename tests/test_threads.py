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
    assert _env_after_import({}) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    # the user's policy stands, and no spin count of ours overrides it (libgomp prefers GOMP_SPINCOUNT)
    assert _env_after_import({"OMP_WAIT_POLICY": "active"}) == {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": None,
                                                                  "KMP_BLOCKTIME": "0"}
    assert _env_after_import({"GOMP_SPINCOUNT": "0"})["GOMP_SPINCOUNT"] == "0"


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


def test_idle_cpus_counts_the_other_processes_busy_cpus(monkeypatch):
    available = len(os.sched_getaffinity(0))
    total = os.cpu_count()
    samples = iter([(0, 0), (1000, 1000)])  # every CPU busy over the probe
    assert threads.idle_cpus(0.0, times=lambda: next(samples)) == 1  # at least one thread
    samples = iter([(0, 0), (0, 1000)])  # every CPU idle
    assert threads.idle_cpus(0.0, times=lambda: next(samples)) == available
    if total >= 2 and available == total:  # one CPU's worth busy out of `total`: one thread fewer
        samples = iter([(0, 0), (1000 // total, 1000)])
        assert threads.idle_cpus(0.0, times=lambda: next(samples)) == available - 1
    assert threads.idle_cpus(0.0, times=lambda: None) == available  # no /proc/stat: every CPU
    assert 1 <= threads.idle_cpus(0.01) <= available  # the real /proc/stat


def test_default_threads_reads_the_environment_first(monkeypatch):
    monkeypatch.setenv("LORA_REF_THREADS", "1")
    assert threads.default_threads() == 1
    for bad in ("0", "two"):
        monkeypatch.setenv("LORA_REF_THREADS", bad)
        with pytest.raises(ValueError, match="LORA_REF_THREADS must be a positive integer"):
            threads.default_threads()


def test_compute_commands_start_with_the_default_threads(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(threads, "set_threads", lambda n: seen.append(n) or {})
    monkeypatch.setenv("LORA_REF_THREADS", "1")
    main(["eval", "--model", str(tmp_path / "missing"), "--data", "y"])  # fails after the threads are set
    capsys.readouterr()
    assert seen == [1]


def test_results_do_not_depend_on_the_thread_count():
    """Why a load-dependent default is safe: the model's products (``blas.matmul``) are one-thread BLAS calls on
    chunks that keep every element's bits (NumPy's own ``a @ b`` on two OpenBLAS threads need not: its threaded
    driver sums some shapes, and on its AVX2 cores this one, in another order; see tests/kernels/test_blas.py), and
    the kernels sum in a fixed number of chunks, so one and two threads give the same bits."""
    import numpy as np

    from lora_ref.autograd import functional as F
    from lora_ref.autograd.tensor import Tensor
    from lora_ref.kernels import blas

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 576)).astype(np.float32)
    b = rng.normal(size=(576, 1536)).astype(np.float32)
    w = rng.normal(size=576).astype(np.float32)
    out = []
    for n in (1, 2):
        with threads.limited(n):
            x = Tensor(a, requires_grad=True)
            y = F.rms_norm(x, Tensor(w), 1e-5)
            (y.sum()).backward()
            out.append((blas.matmul(a, b), y.data.copy(), x.grad.copy()))
    for one, two in zip(*out):
        assert np.array_equal(one, two)


def test_main_leaves_the_callers_thread_counts_as_they_were(tmp_path, capsys):
    before = threads.thread_info()
    main(["eval", "--model", str(tmp_path / "missing"), "--data", "y", "--threads", "1"])
    capsys.readouterr()
    after = threads.thread_info()
    assert (after["numba_threads"], after["blas_threads"]) == (before["numba_threads"], before["blas_threads"])
