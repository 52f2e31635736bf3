"""QLoRA's frozen 4-bit linear layer as two products: y = x · dequant(W)ᵀ and its input gradient dy · dequant(W).

In QLoRA the base weight W (out, in) is stored as 4-bit codes with blockwise scales and used in every forward
and backward pass ([QLoRA] Eq. 5–6)::

    y  = x · dequant(W)ᵀ          # forward,        x (M, K), W (N, K), y (M, N)
    dx = dy · dequant(W)          # input gradient, dy (M, N), dx (M, K)

W itself gets no gradient. The NumPy version below says exactly that: dequantize W to float32, then
``np.matmul``. It is the readable twin (same names and signatures) of the fused Numba kernels
:func:`lora_ref.quant.kernels.matmul_4bit` / ``matmul_4bit_t``, which compute the same products tile by tile and
never hold the float32 W in memory: 8× fewer bytes read than a float32 weight, which is what makes a 4-bit GEMV
faster than a float32 one. Which of the two runs is chosen by ``lora_ref.quant.kernels.pick("matmul_4bit", x,
impl=...)`` (the contract: :mod:`lora_ref.kernels.switch`; :func:`lora_ref.adapters.qlora.linear_4bit` asks it).

W's elements are the float32 products code[c] · absmax (:func:`lora_ref.quant.steps.decode_4bit`), i.e.
``dequantize_4bit`` of a float32 state before any cast to float16/bfloat16. The two implementations differ
only in the order of float32 additions. Taught in ``notebooks/06_kernels.ipynb``.
"""

from __future__ import annotations

import numpy as np

from lora_ref.kernels import blas, switch
from lora_ref.quant import nf4
from lora_ref.quant.steps import decode_4bit

__all__ = ["dequantize_weight", "matmul_4bit", "matmul_4bit_t", "check_weight", "check_activation"]


def check_weight(packed: np.ndarray, state) -> np.ndarray:
    """The flat packed bytes of a 2-D 4-bit weight, validated against its
    :class:`~lora_ref.quant.blockwise.QuantState` (``ValueError`` naming the mismatch otherwise)."""
    check = getattr(state, "check_packed", None)  # QuantState's own validation (this module sits below it)
    if check is None:
        raise ValueError(f"state must be a QuantState, got {type(state).__name__}")
    flat = check(packed)
    if len(state.shape) != 2:
        raise ValueError(f"a 4-bit weight for matmul must be 2-D (out, in), got shape {tuple(state.shape)}")
    return flat


FAST_STEPS: dict = {}
"""The Numba twins of the steps this module uses, registered by :mod:`lora_ref.quant.kernels` when it is imported
(it imports this module, so this one cannot import it); empty until then, and the readable steps run."""


def dequantize_weight(packed: np.ndarray, state) -> np.ndarray:
    """float32 (N, K): the 4-bit weight W as float32 products code[c] · absmax (scales dequantized first).

    With the fast paths on, the decoding step runs as its Numba twin (the two agree bit for bit, see
    :func:`lora_ref.quant.kernels.pick`): a QLoRA step dequantizes every 4-bit weight twice (forward and input
    gradient), and the NumPy step took a third of a SmolLM2 QLoRA step."""
    flat = check_weight(packed, state)
    decode = FAST_STEPS.get("decode_4bit", decode_4bit) if switch.enabled() else decode_4bit
    w = decode(flat, state.block_absmax("auto" if switch.enabled() else "numpy"), nf4.kernel_lut(state.quant_type),
               state.blocksize, state.numel)
    return w.reshape(state.shape)                                   # (N, K)


def check_activation(a, name: str, axis_len: int, shape) -> np.ndarray:
    """``a`` as a 2-D float32 array whose second axis is ``axis_len`` long (``shape``: the weight's, for the
    message); ``ValueError`` otherwise. The fused kernels' check too."""
    a = np.asarray(a)
    if a.dtype != np.float32 or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D float32 array, got {a.dtype} with shape {a.shape}")
    if a.shape[1] != axis_len:
        raise ValueError(f"{name} has shape {a.shape} but the 4-bit weight has shape {tuple(shape)}")
    return a


def matmul_4bit(x: np.ndarray, packed: np.ndarray, state) -> np.ndarray:
    """y = x · dequant(W)ᵀ. x float32 (M, K); W (N, K) from ``quantize_4bit``; returns float32 (M, N).

    The readable twin of :func:`lora_ref.quant.kernels.matmul_4bit` (same result up to the order of additions).
    """
    w = dequantize_weight(packed, state)                            # (N, K)
    x = check_activation(x, "x", w.shape[1], state.shape)                     # (M, K)
    return _matmul()(x, w.T)                                        # (M, N)


def matmul_4bit_t(dy: np.ndarray, packed: np.ndarray, state) -> np.ndarray:
    """dx = dy · dequant(W). dy float32 (M, N); W (N, K) from ``quantize_4bit``; returns float32 (M, K).

    The readable twin of :func:`lora_ref.quant.kernels.matmul_4bit_t`.
    """
    w = dequantize_weight(packed, state)                            # (N, K)
    dy = check_activation(dy, "dy", w.shape[0], state.shape)                  # (M, N)
    return _matmul()(dy, w)                                         # (M, K)


def _matmul():
    """``np.matmul``, shared out in chunks between threads when the fast paths are on
    (:func:`lora_ref.kernels.blas.matmul`: the same bits, steadier on a busy machine)."""
    return blas.matmul if switch.enabled() else np.matmul
