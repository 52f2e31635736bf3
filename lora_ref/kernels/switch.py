"""The fast-path contract: compiled kernels, their readable NumPy twins, and the one switch between them.

**The contract.** Every compiled kernel has a readable NumPy twin with the same name and signature in the
matching reference module:

==================================  =====================================  =====================================
kernel module                       readable twins                         operations
==================================  =====================================  =====================================
:mod:`lora_ref.kernels.training`    :mod:`lora_ref.kernels.reference`      rms_norm, swiglu, rotary, attention
                                                                           softmax, cross_entropy, embedding
                                                                           gradient, AdamW update
:mod:`lora_ref.kernels.matmul`      :mod:`lora_ref.kernels.reference`      matmul (the tiled float32 GEMM)
:mod:`lora_ref.quant.kernels`       :mod:`lora_ref.quant.steps`,           the blockwise 4-bit / 8-bit steps,
                                    :mod:`lora_ref.quant.dequant_matmul`   the 4-bit matmuls
:mod:`lora_ref.kernels.lora_batch`  ``kernels.lora_batch_reference``       a mixed-adapter LoRA batch (BGMV)
==================================  =====================================  =====================================

- Twins take and return arrays (or update arrays in place); they never build graph nodes. A forward twin returns
  ``(out, saved)`` and the backward twin of the same name family reads its own ``saved``.
- The autograd composite (:mod:`lora_ref.autograd.functional`, :mod:`lora_ref.autograd.ops`) builds **one** node
  and asks **one** chooser which twin fills it: ``impl = kernels.pick("rms_norm", x, w)`` returns the module
  (reference or kernel) whose ``rms_norm_forward`` / ``rms_norm_backward`` run that node.
- One chooser per kernel module, next to the kernels: a :class:`Twins` table of :class:`Operation` s (the functions
  of each operation and its rule for ``impl="auto"``); its :meth:`Twins.pick` is the only place a fast version is
  chosen. Making the table checks that every function exists in both modules with the same signature, so a kernel
  without a twin fails at import; ``tests/kernels/test_twin_registry.py`` enumerates :data:`TWINS` and fails if a
  pair has no twin test.
- ``impl=`` arguments of the public API (``quantize_4bit(..., impl="numba")``, ``Linear4bit(impl="auto")``) are a
  user-facing override passed to the same chooser: ``"numpy"`` the readable twin, ``"numba"`` the kernel,
  ``"auto"`` the operation's rule.

**The rule for "auto".** For the training kernels: the switch below is on and every array is float32 (the
training dtype; float64 — gradient checks, reference values — always runs the readable twin), and the shapes fit
the kernel. For the blockwise quantization steps: the switch is on (their twins agree bit for bit). For the 4-bit
matmuls: by the number of input rows (:data:`lora_ref.quant.kernels.AUTO_DEQUANTIZE_ROWS`), not by the switch —
storing 4 bits is the point of a QLoRA layer, and the fused kernel is its memory-light path.

**The switch:**

- ``LORA_REF_FAST=0`` in the environment runs the readable twins (wherever the rule consults the switch);
  ``LORA_REF_FAST=1`` the fast paths. Unset, the fast paths are on unless Numba's JIT is disabled
  (``NUMBA_DISABLE_JIT=1`` turns compiled loops into Python loops, far slower than NumPy on training-size arrays).
- :func:`set_enabled` changes it for the process; ``with readable():`` / ``with fast_paths():`` for a block.

What the fusion buys is described in :mod:`lora_ref.kernels.training`; ``tests/kernels/test_fast_paths.py``,
``test_kernels.py`` (and, with ``NUMBA_DISABLE_JIT=1``, ``test_kernels_nojit.py``) hold every pair equal.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import numpy as np

__all__ = ["enabled", "set_enabled", "readable", "fast_paths", "applies", "IMPLS", "Operation", "Twins", "TWINS"]


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
def _switched(flag: bool) -> Iterator[None]:
    """The switch set to ``flag`` inside the block, and back to what it was after it, even on an error."""
    prev = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(prev)


def readable() -> contextlib.AbstractContextManager[None]:
    """Run the block with the readable NumPy twins (the reference paths)."""
    return _switched(False)


def fast_paths() -> contextlib.AbstractContextManager[None]:
    """Run the block with the fast paths."""
    return _switched(True)


def applies(*arrays: np.ndarray) -> bool:
    """Whether a fast path should run on these arrays: the switch is on and every one is float32."""
    return _enabled and all(a.dtype == np.float32 for a in arrays)


# ================================================================================================ the chooser
IMPLS = ("auto", "numpy", "numba")
"""Values of an ``impl=`` override: the operation's rule, the readable twin, the compiled kernel."""


@dataclass(frozen=True)
class Operation:
    """One operation with two implementations.

    ``functions`` are the names it is made of (e.g. ``("rms_norm_forward", "rms_norm_backward")``), the same in the
    reference module and in the kernel module; ``reference`` is the module with the readable twins; ``auto`` is
    the rule for ``impl="auto"``: given the arguments the composite passes to :meth:`Twins.pick`, whether the
    kernel runs.
    """

    functions: tuple[str, ...]
    reference: ModuleType
    auto: Callable[..., bool]


class Twins:
    """The chooser of one kernel module: its operations, each with the readable twin and the rule for "auto".

    Made at the bottom of the kernel module (``PICK = Twins(sys.modules[__name__], {...})``), after its functions:
    it checks that every function exists in both modules with the same signature and registers itself in
    :data:`TWINS`.
    """

    def __init__(self, kernel: ModuleType, operations: dict[str, Operation]):
        self.kernel = kernel
        self.operations = dict(operations)
        for op_name, op in self.operations.items():
            for fn in op.functions:
                fast, slow = getattr(kernel, fn, None), getattr(op.reference, fn, None)
                if fast is None or slow is None:
                    missing = kernel if fast is None else op.reference
                    raise ValueError(f"operation {op_name!r}: {missing.__name__} has no function {fn!r}; every "
                                     f"kernel needs a readable twin of the same name")
                if list(inspect.signature(fast).parameters) != list(inspect.signature(slow).parameters):
                    raise ValueError(f"operation {op_name!r}: {kernel.__name__}.{fn} and {op.reference.__name__}.{fn} "
                                     f"have different signatures")
        TWINS[kernel.__name__] = self

    def pick(self, name: str, *args, impl: str = "auto") -> ModuleType:
        """The module whose functions of operation ``name`` run on ``args``: the kernel module or the reference.

        ``impl``: ``"auto"`` applies the operation's rule to ``args``; ``"numpy"`` / ``"numba"`` force the readable
        twin / the kernel. The functions are looked up on the returned module when called, so a test that
        replaces one (a spy) sees the call.
        """
        op = self.operations.get(name)
        if op is None:
            raise ValueError(f"{self.kernel.__name__} has no operation {name!r}; it has {', '.join(self.operations)}")
        if impl == "auto":
            return self.kernel if op.auto(*args) else op.reference
        if impl == "numba":
            return self.kernel
        if impl == "numpy":
            return op.reference
        raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'numpy' or 'numba'")

    def pairs(self) -> list[tuple[str, str, ModuleType]]:
        """(operation, function name, reference module) for every function of every operation."""
        return [(op_name, fn, op.reference) for op_name, op in self.operations.items() for fn in op.functions]


TWINS: dict[str, Twins] = {}
"""Kernel module name → its chooser, filled as the kernel modules are imported."""


def float32_arrays(*args) -> bool:
    """The "auto" rule of the training kernels: the switch is on and every array argument is float32."""
    return applies(*(a for a in args if isinstance(a, np.ndarray)))
