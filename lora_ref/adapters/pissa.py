"""PiSSA and OLoRA on a 4-bit base (QPiSSA), and their conversion back to an ordinary LoRA adapter.

[PiSSA] Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models" (arXiv 2404.02948). PiSSA moves the top-r singular part of W into the adapter, B₀A₀ = U_r S_r V_rᵀ / s, and
trains on the residual W_res = W − s·B₀A₀ (:meth:`lora_ref.adapters.lora.LoraLinear.pissa_init`; OLoRA does the same
with a QR decomposition, :meth:`~lora_ref.adapters.lora.LoraLinear.olora_init`). QPiSSA (§4 of the paper) quantizes
the *residual* instead of W: the principal part, which holds most of W's magnitude, stays in float32 in the adapter,
so NF4's absmax scales are set by a matrix with smaller, flatter values and the quantization error is smaller than
QLoRA's ‖W − Q(W)‖ (:func:`apply_qpissa` reports both).

The trained adapter only makes sense on W_res. PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=
DIR)`` (``peft/peft_model.py``; ``LoraModel.subtract_mutated_init`` in ``peft/tuners/lora/model.py``) rewrites it
for the *unmodified* base: since W_res + s·BA = W + s·(BA − B₀A₀),

    A' = [A; A₀]  (2r, in),    B' = [B, −B₀]  (out, 2r),    r' = 2r,  α' = 2α  (α' = √2·α with rsLoRA),

so s' = s and W + s'·B'A' = W_res + s·BA exactly (in exact arithmetic; on a 4-bit base, Q(W_res) + s·BA is what was
trained, and W + s'·B'A' differs from it by the residual's quantization error, as PEFT warns).
:func:`save_converted_adapter` writes that adapter, :func:`save_initial_adapter` the initial one it needs (saved
right after initialization, with ``init_lora_weights`` True so that loading it does not decompose W again).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np

from lora_ref.adapters.lora import LoraConfig, _inject, find_targets, inject_lora, lora_layers, unload
from lora_ref.adapters.qlora import Linear4bit
from lora_ref.modeling.nn import Linear, Module

__all__ = ["apply_qpissa", "save_initial_adapter", "converted_state_dict", "converted_config",
           "save_converted_adapter", "CONVERTIBLE_INITS"]

CONVERTIBLE_INITS = ("pissa", "olora")


def _fro(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.sum(x * x)))


def apply_qpissa(model: Module, config: LoraConfig, name: str = "default", *, blocksize: int = 64,
                 double_quant: bool = True, rounding: str = "cuda", impl: str = "auto",
                 skip_modules=("lm_head",)) -> dict[str, dict]:
    """QPiSSA: PiSSA (or OLoRA) on the float model, then the residual base layers quantized to NF4.

    ``config.init_lora_weights`` must be "pissa" or "olora"; every target must be a float Linear (PEFT refuses a
    PiSSA decomposition of an already quantized weight: "initialize PiSSA under float32 … subsequently re-quantize
    the residual model"). As in PEFT's recipe (save the residual model, load it with ``BitsAndBytesConfig(
    load_in_4bit=True)``), every other linear layer is quantized too, except ``skip_modules`` (the output head).
    Returns per layer ``{"qlora_error": ‖W − Q(W)‖_F, "qpissa_error": ‖W − (Q(W_res) +
    s·B₀A₀)‖_F, "weight_norm": ‖W‖_F}``: the error QLoRA would start from and the one QPiSSA starts from.
    """
    from lora_ref.quant import dequantize_4bit, quantize_4bit

    if config.init_lora_weights not in CONVERTIBLE_INITS:
        raise ValueError(f"apply_qpissa needs init_lora_weights 'pissa' or 'olora', got {config.init_lora_weights!r}")
    if config.use_dora:
        raise ValueError("apply_qpissa: PiSSA initializes a plain LoRA adapter; use use_dora=False")
    for t in find_targets(model, config):  # checked before anything changes
        m = model.get_submodule(t)
        if type(m) is not Linear:
            raise ValueError(f"QPiSSA cannot decompose {t}: it is a {type(m).__name__}, not a float Linear layer "
                             "(decompose the float weights, then quantize the residual)")
    if getattr(model, "peft_config", None):
        raise ValueError("apply_qpissa needs a model without adapters (it decomposes the float base weights)")
    originals = {n: np.array(m.weight.data, dtype=np.float32) for n, m in model.named_modules()
                 if type(m) is Linear}
    inject_lora(model, config, name)  # PiSSA / OLoRA in float: A₀, B₀ and the residual bases
    factors = {n: (l.lora_A[name].weight.data.copy(), l.lora_B[name].weight.data.copy())
               for n, l in lora_layers(model)}
    unload(model)  # the residual float layers, no adapters
    skip = set(skip_modules)
    for n in [n for n, m in model.named_modules() if n and type(m) is Linear and n.rsplit(".", 1)[-1] not in skip]:
        model.set_submodule(n, Linear4bit.from_linear(model.get_submodule(n), blocksize=blocksize, quant_type="nf4",
                                                      double_quant=double_quant, rounding=rounding, impl=impl))
    _inject(model, config, name, rng=None, init_lora_weights=None)  # LoraLinear4bit around each 4-bit residual
    out = {}
    for lname, layer in lora_layers(model):
        A, B = factors[lname]
        layer.lora_A[name].weight.data[...] = A
        layer.lora_B[name].weight.data[...] = B
        W = originals[lname]
        qW = dequantize_4bit(*quantize_4bit(W, blocksize, "nf4", double_quant, rounding))
        out[lname] = {"qlora_error": _fro(W - qW),
                      "qpissa_error": _fro(W.astype(np.float64) - layer.base_layer.dequantize()
                                           - layer.get_delta_weight(name)),
                      "weight_norm": _fro(W)}
    return out


def save_initial_adapter(model: Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Save adapter ``name`` right after PiSSA/OLoRA initialization, as PEFT's recipe does (``init_lora_weights``
    set to True in the saved config, so loading it does not decompose the base again)."""
    from lora_ref.adapters.peft_files import save_adapter

    cfg = model.peft_config[name]
    was = cfg.init_lora_weights
    cfg.init_lora_weights = True
    try:
        return save_adapter(model, path, name)
    finally:
        cfg.init_lora_weights = was


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config PEFT writes for the converted adapter: r and rank_pattern doubled, α and alpha_pattern doubled
    (α·√2 with rsLoRA, keeping s = α/√r), ``init_lora_weights`` True."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("converting to LoRA is not supported with rank_pattern or alpha_pattern together with "
                         "use_rslora=True (as in PEFT)")
    c = copy.deepcopy(config)
    c.init_lora_weights = True
    c.r = 2 * config.r
    c.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    c.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    c.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return c


def converted_state_dict(trained: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT's ``subtract_mutated_init`` on adapter tensors (PEFT key names): A' = [A; A₀], B' = [B, −B₀]; every
    other tensor (biases) is dropped, as PEFT does. ``ValueError`` if the two adapters do not correspond."""
    out = {}
    for k, v in trained.items():
        if ".lora_A." in k or ".lora_B." in k:
            if k not in initial:
                raise ValueError(f"the initial adapter has no tensor {k}; was it saved from the same model?")
            v0 = initial[k]
            if ".lora_A." in k:
                if v0.shape[1:] != v.shape[1:]:
                    raise ValueError(f"{k}: trained shape {v.shape} and initial shape {v0.shape} do not match")
                out[k] = np.concatenate([v, v0], axis=0).astype(np.float32)
            else:
                if v0.shape[:1] != v.shape[:1] or v0.ndim != 2:
                    raise ValueError(f"{k}: trained shape {v.shape} and initial shape {v0.shape} do not match")
                out[k] = np.concatenate([v, -v0], axis=1).astype(np.float32)
    if not out:
        raise ValueError("the adapter has no lora_A / lora_B tensors to convert")
    return out


def save_converted_adapter(model: Module, path: str | os.PathLike, initial: str | os.PathLike,
                           name: str = "default") -> Path:
    """Write adapter ``name`` (trained from a PiSSA/OLoRA initialization) as an ordinary rank-2r LoRA adapter for
    the *unmodified* base: PEFT's ``save_pretrained(path, path_initial_model_for_weight_conversion=initial)``.

    ``initial`` is the adapter folder written by :func:`save_initial_adapter` right after initialization. As PEFT,
    the initial folder's config is rewritten with ``init_lora_weights`` True. ``path`` must be missing or empty.
    """
    import json

    from lora_ref.adapters.peft_files import (
        CONFIG_NAME,
        _read_weights,
        adapter_state_dict,
        peft_config_dict,
        read_adapter_config,
        write_adapter_folder,
    )
    from lora_ref.files.outputs import atomic_write, check_out_dir, require_dir

    check_out_dir(path)
    folder = require_dir(initial, "initial adapter folder")
    init_cfg = read_adapter_config(folder)
    init_tensors = _read_weights(folder)
    configs = getattr(model, "peft_config", None) or {}
    if name not in configs:
        raise ValueError(f"the model has no adapter {name!r} (adapters: {sorted(configs)})")
    config = configs[name]
    if (init_cfg.r, init_cfg.rank_pattern) != (config.r, config.rank_pattern):
        raise ValueError(f"the initial adapter in {folder} has rank {init_cfg.r}, the trained one {config.r}")
    tensors = converted_state_dict(adapter_state_dict(model, name), init_tensors)
    cfg = peft_config_dict(model, converted_config(config))
    init_json = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if init_json.get("init_lora_weights") is not True:
        init_json["init_lora_weights"] = True
        atomic_write(folder / CONFIG_NAME, json.dumps(init_json, indent=2, sort_keys=True))
    return write_adapter_folder(path, tensors, cfg)
