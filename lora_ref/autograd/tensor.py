"""A minimal reverse-mode autograd over NumPy arrays.

A :class:`Tensor` wraps an ``ndarray`` (``.data``). Every differentiable operation (in :mod:`lora_ref.autograd.ops` and
:mod:`lora_ref.autograd.functional`) makes a new Tensor that remembers its parents and one small *local backward rule*: a
function from the gradient of the output to the gradients of the inputs. :meth:`Tensor.backward` visits the graph
in reverse topological order and applies the chain rule, one rule at a time.

Conventions (the same as PyTorch):

- float32 by default; float64 where precision matters (gradient checks). Python numbers and lists become float32,
  NumPy arrays keep their float32/float64 dtype, integer arrays stay integer (token ids).
- Only leaves (tensors made by the user, e.g. parameters) keep ``.grad``; intermediate gradients are freed as soon
  as they have been passed on, and so is the graph (call ``backward`` once per forward).
- Inside ``with no_grad():`` nothing is recorded (inference, optimizer updates).

The operators of a Tensor (``a + b``, ``a @ b``, ``a.sum()`` …) are the primitives of :mod:`lora_ref.autograd.ops`,
installed on the class by that module (see the end of ``ops.py``).

Taught in ``notebooks/01_autograd.ipynb``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

_state = threading.local()


def is_grad_enabled() -> bool:
    """Whether operations are being recorded for backward."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    """Record the graph (or not) inside the block; the previous mode comes back after it, even on an error."""
    prev = is_grad_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = prev


def no_grad() -> contextlib.AbstractContextManager[None]:
    """Context manager in which no graph is recorded (inference, parameter updates)."""
    return _grad_mode(False)


def enable_grad() -> contextlib.AbstractContextManager[None]:
    """Context manager that records the graph again inside a ``no_grad`` block."""
    return _grad_mode(True)


def _to_array(data) -> np.ndarray:
    if isinstance(data, Tensor):
        return data.data
    if isinstance(data, np.ndarray):
        if data.dtype.kind == "f" and data.dtype not in (np.float32, np.float64):
            return data.astype(np.float32)  # float16 / bfloat16 inputs compute in float32
        return data
    a = np.asarray(data)
    if a.dtype.kind in "fc" or a.dtype == np.float64:
        a = a.astype(np.float32)
    return a


BackwardFn = Callable[[np.ndarray], Sequence["np.ndarray | None"]]


class Tensor:
    """An ndarray with a gradient and the record of how it was made.

    Parameters
    ----------
    data : array_like
        The value. See the module docstring for the dtype rules.
    requires_grad : bool
        Whether gradients should flow to (and be stored in) this tensor.
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "__weakref__")
    __array_priority__ = 1000  # ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad: bool = False):
        self.data: np.ndarray = _to_array(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._parents: tuple[Tensor, ...] = ()
        self._backward: BackwardFn | None = None

    # ----------------------------------------------------------------------------------------- graph building
    @staticmethod
    def _make(data: np.ndarray, parents: tuple["Tensor", ...], backward: BackwardFn) -> "Tensor":
        """Wrap an op's output; record ``parents`` and the local rule only when a gradient can flow."""
        out = Tensor.__new__(Tensor)
        out.data = data
        out.grad = None
        out._parents = ()
        out._backward = None
        out.requires_grad = False
        if is_grad_enabled() and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
        return out

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def backward(self, grad: np.ndarray | None = None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` (reverse-mode chain rule).

        ``grad`` defaults to 1 for a one-element tensor (a loss). The graph is freed afterwards.
        """
        if not self.requires_grad:
            raise ValueError("backward() on a tensor that does not require grad (was it made under no_grad?)")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a one-element tensor, got shape {self.shape}")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.data.shape:
            raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {self.data.shape}")

        # reverse topological order, iteratively (deep graphs must not hit the recursion limit)
        order: list[Tensor] = []
        seen: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for p in node._parents:
                if p.requires_grad and id(p) not in seen:
                    stack.append((p, False))

        grads: dict[int, np.ndarray] = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: keep its gradient
                if node.grad is None:
                    node.grad = np.array(g, dtype=node.data.dtype, copy=True)
                else:
                    node.grad += g
                continue
            parent_grads = node._backward(g)
            for p, pg in zip(node._parents, parent_grads):
                if pg is None or not p.requires_grad:
                    continue
                key = id(p)
                if key in grads:
                    grads[key] = grads[key] + pg
                else:
                    grads[key] = pg
            node._parents = ()  # free the graph as we go
            node._backward = None

    # ----------------------------------------------------------------------------------------- conversions
    def __array__(self, dtype=None, copy=None):
        a = self.data
        if dtype is not None and a.dtype != np.dtype(dtype):
            return a.astype(dtype)
        if copy:
            return a.copy()
        return a

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self):
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = bool(flag)
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, precision=4, threshold=20)}, dtype={self.data.dtype}{flag})"

    # ----------------------------------------------------------------------------------------- operators
    # The operators (+ − · / ** @, unary −, [ ]) and the methods sum, mean, max, reshape, transpose / permute,
    # swapaxes, T, exp, log, sqrt, rsqrt, sigmoid, silu, tanh, relu and astype are the primitives of
    # lora_ref.autograd.ops, which installs them on this class when it is imported (importing lora_ref.autograd,
    # or any module in it, imports ops first). This module therefore imports nothing from the rest of lora_ref.


def tensor(data, requires_grad: bool = False) -> Tensor:
    """Shorthand for ``Tensor(data, requires_grad)``."""
    return Tensor(data, requires_grad)
