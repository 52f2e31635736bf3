"""The kernel tests again with NUMBA_DISABLE_JIT=1: the kernels run as plain Python and must give the same
answers (the fast paths rely on Numba-only helpers, lora_ref.kernels.jit, which have Python fallbacks)."""

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="this process already runs without JIT")
def test_kernel_tests_pass_without_jit():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", HYPOTHESIS_MAX_EXAMPLES="6")
    tests = ["test_absmax_blocks", "test_encode_4bit", "test_pack_and_unpack_nibbles", "test_decode_4bit",
             "test_encode_and_decode_8bit", "test_public_api_with_numba_equals_numpy",
             "test_matmul_equals_its_twin", "test_matmul_4bit_equals", "test_matmul_4bit_t_equals",
             "test_fused_weight_is", "test_twins_are_distinct", "test_micro_kernel_tile",
             "test_the_tile_fits_the_vector_registers", "test_sum32_adds_the_lanes_pairwise",
             "test_the_x_reorderings_are_the_lane_orders", "test_matmul_4bit_one_row_on_block_boundaries",
             "test_prefetch_changes_nothing"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernels.py",
         "-k", " or ".join(tests)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="this process already runs without JIT")
def test_chunked_matmul_tests_pass_without_jit():
    """lora_ref.kernels.blas has no compiled code; with the JIT off (and so the fast paths off by default) it must
    still equal np.matmul, and Linear must still pick it only when the fast paths are switched on."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_blas.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
