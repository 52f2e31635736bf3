"""QLoRA: LoRA adapters on a frozen base whose linear layers are stored in 4 bits (NF4, double quantization).

[QLoRA] Dettmers et al. 2023 (arXiv 2305.14314), Eq. 5–6: the base weight W (out, in) is kept as NF4 codes with
blockwise scales (themselves 8-bit quantized, "double quantization") and dequantized on the fly; the adapter is
float32 and is the only thing trained::

    y  = x · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ
    dx = dy · dequant(W) + s · (dy · B) · A          # the input gradient flows through the 4-bit weight
    dA, dB as in LoRA; W gets no gradient (and no optimizer state)

What this module holds:

- :class:`Linear4bit` — the frozen 4-bit layer (bitsandbytes' ``Linear4bit`` / ``LinearNF4``): ``weight`` is the
  packed uint8 codes (bitsandbytes' (n/2, 1) layout, ``requires_grad=False``), ``quant_state`` the
  :class:`~lora_ref.quant.blockwise.QuantState`. Its forward runs the fused kernel
  :func:`lora_ref.quant.kernels.matmul_4bit` (``impl="numba"``) or dequantizes the layer and multiplies
  (``impl="numpy"``; ``"auto"`` picks by batch size); its backward gives the input gradient through
  :func:`~lora_ref.quant.kernels.matmul_4bit_t` (or dequant(W) and BLAS).
- :func:`quantize_model` — every linear layer but the output head to :class:`Linear4bit` (embeddings, norms and
  ``lm_head`` stay float, as transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` does).
- :class:`LoraLinear4bit` and :func:`inject_qlora` — LoRA around a :class:`Linear4bit`.
- Merging into a 4-bit base, three ways (:func:`merge_4bit`): ``"float"`` keeps a float32 merged layer,
  dequant(W) + ΔW, exact up to float32 rounding but 8× the storage; ``"requantize"`` is what PEFT does
  (``Linear4bit.merge``: dequantize, add, quantize again with the same settings), whose error is the NF4 error
  of the merged weight; ``"refit"`` (ours) quantizes the same merged weight with each block's scale chosen to
  minimise that block's squared error (:func:`quantize_4bit_refit`) — the same bitsandbytes format, so the
  result loads wherever a ``"requantize"`` merge does. :func:`merge_4bit_like_peft` reproduces PEFT 0.21.2's
  4-bit merge including its bias bug (``lora_B.bias`` added without × scaling, peft issue #3741).

Taught in ``notebooks/07_qlora.ipynb`` (training, memory, where the quantization error goes) and
``notebooks/08_merging.ipynb`` (the three merges). Shapes: B batch, T time, R rank; ``in``/``out`` features.
"""

from __future__ import annotations

import numpy as np

from lora_ref.autograd import ops
from lora_ref.adapters.lora import (LoraConfig, LoraLinear, dora_merged_weight, inject_lora, lora_layers,
                                   register_lora_layer)
from lora_ref.modeling.nn import Linear, Module, Parameter
from lora_ref.quant import nf4
from lora_ref.quant.blockwise import (
    NESTED_BLOCKSIZE,
    QuantState,
    dequantize_4bit,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise,
)
from lora_ref.autograd.tensor import Tensor

__all__ = [
    "Linear4bit",
    "LoraLinear4bit",
    "linear_4bit",
    "quantize_model",
    "inject_qlora",
    "to_qlora_layers",
    "MERGE_STRATEGIES",
    "merge_4bit",
    "merge_4bit_like_peft",
    "merge_and_unload_4bit",
    "quantize_4bit_refit",
    "storage_bytes",
]

MERGE_STRATEGIES = ("float", "requantize", "refit")
"""Ways to merge an adapter into a 4-bit base (:func:`merge_4bit`)."""

_IMPLS = ("auto", "numba", "numpy")

AUTO_DEQUANTIZE_ROWS = 256
"""With ``impl="auto"``, products with at least this many input rows (training batches) dequantize the layer and
call BLAS; fewer rows (generation, small batches) use the fused kernel. Measured on the development machine: at
1024 rows the dequantize-then-BLAS path was about 2× faster than the fused kernel; for a single row the fused kernel
reads 8× fewer bytes. The dequantize path holds one layer's float32 weight while the product runs."""


def _matmuls(impl: str):
    if impl == "numba":
        from lora_ref.quant import kernels

        return kernels.matmul_4bit, kernels.matmul_4bit_t
    if impl == "numpy":
        from lora_ref.quant import dequant_matmul as fused

        return fused.matmul_4bit, fused.matmul_4bit_t
    if impl == "auto":
        from lora_ref.quant import dequant_matmul as fused, kernels

        def fwd(x, packed, state):
            return (fused.matmul_4bit if x.shape[0] >= AUTO_DEQUANTIZE_ROWS else kernels.matmul_4bit)(x, packed, state)

        def bwd(g, packed, state):
            return (fused.matmul_4bit_t if g.shape[0] >= AUTO_DEQUANTIZE_ROWS else kernels.matmul_4bit_t)(g, packed, state)

        return fwd, bwd
    raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'numba' (fused kernel) or 'numpy' "
                     "(dequantize per layer)")


def linear_4bit(x, packed: np.ndarray, state: QuantState, impl: str = "auto") -> Tensor:
    """y = x · dequant(W)ᵀ with W 4-bit (out, in); backward dx = dy · dequant(W) (no gradient to W).

    x: Tensor or array (…, in), computed in float32 → Tensor (…, out) float32.
    """
    x = x if isinstance(x, Tensor) else Tensor(x)
    fwd, bwd = _matmuls(impl)
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
        if bias is not None:
            b = np.asarray(bias, dtype=np.float32)
            if b.shape != (self.out_features,):
                raise ValueError(f"bias has shape {b.shape}, expected ({self.out_features},)")
            self.bias = Parameter(b.copy(), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: Module, **kwargs) -> "Linear4bit":
        """Quantize a float :class:`lora_ref.modeling.nn.Linear` (its weight and bias) into a new Linear4bit."""
        bias = getattr(linear, "bias", None)
        return cls(linear.weight.data, None if bias is None else bias.data, **kwargs)

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


def quantize_model(model: Module, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4", *,
                   rounding: str = "cuda", impl: str = "auto", skip_modules=("lm_head",)) -> Module:
    """Replace every :class:`lora_ref.modeling.nn.Linear` of ``model`` by a :class:`Linear4bit`, in place; returns ``model``.

    The output head (``skip_modules``, matched on the last name component, as transformers'
    ``llm_int8_skip_modules`` default) and everything that is not a Linear (embeddings, RMSNorm gains) stay float.
    Quantize before adding adapters: a model that already has LoRA layers raises ``ValueError``.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("quantize_model: the model already has LoRA layers; quantize the base first, then inject")
    names = [n for n, m in model.named_modules()
             if n and type(m) is Linear and n.rsplit(".", 1)[-1] not in set(skip_modules)]
    for name in names:
        lin = model.get_submodule(name)
        model.set_submodule(name, Linear4bit.from_linear(lin, blocksize=blocksize, quant_type=quant_type,
                                                         double_quant=double_quant, rounding=rounding, impl=impl))
    return model


# ---------------------------------------------------------------------------------------------------------------
# LoRA on a 4-bit base
# ---------------------------------------------------------------------------------------------------------------


class LoraLinear4bit(LoraLinear):
    """:class:`lora_ref.adapters.lora.LoraLinear` around a :class:`Linear4bit` (PEFT's ``lora.bnb.Linear4bit``).

    The forward pass is the LoRA forward with the 4-bit base. Merging uses the dequantized weight and writes back by
    re-quantizing it with the layer's settings, as PEFT does (``merge`` / ``unmerge`` lose the NF4 error each time;
    see :func:`merge_4bit` for the alternatives): :meth:`LoraLinear.base_weight` and ``set_base_weight`` already do
    that for any base layer with ``dequantize`` / ``set_weight``. The class is registered for :class:`Linear4bit`
    with :func:`lora_ref.adapters.lora.register_lora_layer`, so :func:`lora_ref.adapters.lora.inject_lora` and
    :func:`lora_ref.adapters.peft_files.load_adapter` wrap 4-bit layers in it; the generic LoRA code never imports
    this module.

    DoRA on a 4-bit base works as in PEFT's ``lora.bnb.Linear4bit`` with ``DoraLinearVariant``: the forward pass and
    the magnitude's initial value use the dequantized weight (n = ‖dequant(W) + s·B·A‖ per output row, detached);
    a merge computes (m/n)·(dequant(W) + s·B·A) in float32 and re-quantizes it, an unmerge dequantizes, divides by
    m/n, subtracts s·B·A and re-quantizes again (both through :meth:`LoraLinear.merge_weight`).
    """


register_lora_layer(Linear4bit, LoraLinear4bit)


def inject_qlora(model: Module, config: LoraConfig, name: str = "default", *,
                 rng: np.random.Generator | None = None) -> Module:
    """:func:`lora_ref.adapters.lora.inject_lora` on a model with :class:`Linear4bit` layers (wrapped in
    :class:`LoraLinear4bit`, whose merges dequantize and re-quantize; DoRA included). Returns ``model``."""
    return inject_lora(model, config, name, rng=rng)


def to_qlora_layers(model: Module) -> Module:
    """Check that every LoRA layer over a :class:`Linear4bit` is a :class:`LoraLinear4bit`, and return ``model``.

    Loading an adapter onto a quantized model already builds them (the base-layer dispatch of
    :func:`lora_ref.adapters.lora.register_lora_layer`); this function is kept for code written before that."""
    for name, layer in lora_layers(model):
        if isinstance(layer.base_layer, Linear4bit) and not isinstance(layer, LoraLinear4bit):
            raise ValueError(f"{name}: a {type(layer).__name__} over a 4-bit layer was built by hand; "
                             "use inject_qlora or load_adapter, which wrap 4-bit layers in LoraLinear4bit")
    return model


# ---------------------------------------------------------------------------------------------------------------
# Merging into a 4-bit base
# ---------------------------------------------------------------------------------------------------------------


def _merged_target(layer: LoraLinear, adapter_names) -> tuple[np.ndarray, np.ndarray | None]:
    """T = dequant(W) + Σ ΔW (float32 (out, in)) and the merged bias b + Σ s·b_B (or None).

    A DoRA adapter contributes as PEFT merges it: T ← (m/n)[:, None]·(T + ΔW), n the row norms of
    dequant(W) + ΔW (the unmerged base weight)."""
    if layer.merged:
        raise ValueError("the layer already has merged adapters; unmerge first")
    names = list(layer.active_adapters) if adapter_names is None else list(adapter_names)
    W0 = layer.base_weight()  # (out, in) float32
    W = W0.copy()
    bias = None if layer.bias is None else np.array(layer.bias.data, dtype=np.float32)
    for n in names:
        if n not in layer.lora_A:
            raise ValueError(f"no adapter {n!r} in this layer (adapters: {list(layer.lora_A)})")
        if layer.use_dora[n]:
            delta = layer.get_delta_weight(n)
            norm = layer.dora_weight_norm(n, W0)
            W = dora_merged_weight(W, delta, layer.lora_magnitude_vector[n].weight.data, norm)
            continue
        W = W + layer.get_delta_weight(n)
        if layer.lora_bias[n]:
            if bias is None:
                raise ValueError("cannot merge lora_bias into a base layer without bias")
            bias = bias + layer.lora_B[n].bias.data * np.float32(layer.scaling[n])
    return W.astype(np.float32), bias


def merge_4bit(layer: LoraLinear, strategy: str = "requantize", adapter_names=None) -> Module:
    """A new base layer with the adapters merged into it; ``layer`` is not changed.

    Parameters
    ----------
    layer : a :class:`LoraLinear` over a :class:`Linear4bit` (after :func:`inject_qlora`).
    strategy :
        ``"float"`` — a float32 :class:`lora_ref.modeling.nn.Linear` with W' = dequant(W) + ΔW: the unmerged model's
        function up to float32 rounding, at 32 bits per weight.
        ``"requantize"`` — PEFT: a :class:`Linear4bit` with W' = Q(dequant(W) + ΔW), same blocksize, quant_type and
        double quantization. The error is the NF4 error of the merged weight, about as large as ΔW often is.
        ``"refit"`` — the same target quantized by :func:`quantize_4bit_refit` (per-block MSE-optimal scales,
        codes chosen against the scales actually stored): same format and size as ``"requantize"``, less error.
    adapter_names : adapters to merge (default: the active ones).
    """
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {MERGE_STRATEGIES}")
    base = layer.base_layer
    if not isinstance(base, Linear4bit):
        raise ValueError(f"merge_4bit needs a LoRA layer over a Linear4bit, got a {type(base).__name__} base")
    T, bias = _merged_target(layer, adapter_names)
    if strategy == "float":
        out = Linear(base.in_features, base.out_features, bias=bias is not None)
        out.weight.data[...] = T
        if bias is not None:
            out.bias.data[...] = bias
        return out
    new = Linear4bit(np.zeros((1, 1), np.float32), blocksize=base.blocksize, quant_type=base.quant_type,
                     double_quant=base.double_quant, rounding=base.rounding, impl=base.impl)
    new.out_features, new.in_features = base.out_features, base.in_features
    if strategy == "requantize":
        new.set_weight(T)
    else:
        new.set_quantized(*quantize_4bit_refit(T, base.blocksize, base.quant_type, base.double_quant))
    new.bias = None if bias is None else Parameter(bias, requires_grad=False)
    return new


def merge_4bit_like_peft(layer: LoraLinear, adapter_names=None) -> Linear4bit:
    """PEFT 0.21.2's 4-bit merge *with its bias bug*, for comparison: re-quantized like ``"requantize"``, but the
    ``lora_B`` bias is added without × scaling (``bnb.py`` ``Linear4bit.merge``; peft issue #3741, PR #3757).
    Identical to ``merge_4bit(layer, "requantize")`` when no adapter has ``lora_bias`` or when s = 1."""
    new = merge_4bit(layer, "requantize", adapter_names)
    names = list(layer.active_adapters) if adapter_names is None else list(adapter_names)
    if new.bias is not None:
        bias = np.array(layer.bias.data, dtype=np.float32)
        for n in names:
            if layer.lora_bias[n]:
                bias = bias + layer.lora_B[n].bias.data  # b + b_B: the scaling is missing
        new.bias.data[...] = bias
    return new


def merge_and_unload_4bit(model: Module, strategy: str = "requantize", adapter_names=None) -> Module:
    """Replace every LoRA layer over a 4-bit base by :func:`merge_4bit` of it (and float LoRA layers by their
    merged base); returns ``model`` with its PEFT state dropped."""
    from lora_ref.adapters.lora import merge_and_unload

    for name, layer in list(lora_layers(model)):
        if isinstance(layer.base_layer, Linear4bit):
            model.set_submodule(name, merge_4bit(layer, strategy, adapter_names))
    return merge_and_unload(model, adapter_names=adapter_names)


# ---------------------------------------------------------------------------------------------------------------
# The better re-quantization: per-block MSE-optimal scales
# ---------------------------------------------------------------------------------------------------------------

REFIT_FACTORS = np.linspace(0.70, 1.10, 41)
"""Candidate scales, as multiples of the block's absmax, searched by :func:`quantize_4bit_refit`."""


def _nearest_codes(s: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted ``code`` table (ties to the lower index)."""
    order = np.argsort(code, kind="stable")
    srt = code[order]
    mids = (srt[1:] + srt[:-1]) / 2
    return order[np.searchsorted(mids, s, side="left")].astype(np.uint8)


def quantize_4bit_refit(x: np.ndarray, blocksize: int = 64, quant_type: str = "nf4",
                        double_quant: bool = True) -> tuple[np.ndarray, QuantState]:
    """4-bit quantization in bitsandbytes' format with each block's scale fitted to minimise its squared error.

    bitsandbytes scales each block by its absmax, so the largest element is exact and every other element pays
    for it: NF4 has only 16 levels, and a block with one outlier wastes most of them. Here, per block b:

    1. search c_b ∈ {f · absmax_b : f ∈ :data:`REFIT_FACTORS`}, each with nearest codes, for the least
       Σ_i (x_i − c_b · code[q_i])² (elements beyond ±c_b are clipped to the end codes);
    2. one least-squares step: c_b ← Σ x_i·code[q_i] / Σ code[q_i]² for those codes;
    3. double quantization of the scales exactly as bitsandbytes (mean offset, 8-bit dynamic map, blocksize 256);
    4. codes chosen nearest against the scales as *stored* (after step 3), not the exact ones.

    The result is an ordinary (packed, QuantState) pair: ``dequantize_4bit``, the fused kernels and bitsandbytes
    read it unchanged. Without double quantization each block's error is at most bitsandbytes'/absmax-nearest
    error (f = 1 is a candidate and steps 2 and 4 only lower it). Returns (packed uint8[ceil(n/2)], state).
    """
    w = np.asarray(x, dtype=np.float32)
    shape, n = tuple(int(d) for d in w.shape), int(w.size)
    flat = w.reshape(-1)
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:n] = flat
    X = padded.reshape(nblocks, blocksize)  # (nblocks, blocksize); padding zeros cost nothing at any scale
    code = nf4.get_4bit_type(quant_type).astype(np.float32)
    absmax = np.abs(X).max(axis=1)  # (nblocks,)
    safe = np.where(absmax > 0, absmax, np.float32(1.0))

    def sse(scale):
        q = code[_nearest_codes(X / scale[:, None], code)] * scale[:, None]
        return ((q - X) ** 2).sum(axis=1), q

    best, best_err = safe.copy(), sse(safe)[0]
    for f in REFIT_FACTORS:
        cand = (safe * np.float32(f)).astype(np.float32)
        err = sse(cand)[0]
        better = err < best_err
        best[better], best_err[better] = cand[better], err[better]
    c = code[_nearest_codes(X / best[:, None], code)]  # (nblocks, blocksize)
    ls = ((X * c).sum(axis=1) / np.maximum((c * c).sum(axis=1), np.float32(1e-30))).astype(np.float32)
    ls_ok = (ls > 0) & (sse(np.where(ls > 0, ls, best))[0] <= best_err)
    scales = np.where(ls_ok, ls, best).astype(np.float32)
    scales[absmax == 0] = 0.0

    state_absmax, offset, state2 = scales, None, None
    stored = scales
    if double_quant:
        offset = np.float32(np.mean(scales, dtype=np.float64))
        state_absmax, state2 = quantize_blockwise((scales - offset).astype(np.float32), blocksize=NESTED_BLOCKSIZE)
        probe = QuantState(absmax=state_absmax, shape=shape, dtype=np.dtype(np.float32), blocksize=blocksize,
                           quant_type=quant_type, code=code, offset=float(offset), state2=state2)
        stored = probe.block_absmax()  # the scales dequantization will use
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(stored[:, None] != 0, X / stored[:, None], 0.0).astype(np.float32)
    codes = _nearest_codes(s, code).reshape(-1)[:n]
    if n % 2:
        codes = np.concatenate([codes, _nearest_codes(np.zeros(1, np.float32), code)])
    packed = pack_nibbles(codes)
    state = QuantState(absmax=state_absmax, shape=shape, dtype=np.dtype(np.float32), blocksize=blocksize,
                       quant_type=quant_type, code=code.copy(), offset=None if offset is None else float(offset),
                       state2=state2)
    return packed, state
