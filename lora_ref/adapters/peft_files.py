"""PEFT adapter files, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter saved by PEFT's ``save_pretrained`` loads here with :func:`load_adapter` and gives PEFT's logits; one
saved with :func:`save_adapter` loads in ``PeftModel.from_pretrained`` (tested live against peft 0.21.2).

The format (peft ``utils/save_and_load.py``, checked against PEFT 0.21.2 in tests/interop):

- ``adapter_model.safetensors``: float32 tensors named ``base_model.model.<module>.lora_A.weight`` (R, in),
  ``….lora_B.weight`` (out, R), ``….lora_B.bias`` (out,) with ``lora_bias``, and ``….lora_magnitude_vector`` (out,)
  for DoRA. The adapter name is not part of the key (``lora_A.default.weight`` → ``lora_A.weight``). Metadata
  ``{"format": "pt"}``.
- ``adapter_config.json``: the 41 fields of peft 0.21.2's ``LoraConfig`` (sorted keys, 2-space indent, as PEFT
  writes it), ``"peft_type": "LORA"``, ``"inference_mode": true``, and ``target_modules`` as a sorted list
  (PEFT writes a set in arbitrary order; ``"all-linear"`` is written expanded to the module names).

PEFT puts a non-default adapter name into a subfolder ``<dir>/<name>/``; :func:`save_adapter` always writes the
adapter at ``dir`` itself, which is where ``PeftModel.from_pretrained(model, dir)`` looks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from lora_ref.adapters.lora import LoraConfig, LoraLinear, _inject, find_targets, lora_layers
from lora_ref.files.outputs import atomic_write, output_dir, read_json, require_dir
from lora_ref.files.safetensors import write_safetensors
from lora_ref.modeling.nn import Module

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "adapter_state_dict", "CONFIG_NAME",
           "WEIGHTS_NAME", "PEFT_CONFIG_DEFAULTS", "PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: Every field of peft 0.21.2's saved LoraConfig with its default value (``LoraConfig().to_dict()``, verified).
PEFT_CONFIG_DEFAULTS: dict = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}

# LoraConfig fields read from / written to the file
_OUR_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights", "use_dora",
               "bias", "rank_pattern", "alpha_pattern", "exclude_modules", "lora_bias", "layers_to_transform",
               "layers_pattern", "fan_in_fan_out", "modules_to_save", "task_type", "base_model_name_or_path",
               "revision")
# PEFT features lora_ref does not implement: a file that uses one of them is refused rather than misread
_UNSUPPORTED = ("alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "monteclora_config",
                "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config")


_EMBEDDING_NAME = re.compile(r"(.*\.)?(embed_tokens|lm_head)$")  # PEFT's EMBEDDING_LAYER_NAMES


def _is_lora_embedding(layer) -> bool:
    from lora_ref.adapters.embedding import LoraEmbedding

    return isinstance(layer, LoraEmbedding)


# --------------------------------------------------------------------------------------------- saving
def _config_dict(config: LoraConfig) -> dict:
    d = dict(PEFT_CONFIG_DEFAULTS)
    for f in _OUR_FIELDS:
        d[f] = getattr(config, f)
    tm = d["target_modules"]
    if isinstance(tm, (list, tuple, set)):
        d["target_modules"] = sorted(tm)
    d["rank_pattern"] = dict(config.rank_pattern)
    d["alpha_pattern"] = dict(config.alpha_pattern)
    d["inference_mode"] = True
    return d


def adapter_state_dict(model: Module, name: str = "default") -> dict[str, np.ndarray]:
    """The tensors PEFT saves for adapter ``name``: ``{"base_model.model.<module>.lora_A.weight": (R, in), …}``."""
    configs = getattr(model, "peft_config", None) or {}
    if name not in configs:
        raise ValueError(f"the model has no adapter {name!r} (adapters: {sorted(configs)})")
    config = configs[name]
    from lora_ref.adapters.modules_to_save import modules_to_save_wrappers

    out: dict[str, np.ndarray] = {}
    for lname, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        p = PREFIX + lname
        if _is_lora_embedding(layer):  # PEFT's lora.Embedding: parameters without ".weight"
            out[f"{p}.lora_embedding_A"] = layer.lora_A[name].weight.data
            out[f"{p}.lora_embedding_B"] = layer.lora_B[name].weight.data
            continue
        out[f"{p}.lora_A.weight"] = layer.lora_A[name].weight.data
        out[f"{p}.lora_B.weight"] = layer.lora_B[name].weight.data
        if layer.lora_bias[name]:
            out[f"{p}.lora_B.bias"] = layer.lora_B[name].bias.data
        if layer.use_dora[name]:
            out[f"{p}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight.data
    # PEFT (save_embedding_layers="auto"): when an embed_tokens / lm_head module is a target, the base tables of the
    # targeted embedding layers travel with the adapter, as "<module>.base_layer.weight"
    adapted = [(n, l) for n, l in lora_layers(model) if name in l.lora_A]
    if any(_EMBEDDING_NAME.match(n) for n, _ in adapted):
        for n, l in adapted:
            if _EMBEDDING_NAME.match(n):
                out[f"{PREFIX}{n}.base_layer.weight"] = l.base_layer.weight.data
    # modules_to_save: the trained copy under the module's own names
    for wname, w in modules_to_save_wrappers(model):
        if name in w.modules_to_save:
            for pn, prm in w.modules_to_save[name].named_parameters():
                out[f"{PREFIX}{wname}.{pn}"] = prm.data
    if not out:
        raise ValueError(f"adapter {name!r} has no LoRA layers in the model")
    # PEFT _get_learnable_bias_state_dict: trained base biases travel with the adapter ("all": every bias;
    # "lora_only": the base biases of the LoRA layers, "<layer>.base_layer.bias")
    if config.bias == "all":
        for pname, prm in model.named_parameters():
            if pname.endswith("bias") and "lora_" not in pname:
                out[PREFIX + pname] = prm.data
    elif config.bias == "lora_only":
        for lname, layer in lora_layers(model):
            if layer.bias is not None:
                out[f"{PREFIX}{lname}.base_layer.bias"] = layer.bias.data
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_adapter(model: Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT adapter folder (refuses a non-empty ``path``); returns the path.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (float32, metadata ``{"format": "pt"}``),
    written into a temporary folder that is renamed to ``path`` at the end.
    """
    configs = getattr(model, "peft_config", None) or {}
    if name not in configs:
        raise ValueError(f"the model has no adapter {name!r} (adapters: {sorted(configs)})")
    return write_adapter_folder(path, adapter_state_dict(model, name), peft_config_dict(model, configs[name]))


def peft_config_dict(model: Module, config: LoraConfig) -> dict:
    """``adapter_config.json`` of ``config`` as PEFT writes it for ``model``."""
    cfg = _config_dict(config)
    if type(model).__name__ == "Llama" and cfg["task_type"] is None:
        # what PEFT records for a transformers LlamaForCausalLM base (used by AutoPeftModel)
        cfg["auto_mapping"] = {"base_model_class": "LlamaForCausalLM",
                               "parent_library": "transformers.models.llama.modeling_llama"}
    return cfg


def write_adapter_folder(path: str | os.PathLike, tensors: dict[str, np.ndarray], cfg: dict) -> Path:
    """Write a PEFT adapter folder (``adapter_model.safetensors``, metadata ``{"format": "pt"}``, and
    ``adapter_config.json``) into a temporary folder renamed to ``path`` at the end."""
    with output_dir(path) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors)
        atomic_write(tmp / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True))
    return Path(path)


# --------------------------------------------------------------------------------------------- loading
def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Read ``<path>/adapter_config.json`` into a :class:`LoraConfig` (``ValueError`` naming the file if bad)."""
    folder = require_dir(path, "adapter folder")
    f = folder / CONFIG_NAME
    if not f.is_file():
        raise ValueError(f"{CONFIG_NAME} not found in adapter folder {folder}")
    d = read_json(f, f"corrupt {CONFIG_NAME}: the file")
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f} describes a {d.get('peft_type')!r} adapter; only LORA adapters are read")
    for key in _UNSUPPORTED:
        if key in d and d[key] not in (None, False, {}, []):
            raise ValueError(f"{f} uses {key}={d[key]!r}, a PEFT feature lora_ref does not implement")
    kwargs = {k: d[k] for k in _OUR_FIELDS if k in d}
    if kwargs.get("init_lora_weights") not in (True, False, "gaussian", "pissa", "olora"):
        kwargs["init_lora_weights"] = True  # other inits (olora, loftq, eva, ...) only matter before training
    if kwargs.get("layers_to_transform") is not None and not isinstance(kwargs["layers_to_transform"], (int, list)):
        raise ValueError(f"{f}: layers_to_transform must be an int or a list")
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {CONFIG_NAME} {f}: {e}") from None


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    from lora_ref.modeling.llama import read_safetensors  # the checked reader (names the file on any corruption)

    f = folder / WEIGHTS_NAME
    if not f.is_file():
        hint = " (pickle-based adapter_model.bin files are not read)" if (folder / "adapter_model.bin").exists() else ""
        raise ValueError(f"{WEIGHTS_NAME} not found in adapter folder {folder}{hint}")
    return read_safetensors(f)


def load_adapter(model: Module, path: str | os.PathLike, name: str = "default", *, is_trainable: bool = False,
                 rng: np.random.Generator | None = None) -> Module:
    """Attach the PEFT adapter in folder ``path`` to ``model`` as adapter ``name``; returns the model.

    Everything is checked before the model is touched: a missing, corrupt or truncated ``adapter_config.json`` or
    ``adapter_model.safetensors``, targets the model lacks, and tensors whose shapes do not fit the base raise
    ``ValueError`` (naming the file, or the tensor and both shapes). As in PEFT, the adapter is frozen unless
    ``is_trainable``; it becomes active if it is the model's first adapter. ``rng`` drives dropout when training.
    """
    folder = require_dir(path, "adapter folder")
    config = read_adapter_config(folder)
    tensors = _read_weights(folder)
    wfile = folder / WEIGHTS_NAME
    existing = getattr(model, "peft_config", None) or {}
    if name in existing:
        raise ValueError(f"the model already has an adapter named {name!r}")
    try:
        targets = find_targets(model, config)
    except ValueError as e:
        raise ValueError(f"adapter {folder} does not fit the model: {e}") from None

    # the tensors the adapter must have, with their shapes
    from lora_ref.adapters.lora import _is_embedding
    from lora_ref.adapters.modules_to_save import find_modules_to_save

    expected: dict[str, tuple[int, ...]] = {}
    optional: dict[str, tuple[int, ...]] = {}  # the base tables PEFT writes for targeted embedding layers
    for t in targets:
        m = model.get_submodule(t)
        r, _ = config.rank_and_alpha(t)
        p = PREFIX + t
        if _EMBEDDING_NAME.match(t):
            optional[f"{p}.base_layer.weight"] = tuple(m.weight.shape)
        if _is_embedding(m):
            expected[f"{p}.lora_embedding_A"] = (r, m.num_embeddings)
            expected[f"{p}.lora_embedding_B"] = (m.embedding_dim, r)
            continue
        in_f, out_f = (m.in_features, m.out_features)
        expected[f"{p}.lora_A.weight"] = (r, in_f)
        expected[f"{p}.lora_B.weight"] = (out_f, r)
        if config.lora_bias:
            expected[f"{p}.lora_B.bias"] = (out_f,)
        if config.use_dora:
            expected[f"{p}.lora_magnitude_vector"] = (out_f,)
    saved_modules = []
    if config.modules_to_save:
        try:
            saved_modules = find_modules_to_save(model, config.modules_to_save)
        except ValueError as e:
            raise ValueError(f"adapter {folder} does not fit the model: {e}") from None
        for n in saved_modules:
            mod = model.get_submodule(n)
            mod = getattr(mod, "original_module", mod)  # already wrapped for another adapter
            for pn, prm in mod.named_parameters():
                expected[f"{PREFIX}{n}.{pn}"] = tuple(prm.shape)
    for k, shape in optional.items():
        if k in tensors and tuple(tensors[k].shape) != shape:
            raise ValueError(f"tensor {k} in {wfile} has shape {tuple(tensors[k].shape)}, but the model expects "
                             f"shape {shape}")
    bias_keys = [k for k in tensors if k not in expected and k not in optional and "lora_" not in k
                 and k.endswith("bias") and config.bias != "none"]
    for key, shape in expected.items():
        if key not in tensors:
            module = key[len(PREFIX):].rsplit(".lora_", 1)[0]
            raise ValueError(f"{wfile} has no tensor {key} (the config targets {module})")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"tensor {key} in {wfile} has shape {tuple(tensors[key].shape)}, but the model expects "
                             f"shape {shape}")
    unexpected = [k for k in tensors if k not in expected and k not in bias_keys and k not in optional]
    if unexpected:
        raise ValueError(f"{wfile} holds tensors this LoRA config does not produce: {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    params = dict(model.named_parameters())
    for k in bias_keys:
        pname = k[len(PREFIX):]
        pre = pname.replace(".base_layer.", ".")  # the name before this call wraps the layer
        prm = params.get(pname, params.get(pre))
        if prm is None or prm.shape != tensors[k].shape:
            raise ValueError(f"bias tensor {k} in {wfile} has shape {tuple(tensors[k].shape)}, but the model "
                             f"{'has no such parameter' if prm is None else f'expects shape {prm.shape}'}")
    for v in tensors.values():
        if not np.all(np.isfinite(v)):
            bad = next(k for k, a in tensors.items() if not np.all(np.isfinite(a)))
            raise ValueError(f"tensor {bad} in {wfile} holds NaN or inf")

    _inject(model, config, name, rng=rng, init_lora_weights=None)
    for t in targets:
        layer: LoraLinear = model.get_submodule(t)
        p = PREFIX + t
        if f"{p}.base_layer.weight" in tensors:  # PEFT loads the saved table into the base, as here
            layer.base_layer.weight.data[...] = tensors[f"{p}.base_layer.weight"]
        if _is_lora_embedding(layer):
            layer.lora_A[name].weight.data[...] = tensors[f"{p}.lora_embedding_A"]
            layer.lora_B[name].weight.data[...] = tensors[f"{p}.lora_embedding_B"]
            continue
        layer.lora_A[name].weight.data[...] = tensors[f"{p}.lora_A.weight"]
        layer.lora_B[name].weight.data[...] = tensors[f"{p}.lora_B.weight"]
        if config.lora_bias:
            layer.lora_B[name].bias.data[...] = tensors[f"{p}.lora_B.bias"]
        if config.use_dora:
            layer.lora_magnitude_vector[name].weight.data[...] = tensors[f"{p}.lora_magnitude_vector"]
    params = dict(model.named_parameters())
    for k in bias_keys:
        pname = k[len(PREFIX):]
        params.get(pname, params.get(pname.replace(".base_layer.", "."))).data[...] = tensors[k]
    for n in saved_modules:
        copy_params = dict(model.get_submodule(n).modules_to_save[name].named_parameters())
        for pn, prm in copy_params.items():
            prm.data[...] = tensors[f"{PREFIX}{n}.{pn}"]
            prm.requires_grad = is_trainable
    if not is_trainable:
        if config.bias != "none":
            for pname, prm in model.named_parameters():
                if pname.endswith("bias") and "lora_" not in pname:
                    prm.requires_grad = False
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                if name in d:
                    d[name].requires_grad_(False)
    return model
