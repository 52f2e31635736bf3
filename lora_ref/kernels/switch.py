"""The switch between the fast paths (fused Numba kernels) and their readable NumPy twins.

Every fused operation of the training step (RMSNorm, SwiGLU, rotary embedding, the attention softmax with its
causal mask, cross-entropy, the embedding gradient, the AdamW update) has two implementations with one meaning:

- the **readable twin**, NumPy written the way the equation reads (in :mod:`lora_ref.autograd.functional`, :mod:`lora_ref.autograd.ops`,
  :mod:`lora_ref.training.optim`): the one taught in the notebooks and the one the reference vectors are computed with;
- the **fast path**, a compiled loop in :mod:`lora_ref.kernels.training` that makes one pass over memory where the
  twin makes several and allocates one array where the twin allocates five.

``tests/kernels/test_fast_paths.py`` holds the two equal (each operation, its gradients, and a whole model's loss and
gradients), with the JIT on and, in a subprocess, with ``NUMBA_DISABLE_JIT=1``.

The switch:

- ``LORA_REF_FAST=0`` in the environment runs the readable twins everywhere; ``LORA_REF_FAST=1`` the fast paths.
  Unset, the fast paths are on unless Numba's JIT is disabled (``NUMBA_DISABLE_JIT=1`` turns compiled loops into
  Python loops, far slower than NumPy on training-size arrays).
- :func:`set_enabled` changes it for the process; ``with readable():`` / ``with fast_paths():`` for a block.

The fast paths cover float32 arrays (the training dtype). float64 (gradient checks, reference values) always runs
the readable twin.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np

__all__ = ["enabled", "set_enabled", "readable", "fast_paths", "applies"]


def _default() -> bool:
    env = os.environ.get("LORA_REF_FAST")
    if env is not None and env.strip() != "":
        if env.strip() not in ("0", "1"):
            raise ValueError(f"LORA_REF_FAST must be 0 or 1, got {env!r}")
        return env.strip() == "1"
    from numba import config

    return not config.DISABLE_JIT


_enabled: bool = _default()


def enabled() -> bool:
    """Whether the fast paths are on."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the fast paths on or off for the whole process; return the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


@contextlib.contextmanager
def readable() -> Iterator[None]:
    """Run the block with the readable NumPy twins (the reference paths)."""
    prev = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)


@contextlib.contextmanager
def fast_paths() -> Iterator[None]:
    """Run the block with the fast paths."""
    prev = set_enabled(True)
    try:
        yield
    finally:
        set_enabled(prev)


def applies(*arrays: np.ndarray) -> bool:
    """Whether a fast path should run on these arrays: the switch is on and every one is float32."""
    return _enabled and all(a.dtype == np.float32 for a in arrays)
