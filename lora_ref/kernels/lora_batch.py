"""The Numba kernel of a mixed-adapter LoRA batch (Punica's BGMV; vLLM's shrink + expand), twin of
:mod:`lora_ref.kernels.lora_batch_reference`.

Row i of the batch uses adapter index[i] (−1: none); the adapters of one layer are packed in one array padded to the
largest rank, so the kernel reads any row's adapter the same way. Per row: the shrink x_i·A_aᵀ (r dot products of
length in) into a small buffer, the expand of that buffer by Bᵀ_a (r rows of length out, accumulated), then × s_a
and added into y_i. A row's arithmetic never involves another row, so its result does not depend on the batch it is
in (tested bit for bit). The caller (:func:`lora_ref.serving.bgmv.bgmv`) adds the base product x·Wᵀ first.
Taught in ``notebooks/13_serving.ipynb``; the GPU versions are ``vllm/lora/ops/triton_ops/lora_shrink_op.py`` and
``lora_expand_op.py``.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit

from lora_ref.kernels import lora_batch_reference as reference
from lora_ref.kernels import switch
from lora_ref.kernels.jit import FAST_MATH

__all__ = ["bgmv_add", "pick", "PICK"]


@njit(cache=True, fastmath=FAST_MATH)
def _bgmv_rows(y, x, a_stacked, bt_stacked, scale, rank, index):
    """``reassoc`` lets LLVM split each dot product into vector lanes (an order fixed by the length ``in``, the same
    for every row); ``contract`` fuses multiply-adds. The padding beyond rank r_a is skipped."""
    n, d_in = x.shape
    d_out = y.shape[1]
    r_max = a_stacked.shape[1]
    xa = np.empty(r_max, np.float32)
    delta = np.empty(d_out, np.float32)
    for i in range(n):
        a = index[i]
        if a < 0:
            continue
        r = rank[a]
        for j in range(r):  # shrink
            acc = np.float32(0.0)
            for k in range(d_in):
                acc += x[i, k] * a_stacked[a, j, k]
            xa[j] = acc
        delta[:] = 0.0
        for j in range(r):  # expand
            c = xa[j]
            for o in range(d_out):
                delta[o] += c * bt_stacked[a, j, o]
        s = scale[a]
        for o in range(d_out):
            y[i, o] += delta[o] * s
    return y


def bgmv_add(y: np.ndarray, x: np.ndarray, a_stacked: np.ndarray, bt_stacked: np.ndarray, scale: np.ndarray,
             rank: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Add s_a·(x_i A_aᵀ) B_aᵀ into row i of ``y`` (float32 (n, out), C order) for every row whose ``index`` is
    ≥ 0; returns ``y``. ``x`` float32 (n, in); ``a_stacked``, ``bt_stacked``, ``scale`` float32; ``rank``, ``index``
    int64 (see :mod:`lora_ref.kernels.lora_batch_reference`)."""
    return _bgmv_rows(y, x, a_stacked, bt_stacked, scale, rank, index)


PICK = switch.Twins(sys.modules[__name__], {
    "bgmv": switch.Operation(("bgmv_add",), reference, switch.float32_arrays),
})
pick = PICK.pick
