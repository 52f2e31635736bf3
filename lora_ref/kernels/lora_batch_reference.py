"""The readable NumPy twin of :mod:`lora_ref.kernels.lora_batch`: the low-rank terms of a mixed-adapter batch, row
by row, from the adapters packed in one rank-padded array (vLLM's ``lora_a_stacked`` layout).

For each row i with adapter a = index[i] ≥ 0 (−1: none), with r = rank[a]:

    xa  = A_a[:r] · x_i          (shrink: r dot products of length in)
    y_i += s_a · (xa · Bᵀ_a[:r])  (expand: out numbers, each a sum over r)

``a_stacked`` (n_adapters, r_max, in) holds A_a in its first rank[a] rows; ``bt_stacked`` (n_adapters, r_max, out)
holds B_aᵀ likewise; the padding beyond rank[a] is never read. Taught in ``notebooks/13_serving.ipynb``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bgmv_add"]


def bgmv_add(y: np.ndarray, x: np.ndarray, a_stacked: np.ndarray, bt_stacked: np.ndarray, scale: np.ndarray,
             rank: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Add s_a·(x_i A_aᵀ) B_aᵀ into row i of ``y`` (n, out) for every row whose ``index`` is ≥ 0; returns ``y``."""
    for i, a in enumerate(index):
        if a < 0:
            continue
        r = rank[a]
        xa = a_stacked[a, :r] @ x[i]  # (r,): shrink
        y[i] += (xa @ bt_stacked[a, :r]) * scale[a]  # (out,): expand, scaled, added
    return y
