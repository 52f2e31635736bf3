"""Mixed-adapter batched LoRA: every row of a batch through its own adapter, without merging (Punica's BGMV).

A server that holds many LoRA adapters for one base model receives requests for different adapters at once. Merging
an adapter into the base (W + s·B·A) serves one adapter per copy of the base; instead, keep W shared and add each
row's own low-rank term [Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"; Sheng et al. 2023, "S-LoRA"]:

.. math::

    y_i = x_i W^\\top + s_{a(i)} \\, (x_i A_{a(i)}^\\top) B_{a(i)}^\\top ,
    \\qquad a(i) \\in \\{-1, 0, 1, \\dots\\}, \\; a(i) = -1: \\text{no adapter}

The base product ``x Wᵀ`` is one matrix product for the whole batch: the expensive part (the weight is read once
for all rows) is shared. The low-rank part costs r·(in + out) multiply-adds per row, which for r ≪ in is a few
percent of the base's in·out. Punica calls the row-by-row kernel *BGMV* (batched gather matrix-vector: each row
gathers its adapter's matrices) and the version for runs of rows that share an adapter *SGMV* (segmented gather);
vLLM splits it into a *shrink* kernel (x·Aᵀ, in → r) and an *expand* kernel (· Bᵀ, r → out, added into y); see
``vllm/lora/ops/triton_ops/lora_shrink_op.py`` and ``lora_expand_op.py`` (GPU), and the plain PyTorch versions
``bgmv_shrink`` / ``bgmv_expand`` in ``vllm/lora/ops/torch_ops/lora_ops.py``. Both twins are here:

- :func:`bgmv_reference` — the readable twin: group the rows by adapter and run, per group, exactly the products of
  an unmerged :class:`lora_ref.adapters.lora.LoraLinear` (``x·Aᵀ``, then ``·Bᵀ``, then ``× s``, then added).
- :func:`bgmv_kernel` — the shrink and expand per row, reading the adapters from one stacked, rank-padded array
  (:class:`StackedLora`, vLLM's ``lora_a_stacked`` / ``lora_b_stacked`` layout): the Numba kernel
  :mod:`lora_ref.kernels.lora_batch` (whose own readable twin, row by row in NumPy, is
  :mod:`lora_ref.kernels.lora_batch_reference`). Rows are independent, so a row's result does not depend on which
  other rows share the batch.

:func:`bgmv` is the entry point; it adds the base product (float weight by BLAS, or a 4-bit
:class:`lora_ref.modeling.linear4bit.Linear4bit` by its own kernel) and then the adapters by either twin.
Taught in ``notebooks/13_serving.ipynb``.
"""

from __future__ import annotations

import numpy as np

from lora_ref.autograd.ops import _matmul
from lora_ref.kernels import lora_batch
from lora_ref.modeling.linear4bit import Linear4bit, linear_4bit
from lora_ref.modeling.nn import Linear
from lora_ref.threads import one_blas_thread

__all__ = ["bgmv", "bgmv_reference", "bgmv_kernel", "bgmv_unchecked", "StackedLora", "base_product", "IMPLS"]

IMPLS = ("auto", "numba", "numpy")


class StackedLora:
    """The adapters of one layer packed for the kernel: vLLM's stacked layout, padded to the largest rank.

    ``a`` float32 (n_adapters, r_max, in): slot k holds A_k in its first r_k rows, zeros below;
    ``bt`` float32 (n_adapters, r_max, out): Bᵀ of slot k (so the expand reads B row by row, contiguous in out);
    ``scale`` float32 (n_adapters,); ``rank`` int64 (n_adapters,). Build it once per layer when adapters load (packing
    costs a copy of every adapter); :func:`bgmv` accepts it wherever it accepts a list of (A, B, s).
    """

    def __init__(self, adapters, in_features: int, out_features: int):
        adapters = _check_adapters(adapters, in_features, out_features)
        n = len(adapters)
        r_max = max([a.shape[0] for a, _, _ in adapters], default=1)
        self.a = np.zeros((n, r_max, in_features), np.float32)
        self.bt = np.zeros((n, r_max, out_features), np.float32)
        self.scale = np.zeros(n, np.float32)
        self.rank = np.zeros(n, np.int64)
        self.adapters = adapters  # the unpadded (A, B, s), for the readable twin
        for k, (A, B, s) in enumerate(adapters):
            r = A.shape[0]
            self.a[k, :r] = A
            self.bt[k, :r] = B.T
            self.scale[k] = s
            self.rank[k] = r

    def __len__(self) -> int:
        return len(self.adapters)


def _check_adapters(adapters, in_features: int, out_features: int) -> list:
    out = []
    for k, item in enumerate(adapters):
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise ValueError(f"adapter {k} must be a tuple (A, B, scale), got {type(item).__name__}")
        A, B, s = item
        A = np.ascontiguousarray(A, dtype=np.float32)
        B = np.ascontiguousarray(B, dtype=np.float32)
        if A.ndim != 2 or A.shape[1] != in_features or A.shape[0] < 1:
            raise ValueError(f"adapter {k}: A must have shape (r, {in_features}), got {A.shape}")
        if B.shape != (out_features, A.shape[0]):
            raise ValueError(f"adapter {k}: B must have shape ({out_features}, {A.shape[0]}), got {B.shape}")
        if not np.isfinite(float(s)):
            raise ValueError(f"adapter {k}: scale must be a finite number, got {s!r}")
        out.append((A, B, float(s)))
    return out


def _features(weight) -> tuple[int, int]:
    """(in, out) of a base layer: a float (out, in) array, a :class:`Linear` or a :class:`Linear4bit`."""
    if isinstance(weight, (Linear, Linear4bit)):
        return weight.in_features, weight.out_features
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out, in) array, a Linear or a Linear4bit, got shape {w.shape}")
    return w.shape[1], w.shape[0]


def base_product(x: np.ndarray, weight) -> np.ndarray:
    """x Wᵀ (+ bias) for the whole batch, as the base layer itself computes it: float32 (n, out), a new array.

    A float weight (array or :class:`Linear`) is one BLAS product, the same call as
    :func:`lora_ref.autograd.ops.linear`; a :class:`Linear4bit` runs its own 4-bit product (the fused
    dequantize-and-multiply kernel for few rows), never a float copy of W.
    """
    if isinstance(weight, Linear4bit):
        y = linear_4bit(x, weight.weight.data, weight.quant_state, weight.impl).data
        return y + weight.bias.data if weight.bias is not None else y
    mm = _matmul()  # the product ops.linear makes: the same bits for every thread count
    if isinstance(weight, Linear):
        y = mm(x, weight.weight.data.T)
        return y + weight.bias.data if weight.bias is not None else y
    return mm(x, np.asarray(weight, dtype=np.float32).T)


def bgmv_reference(y: np.ndarray, x: np.ndarray, adapters, index: np.ndarray) -> np.ndarray:
    """The readable twin: add s_a·(x_i A_aᵀ) B_aᵀ into row i of ``y`` for every row with index a ≥ 0; returns ``y``.

    Rows are grouped by adapter and each group runs the unmerged LoRA layer's own products in its own order
    (:func:`lora_ref.autograd.functional.lora_add`: x·Aᵀ, then ·Bᵀ, then × s, then added), so a batch of one adapter
    gives exactly what that adapter's :class:`~lora_ref.adapters.lora.LoraLinear` gives.
    """
    items = adapters.adapters if isinstance(adapters, StackedLora) else adapters
    for a in np.unique(index):
        if a < 0:
            continue
        A, B, s = items[a]
        rows = np.flatnonzero(index == a)  # the segment of rows that use adapter a (SGMV's "segment")
        with one_blas_thread():  # as lora_add: one BLAS thread, the same bits for every thread count
            xa = x[rows] @ A.T  # (m, r): shrink
            delta = xa @ B.T  # (m, out): expand
        delta *= np.float32(s)
        y[rows] += delta
    return y


def bgmv_kernel(y: np.ndarray, x: np.ndarray, adapters, index: np.ndarray) -> np.ndarray:
    """The Numba twin of :func:`bgmv_reference` (same arguments, adds into ``y`` and returns it); ``adapters`` is
    packed into a :class:`StackedLora` first unless it already is one."""
    if not isinstance(adapters, StackedLora):
        adapters = StackedLora(adapters, x.shape[1], y.shape[1])
    if len(adapters) == 0:
        return y
    return lora_batch.pick("bgmv", impl="numba").bgmv_add(y, x, adapters.a, adapters.bt, adapters.scale,
                                                           adapters.rank, index)


def bgmv_unchecked(x: np.ndarray, weight, stacked: StackedLora, index: np.ndarray, impl: str) -> np.ndarray:
    """:func:`bgmv` without its checks, for a caller that built ``x`` (float32, C order), ``stacked`` and ``index``
    (int64) itself: the decoder's inner loop, where the checks would cost more than the low-rank terms. The caller
    also skips the low-rank terms when no row has an adapter (:class:`lora_ref.serving.batch.BatchDecoder` knows it
    once per step; here it would cost a pass over ``index`` in each of the ~210 layers of a step)."""
    y = base_product(x, weight)
    if impl == "numpy":
        return bgmv_reference(y, x, stacked, index)
    return lora_batch.pick("bgmv", y, x, impl=impl).bgmv_add(y, x, stacked.a, stacked.bt, stacked.scale,
                                                              stacked.rank, index)


def bgmv(x, weight, adapters, index, *, out: np.ndarray | None = None, impl: str = "auto") -> np.ndarray:
    """y = x Wᵀ + s_{a(i)} (x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ for a batch whose row i uses adapter ``index[i]`` (−1: none).

    Parameters
    ----------
    x : float32 (n, in)
    weight : the base layer: a float (out, in) array, a :class:`~lora_ref.modeling.nn.Linear` (its bias is added)
        or an NF4/FP4 :class:`~lora_ref.modeling.linear4bit.Linear4bit`.
    adapters : list of (A (r_a, in), B (out, r_a), scale_a) — ranks may differ — or a :class:`StackedLora`.
    index : int (n,), each −1 or a position in ``adapters``.
    out : optional float32 (n, out) to write y into.
    impl : ``"numpy"`` the readable twin, ``"numba"`` the kernel, ``"auto"`` the kernel when the adapters are packed
        already (a :class:`StackedLora`) and the readable twin otherwise (packing a list costs more than it saves).

    Returns float32 (n, out). Nothing is merged: W and every adapter stay as they are.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    in_f, out_f = _features(weight)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != in_f:
        raise ValueError(f"x must have shape (n, {in_f}), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not isinstance(adapters, StackedLora):
        adapters = _check_adapters(adapters, in_f, out_f)
    elif adapters.a.shape[2] != in_f or adapters.bt.shape[2] != out_f:
        raise ValueError(f"stacked adapters are for a ({adapters.bt.shape[2]}, {adapters.a.shape[2]}) layer, "
                         f"the weight is ({out_f}, {in_f})")
    idx = np.asarray(index)
    if idx.shape != (x.shape[0],) or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(f"index must be an int array of shape ({x.shape[0]},), got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -1 or idx.max() >= len(adapters)):
        raise ValueError(f"index values must lie in [-1, {len(adapters)}), got min {idx.min()}, max {idx.max()}")
    y = base_product(x, weight)
    if out is not None:
        if out.shape != y.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {y.shape}, got {out.dtype} {out.shape}")
        out[...] = y
        y = out
    if not np.any(idx >= 0):
        return y
    use_kernel = impl == "numba" or (impl == "auto" and isinstance(adapters, StackedLora))
    return (bgmv_kernel if use_kernel else bgmv_reference)(y, x, adapters, idx)
