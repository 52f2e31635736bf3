"""The frozen 4-bit linear layer (bitsandbytes' ``Linear4bit`` / ``LinearNF4``) and its autograd node.

:class:`Linear4bit` keeps the weight as packed NF4/FP4 codes (bitsandbytes' (n/2, 1) uint8 layout,
``requires_grad=False``) with its :class:`~lora_ref.quant.blockwise.QuantState`, and dequantizes on the fly: the
forward is ``y = x · dequant(W)ᵀ (+ b)`` and the backward gives only the input gradient ``dx = dy · dequant(W)``
([QLoRA] Dettmers et al. 2023, Eq. 5-6). It is a modelling layer like :class:`lora_ref.modeling.nn.Linear`, so a
Llama read from a bitsandbytes 4-bit folder (:meth:`lora_ref.modeling.llama.Llama.from_pretrained`) is built of
them; LoRA around it lives in :mod:`lora_ref.adapters.qlora`. Taught in ``notebooks/07_qlora.ipynb``.
"""

from __future__ import annotations

import numpy as np

from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import blas
from lora_ref.modeling.nn import Module, Parameter
from lora_ref.quant import kernels
from lora_ref.quant.blockwise import (
    QuantState,
    dequantize_4bit,
    quantize_4bit,
)
from lora_ref.quant.kernels import AUTO_DEQUANTIZE_ROWS  # noqa: F401  (the "auto" rule's threshold, documented there)

__all__ = ["Linear4bit", "linear_4bit", "storage_bytes", "AUTO_DEQUANTIZE_ROWS"]

_IMPLS = ("auto", "numba", "numpy")

def _matmuls(impl: str):
    """The forward and input-gradient products of a 4-bit layer, each run by the twin that
    :func:`lora_ref.quant.kernels.pick` chooses for ``impl`` and the number of rows (the one chooser)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'numba' (fused kernel) or 'numpy' "
                         "(dequantize per layer)")

    def fwd(x, packed, state):
        return kernels.pick("matmul_4bit", x, impl=impl).matmul_4bit(x, packed, state)

    def bwd(g, packed, state):
        return kernels.pick("matmul_4bit", g, impl=impl).matmul_4bit_t(g, packed, state)

    return fwd, bwd


def linear_4bit(x, packed: np.ndarray, state: QuantState, impl: str = "auto") -> Tensor:
    """y = x · dequant(W)ᵀ with W 4-bit (out, in); backward dx = dy · dequant(W) (no gradient to W).

    x: Tensor or array (…, in), computed in float32 → Tensor (…, out) float32. With a 16-bit ``state.dtype`` the
    weight is ``dequantize_4bit`` rounded to that dtype, as in bitsandbytes (and :meth:`Linear4bit.dequantize`).
    """
    x = x if isinstance(x, Tensor) else Tensor(x)
    fwd, bwd = _matmuls(impl)
    if np.dtype(state.dtype) != np.float32:
        # a 16-bit state (a checkpoint quantized from bfloat16/float16 weights): bitsandbytes dequantizes to that
        # dtype, rounding every weight, and multiplies in the compute dtype. The fused kernels use the unrounded
        # float32 products, so such a weight is dequantized (rounded) per call instead; the backward does it again
        # rather than keeping the float32 weight alive until then.
        def fwd(x2, p, s):  # blas.matmul: the same bits for every thread count
            return blas.matmul(x2, np.asarray(dequantize_4bit(p, s), dtype=np.float32).T)

        def bwd(g2, p, s):
            return blas.matmul(g2, np.asarray(dequantize_4bit(p, s), dtype=np.float32))
    out_f, in_f = state.shape
    xd = x.data
    if xd.shape[-1] != in_f:
        raise ValueError(f"input has {xd.shape[-1]} features but the 4-bit weight has shape {tuple(state.shape)}")
    lead = xd.shape[:-1]
    x2 = np.ascontiguousarray(xd.reshape(-1, in_f), dtype=np.float32)  # (M, in)
    y = fwd(x2, packed, state).reshape(lead + (out_f,))  # (…, out)
    in_dtype = xd.dtype

    def backward(g):
        g2 = np.ascontiguousarray(g.reshape(-1, out_f), dtype=np.float32)  # (M, out)
        return (bwd(g2, packed, state).reshape(xd.shape).astype(in_dtype, copy=False),)  # (…, in)

    return Tensor._make(y, (x,), backward)


class Linear4bit(Module):
    """A frozen linear layer stored in 4 bits (bitsandbytes ``Linear4bit``; ``quant_type="nf4"`` is ``LinearNF4``).

    Parameters
    ----------
    weight : float array (out, in), quantized here with :func:`lora_ref.quant.quantize_4bit`.
    bias : float array (out,) or None; kept in float32 and frozen.
    blocksize, quant_type, double_quant, rounding : as ``quantize_4bit`` (QLoRA: 64, "nf4", True).
        (bitsandbytes' own defaults are fp4 without double quant — QLoRA's settings must be asked for.)
    impl : "numba" (the fused kernel never holds the float32 weight), "numpy" (dequantize, then matmul) or "auto"
        (the fused kernel below :data:`AUTO_DEQUANTIZE_ROWS` input rows, dequantize-then-matmul above).

    Attributes
    ----------
    weight : Parameter, uint8 (ceil(n/2), 1), ``requires_grad=False`` — the packed codes, first element high nibble.
    quant_state : QuantState (absmax codes, offset, state2 with double quantization).
    weight_dtype : float32, the compute dtype LoRA adapters on this layer use.
    """

    #: forward returns a new array that backward does not read (see :class:`lora_ref.modeling.nn.Linear`)
    fresh_output = True

    def __init__(self, weight, bias=None, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                 rounding: str = "cuda", impl: str = "auto"):
        super().__init__()
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out, in), got shape {w.shape}")
        _matmuls(impl)
        self.out_features, self.in_features = (int(d) for d in w.shape)
        self.blocksize, self.quant_type, self.double_quant, self.rounding = blocksize, quant_type, double_quant, rounding
        self.impl = impl
        self.weight_dtype = np.dtype(np.float32)
        self.quant_state: QuantState | None = None
        self.set_weight(w)
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: Module, **kwargs) -> "Linear4bit":
        """Quantize a float :class:`lora_ref.modeling.nn.Linear` (its weight and bias) into a new Linear4bit."""
        bias = getattr(linear, "bias", None)
        return cls(linear.weight.data, None if bias is None else bias.data, **kwargs)

    @classmethod
    def from_quantized(cls, packed: np.ndarray, state: QuantState, bias=None, *, rounding: str = "cuda",
                       impl: str = "auto") -> "Linear4bit":
        """A layer holding already quantized codes, as read from a bitsandbytes checkpoint: nothing is quantized or
        dequantized here. ``blocksize``, ``quant_type`` and double quantization come from ``state``; ``rounding``
        is only used if the layer is re-quantized later (a PEFT-style merge), and is not recorded in the file."""
        if state.quant_type not in ("nf4", "fp4") or len(tuple(state.shape)) != 2:
            raise ValueError(f"Linear4bit needs a 2-D nf4/fp4 state, got quant_type {state.quant_type!r} and "
                             f"shape {tuple(state.shape)}")
        _matmuls(impl)
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.out_features, layer.in_features = (int(d) for d in state.shape)
        layer.blocksize, layer.quant_type, layer.double_quant = int(state.blocksize), state.quant_type, state.nested
        layer.rounding, layer.impl = rounding, impl
        layer.weight_dtype = np.dtype(np.float32)
        layer.quant_state = None
        layer.set_quantized(packed, state)
        layer._set_bias(bias)
        return layer

    def _set_bias(self, bias) -> None:
        """A frozen float32 copy of ``bias`` (out,), or no bias."""
        if bias is None:
            self.bias = None
            return
        b = np.asarray(bias, dtype=np.float32)
        if b.shape != (self.out_features,):
            raise ValueError(f"bias has shape {b.shape}, expected ({self.out_features},)")
        self.bias = Parameter(b.copy(), requires_grad=False)

    def set_weight(self, w: np.ndarray) -> None:
        """Quantize float ``w`` (out, in) with this layer's settings and store it (PEFT's re-quantization)."""
        w = np.asarray(w, dtype=np.float32)
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {w.shape}, this layer is {(self.out_features, self.in_features)}")
        packed, state = quantize_4bit(w, self.blocksize, self.quant_type, self.double_quant, self.rounding)
        self.set_quantized(packed, state)

    def set_quantized(self, packed: np.ndarray, state: QuantState) -> None:
        """Store already quantized codes and their state (e.g. from :func:`quantize_4bit_refit`)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quant_state.shape {tuple(state.shape)} does not fit this layer "
                             f"{(self.out_features, self.in_features)}")
        self.weight = Parameter(np.asarray(packed, np.uint8).reshape(-1, 1), requires_grad=False)  # (n/2, 1)
        self.quant_state = state

    def dequantize(self) -> np.ndarray:
        """float32 (out, in): dequant(W), the weight this layer computes with."""
        return np.asarray(dequantize_4bit(self.weight.data, self.quant_state), dtype=np.float32)

    def forward(self, x) -> Tensor:
        y = linear_4bit(x, self.weight.data, self.quant_state, self.impl)  # (…, out)
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return y

    def nbytes(self) -> int:
        """Bytes of the stored weight: packed codes + scales (+ nested scales and offset); code tables excluded."""
        return storage_bytes(self.weight.data, self.quant_state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")


def storage_bytes(packed: np.ndarray, state: QuantState) -> int:
    """Bytes a 4-bit weight occupies: packed codes + scales (+ nested scales + a float32 offset)."""
    n = int(np.asarray(packed).nbytes) + int(np.asarray(state.absmax).nbytes)
    if state.nested:
        n += int(np.asarray(state.state2.absmax).nbytes) + 4
    return n
