"""QLoRA: LoRA adapters on a frozen base whose linear layers are stored in 4 bits (NF4, double quantization).

[QLoRA] Dettmers et al. 2023 (arXiv 2305.14314), Eq. 5–6: the base weight W (out, in) is kept as NF4 codes with
blockwise scales (themselves 8-bit quantized, "double quantization") and dequantized on the fly; the adapter is
float32 and is the only thing trained::

    y  = x · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ
    dx = dy · dequant(W) + s · (dy · B) · A          # the input gradient flows through the 4-bit weight
    dA, dB as in LoRA; W gets no gradient (and no optimizer state)

What this module holds:

- :class:`Linear4bit` (defined in :mod:`lora_ref.modeling.linear4bit`) — the frozen 4-bit layer (bitsandbytes' ``Linear4bit`` / ``LinearNF4``): ``weight`` is the
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
  (``Linear4bit.merge``: dequantize, add, quantize again with the same settings), which for a small adapter
  snaps back to the very codes it started from and so erases the adapter (see :func:`merge_4bit`); ``"refit"``
  (ours) quantizes the same merged weight with each block's scale chosen to minimise that block's squared error
  (:func:`quantize_4bit_refit`) — the same bitsandbytes format, so the result loads wherever a ``"requantize"``
  merge does. :func:`merge_4bit_like_peft` reproduces PEFT 0.21.2's
  4-bit merge including its bias bug (``lora_B.bias`` added without × scaling, peft issue #3741).

Taught in ``notebooks/07_qlora.ipynb`` (training, memory, where the quantization error goes) and
``notebooks/08_merging.ipynb`` (the three merges). Shapes: B batch, T time, R rank; ``in``/``out`` features.
"""

from __future__ import annotations

import numpy as np

from lora_ref.adapters.lora import (
    LoraConfig,
    LoraLinear,
    dora_merged_weight,
    inject_lora,
    lora_layers,
    register_lora_layer,
)
from lora_ref.modeling.linear4bit import (  # noqa: F401  (public here too: lora_ref.adapters.qlora.Linear4bit, ...)
    AUTO_DEQUANTIZE_ROWS,
    Linear4bit,
    linear_4bit,
    storage_bytes,
)
from lora_ref.modeling.nn import Linear, Module, Parameter
from lora_ref.quant import nf4
from lora_ref.quant.blockwise import (
    NESTED_BLOCKSIZE,
    QuantState,
    pack_nibbles,
    quantize_blockwise,
)

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
    re-quantizing it with the layer's settings, as PEFT does (``merge`` / ``unmerge`` round to the NF4 grid each time,
    which erases a small adapter; see :func:`merge_4bit` and its alternatives): :meth:`LoraLinear.base_weight` and ``set_base_weight`` already do
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
        double quantization. dequant(W) already lies on the NF4 grid, so while ΔW is small against the grid
        spacing (block scale × gap between neighbouring NF4 levels), dequant(W) + ΔW is still nearest to the level
        it came from: re-quantization gives back the same codes, only the block scales move (with ΔW at each
        block's largest weight), and the adapter is erased — the error is about the adapter's own effect and grows
        with ‖ΔW‖. Only once ΔW spans the spacing do codes change and the error level off at about the NF4 error of
        quantizing a weight afresh (chapter 8 of the book measures both regimes).
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
