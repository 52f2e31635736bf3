"""LoftQ: initialize a LoRA adapter so that the 4-bit base plus the adapter is close to the original weight.

[LoftQ] Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (arXiv 2310.08659),
Algorithm 1. QLoRA starts from Q(W) and B = 0, so the model it fine-tunes is off by the whole quantization error
W − Q(W). LoftQ instead looks for a 4-bit Q and a rank-R product B·A with Q + B·A ≈ W, alternating two steps::

    R_0 = W
    for t = 1 … N:
        Q_t        = NF4(R_{t-1})                    # quantize what the adapter does not explain
        B_t, A_t   = top-R SVD of (W − Q_t)          # the best rank-R fit of what the quantization missed
        R_t        = W − B_t·A_t

and returns (Q_N, A_N, B_N). This module follows PEFT 0.21.2 (``peft/utils/loftq_utils.py``, ``loftq_init``)
step for step: the quantizer is bitsandbytes' NF4 without double quantization, blocksize 64 (``Params4bit(...,
compress_statistics=False, quant_type="nf4")``), here :func:`lora_ref.quant.quantize_4bit` bit for bit
(``rounding="cuda"`` by default: PEFT's LoftQ runs only on a CUDA or XPU device); the SVD is split symmetrically,
B = U_R·√S_R and A = √S_R·Vh_R; everything is float32. PEFT's factors carry no α/r: an adapter initialized with
them computes Q + s·B·A, which is the LoftQ approximation only when s = α/r = 1.

Is the error monotone? Each SVD step is optimal for its Q_t: ‖W − Q_t − B_tA_t‖ ≤ ‖W − Q_t − M‖ for every rank-R M,
in particular M = B_{t−1}A_{t−1}. The quantization step is *not* a projection: NF4 with absmax scales picks the
nearest code on a grid whose scale is set by R_{t−1} itself, so Q_t need not be the NF4 matrix nearest to R_{t−1}
and ‖R_{t−1} − Q_t‖ can exceed ‖R_{t−1} − Q_{t−1}‖. What does hold at every iteration is

    e_t = ‖W − Q_t − B_tA_t‖  ≤  ‖R_{t−1} − Q_t‖   (the SVD never undoes the quantization step),

and, for the first iteration, e_1 ≤ ‖W − Q(W)‖ (QLoRA's error). :func:`loftq` reports both per iteration; the
tests check these inequalities and how often e_t > e_{t−1} actually happens (rarely, by float32-rounding-sized
amounts on the shapes tested).

The model-level entry points build the 4-bit base with the LoftQ codes (:func:`apply_loftq`) and write it and the
adapter as a bitsandbytes checkpoint plus a PEFT adapter folder (:func:`save_loftq`), which transformers + PEFT
load on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from lora_ref.adapters.lora import LoraConfig, _candidate_modules, _inject, find_targets, lora_layers, matches_target
from lora_ref.adapters.qlora import Linear4bit
from lora_ref.modeling.nn import Linear, Module
from lora_ref.quant import dequantize_4bit, quantize_4bit
from lora_ref.quant.blockwise import QuantState

__all__ = ["LoftQResult", "loftq", "loftq_init", "apply_loftq", "save_loftq", "LOFTQ_BLOCKSIZE"]

LOFTQ_BLOCKSIZE = 64
"""bitsandbytes' ``Params4bit`` default blocksize, which PEFT's ``loftq_init`` uses."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@dataclass
class LoftQResult:
    """Everything one LoftQ run produces.

    Attributes
    ----------
    dequantized : (out, in) in the input's dtype — dequant(Q_N), PEFT's first return value.
    lora_A : float32 (R, in), √S_R·Vh_R of the last residual W − dequant(Q_N).
    lora_B : float32 (out, R), U_R·√S_R.
    packed, state : the 4-bit codes of Q_N and their :class:`~lora_ref.quant.blockwise.QuantState`
        (NF4, blocksize 64, no double quantization): ``dequantize_4bit(packed, state)`` is ``dequantized``.
    errors : ‖W − (Q_t + B_tA_t)‖_F for t = 1 … N (float64 sums of the float32 matrices).
    quant_errors : ‖R_{t−1} − Q_t‖_F, the error of each quantization step before the SVD corrects it; the
        invariant ``errors[t] <= quant_errors[t]`` holds at every t (module docstring).
    weight_norm : ‖W‖_F.
    """

    dequantized: np.ndarray
    lora_A: np.ndarray
    lora_B: np.ndarray
    packed: np.ndarray
    state: QuantState
    errors: list[float] = field(default_factory=list)
    quant_errors: list[float] = field(default_factory=list)
    weight_norm: float = 0.0


def _fro(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.sum(x * x)))


def _check_weight(weight, where: str = "loftq_init") -> tuple[np.ndarray, np.dtype]:
    w = np.asarray(weight)
    if w.dtype not in _DTYPES:
        raise ValueError(f"{where}: the weight has dtype {w.dtype}; LoftQ quantizes float32, float16 or bfloat16 "
                         "linear weights")
    if w.ndim != 2:
        raise ValueError(f"{where}: LoftQ needs a 2-D linear weight (out, in), got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{where}: the weight is empty (shape {w.shape})")
    w32 = w.astype(np.float32)
    if not np.all(np.isfinite(w32)):
        raise ValueError(f"{where}: the weight holds NaN or inf; 4-bit quantization needs finite weights")
    return w32, w.dtype


def _low_rank(res: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) = (U_R·√S_R, √S_R·Vh_R) of float32 ``res`` (PEFT's ``_low_rank_decomposition``)."""
    U, S, Vh = np.linalg.svd(res, full_matrices=False)  # float32 LAPACK, as torch.linalg.svd on float32
    root = np.sqrt(S[:r]).astype(np.float32)
    return (U[:, :r] * root[None, :]).astype(np.float32), (root[:, None] * Vh[:r]).astype(np.float32)


def loftq(weight, num_bits: int = 4, reduced_rank: int = 16, num_iter: int = 1, *,
          rounding: str = "cuda") -> LoftQResult:
    """Run LoftQ (Algorithm 1) on one weight; see :class:`LoftQResult` and :func:`loftq_init`."""
    if num_bits != 4:
        raise ValueError(f"loftq_init: num_bits={num_bits!r}; only 4-bit NF4 is implemented (PEFT's 8-bit variant "
                         "quantizes rows to int8 with LLM.int8() and is not part of lora_ref)")
    if isinstance(num_iter, bool) or not isinstance(num_iter, (int, np.integer)) or num_iter <= 0:
        raise ValueError(f"loftq_init: num_iter must be a positive integer, got {num_iter!r}")
    w, dtype = _check_weight(weight)
    out_f, in_f = w.shape
    if isinstance(reduced_rank, bool) or not isinstance(reduced_rank, (int, np.integer)) \
            or not 0 < reduced_rank <= min(out_f, in_f):
        raise ValueError(f"loftq_init: reduced_rank must be an integer in [1, {min(out_f, in_f)}] for a weight of "
                         f"shape {w.shape}, got {reduced_rank!r}")
    r = int(reduced_rank)
    res = w.copy()
    errors, qerrors = [], []
    for i in range(int(num_iter)):
        packed, state = quantize_4bit(res, blocksize=LOFTQ_BLOCKSIZE, quant_type="nf4", double_quant=False,
                                      rounding=rounding)
        deq = np.asarray(dequantize_4bit(packed, state), dtype=np.float32)
        qerrors.append(_fro(res - deq))
        res = w - deq  # what the quantization missed
        B, A = _low_rank(res, r)
        errors.append(_fro(res - B @ A))
        if i + 1 == num_iter:
            break
        res = w - B @ A  # what the adapter does not explain: quantized next
    return LoftQResult(dequantized=deq.astype(dtype), lora_A=A, lora_B=B, packed=packed, state=state,
                       errors=errors, quant_errors=qerrors, weight_norm=_fro(w))


def loftq_init(weight, num_bits: int = 4, reduced_rank: int = 16, num_iter: int = 1, *,
               rounding: str = "cuda") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PEFT's ``loftq_init``: ``(dequantized_weight, lora_A, lora_B)`` for a weight (out, in).

    Parameters
    ----------
    weight : float32, float16 or bfloat16 (ml_dtypes) array (out, in), finite.
    num_bits : 4 (NF4, blocksize 64, no double quantization).
    reduced_rank : the adapter rank R.
    num_iter : N ≥ 1 alternations (``LoftQConfig(loftq_iter=N)``; PEFT's default is 1).
    rounding : "cuda" (PEFT runs LoftQ on a GPU) or "cpu", bitsandbytes' NF4 rounding to reproduce.

    Returns dequant(Q_N) in the input's dtype, A (R, in) and B (out, R) in float32, with W ≈ dequant(Q_N) + B·A.
    With N = 1 the dequantized weight is bitsandbytes' NF4 of W, bit for bit. Use :func:`loftq` for the codes and
    the per-iteration errors.
    """
    out = loftq(weight, num_bits, reduced_rank, num_iter, rounding=rounding)
    return out.dequantized, out.lora_A, out.lora_B


# ---------------------------------------------------------------------------------------------------------------
# A model with a LoftQ-initialized adapter on its 4-bit base, and the files PEFT loads
# ---------------------------------------------------------------------------------------------------------------


def apply_loftq(model: Module, config: LoraConfig, *, num_iter: int = 1, name: str = "default",
                rounding: str = "cuda", impl: str = "auto", skip_modules=("lm_head",)) -> dict[str, LoftQResult]:
    """Quantize the targeted linear layers of ``model`` with LoftQ and add adapter ``name`` initialized from it.

    Every layer ``config`` targets must be a float :class:`lora_ref.modeling.nn.Linear` (the layer LoftQ quantizes;
    anything else raises ``ValueError`` naming it). It is replaced by a :class:`~lora_ref.adapters.qlora.Linear4bit`
    holding the LoftQ codes Q_N exactly (NF4, blocksize 64, no double quantization, as PEFT's ``loftq_init``), and a
    LoRA adapter with A = A_N, B = B_N wraps it. As in PEFT the factors are not divided by s = α/r: choose
    ``lora_alpha = r`` for the initial model to be Q_N + B_N·A_N. Every other linear layer except ``skip_modules``
    (the output head) is quantized plainly with the same settings, as loading PEFT's LoftQ base in 4 bits does
    (transformers quantizes every linear layer of it). Returns name → :class:`LoftQResult`.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"apply_loftq needs a LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("apply_loftq: LoftQ initializes a plain LoRA adapter; use use_dora=False")
    for t, m in _candidate_modules(model):  # check everything before changing the model
        if matches_target(config, t) and type(m) is not Linear:
            raise ValueError(f"LoftQ cannot quantize {t}: it is a {type(m).__name__}, not a float Linear layer")
    targets = find_targets(model, config)
    for t in targets:
        _check_weight(model.get_submodule(t).weight.data, f"LoftQ on {t}")
    results: dict[str, LoftQResult] = {}
    for t in targets:
        m = model.get_submodule(t)
        r, _ = config.rank_and_alpha(t)
        res = loftq(m.weight.data, 4, r, num_iter, rounding=rounding)
        q = Linear4bit(np.zeros((1, 1), np.float32), blocksize=LOFTQ_BLOCKSIZE, quant_type="nf4", double_quant=False,
                       rounding=rounding, impl=impl)
        q.out_features, q.in_features = m.out_features, m.in_features
        q.set_quantized(res.packed, res.state)
        if m.bias is not None:
            from lora_ref.modeling.nn import Parameter

            q.bias = Parameter(np.array(m.bias.data, dtype=np.float32), requires_grad=False)
        model.set_submodule(t, q)
        results[t] = res
    skip = set(skip_modules)
    for n in [n for n, m in model.named_modules() if n and type(m) is Linear and n.rsplit(".", 1)[-1] not in skip]:
        model.set_submodule(n, Linear4bit.from_linear(model.get_submodule(n), blocksize=LOFTQ_BLOCKSIZE,
                                                      quant_type="nf4", double_quant=False, rounding=rounding,
                                                      impl=impl))
    _inject(model, config, name, rng=None, init_lora_weights=None)
    for t, res in results.items():
        layer = model.get_submodule(t)
        layer.lora_A[name].weight.data[...] = res.lora_A
        layer.lora_B[name].weight.data[...] = res.lora_B
    return results


def save_loftq(model: Module, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
               name: str = "default") -> tuple[Path, Path]:
    """Write a LoftQ model as transformers + PEFT load it: a bitsandbytes 4-bit base folder and a PEFT adapter.

    ``base_dir``: ``config.json`` with transformers' ``quantization_config`` (NF4, no double quantization, float32
    compute) and ``model.safetensors`` in bitsandbytes' ``Linear4bit`` format for every 4-bit layer
    (:func:`lora_ref.quant.serialize.state_to_tensors`), float32 for the rest. transformers' loader takes the codes
    as they are, so the loaded base is Q_N bit for bit. ``adapter_dir``: the adapter (:func:`save_adapter`) with
    ``init_lora_weights`` True: PEFT would otherwise run LoftQ again when loading (on a GPU only), which its own
    LoftQ example avoids the same way. Both folders must be missing or empty; returns the two paths.
    """
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.files.outputs import check_out_dir, output_dir, write_json
    from lora_ref.quant.serialize import state_to_tensors, transformers_quantization_config, write_safetensors

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError("save_loftq needs a lora_ref Llama (a model with a config to write)")
    check_out_dir(base_dir)
    check_out_dir(adapter_dir)
    layers = dict(lora_layers(model))
    tensors: dict[str, np.ndarray] = {}
    quantized = set()
    for pname, p in model.named_parameters():
        if "lora_" in pname:
            continue
        tensors[pname.replace(".base_layer.", ".")] = np.ascontiguousarray(p.data)
    for lname, base in model.named_modules():
        if isinstance(base, Linear4bit):
            lname = lname.removesuffix(".base_layer")
            tensors.pop(f"{lname}.weight", None)
            if base.double_quant or base.quant_type != "nf4":
                raise ValueError(f"{lname}: save_loftq writes NF4 bases without double quantization")
            tensors.update(state_to_tensors(f"{lname}.weight", base.weight.data, base.quant_state))
            quantized.add(lname)
    if not any(isinstance(l.base_layer, Linear4bit) for l in layers.values()):
        raise ValueError("save_loftq: the model has no LoRA layer over a 4-bit base; run apply_loftq first")
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = transformers_quantization_config("nf4", False, "float32")
    with output_dir(base_dir) as tmp:
        write_json(tmp / "config.json", cfg)
        write_safetensors(tmp / "model.safetensors",
                          {k: (v.astype(np.float32) if v.dtype != np.uint8 else v) for k, v in sorted(tensors.items())},
                          {"format": "pt"})
    peft_cfg = model.peft_config[name]
    was = peft_cfg.init_lora_weights
    peft_cfg.init_lora_weights = True
    try:
        save_adapter(model, adapter_dir, name)
    finally:
        peft_cfg.init_lora_weights = was
    return Path(base_dir), Path(adapter_dir)
