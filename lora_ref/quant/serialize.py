"""bitsandbytes' ``Linear4bit`` state-dict format, read and written, and raw safetensors I/O for it.

A 4-bit weight ``W`` named ``<module>.weight`` is stored by bitsandbytes (``Linear4bit._save_to_state_dict``,
``QuantState.as_dict(packed=True)``) as these tensors::

    <module>.weight                              uint8 (ceil(n/2), 1)   packed codes, first element in the high nibble
    <module>.weight.absmax                       float32 (nblocks,)     block scales; uint8 codes with double quant
    <module>.weight.quant_map                    float32 (16,)          the 4-bit code table
    <module>.weight.nested_absmax                float32 (nblocks2,)    double quant only: second-level scales
    <module>.weight.nested_quant_map             float32 (256,)         double quant only: the 8-bit dynamic map
    <module>.weight.quant_state.bitsandbytes__nf4  uint8 (L,)           UTF-8 JSON of the non-tensor fields

The JSON (``bitsandbytes.utils.pack_dict_to_tensor``) holds ``quant_type``, ``blocksize``, ``dtype`` (e.g.
"bfloat16"), ``shape`` and, with double quantization, ``nested_blocksize`` (256), ``nested_dtype`` ("float32") and
``nested_offset`` (a float). The key's suffix names the quant type (``bitsandbytes__fp4`` for FP4).

transformers writes such a checkpoint for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``, with
``quantization_config`` in ``config.json`` (:func:`transformers_quantization_config`); embeddings, norms and
``lm_head`` stay in floating point.

Safetensors files are read and written by :mod:`lora_ref.files.safetensors` (re-exported here), which keeps every
dtype: the quantized tensors are uint8 and the float ones may be bfloat16.
References: bitsandbytes 0.50.2 ``functional.py`` (``QuantState.as_dict``, ``from_dict``), ``utils.py``,
``nn/modules.py``; transformers 5.24 ``BitsAndBytesConfig.to_dict``.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np

from lora_ref.files.safetensors import read_safetensors_raw, write_safetensors  # noqa: F401  (re-exported)
from lora_ref.quant.blockwise import (
    ALLOWED_BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    QuantState,
)

__all__ = [
    "DTYPE_NAMES",
    "dtype_name",
    "dtype_from_name",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
    "state_to_tensors",
    "state_from_tensors",
    "quantized_weight_names",
    "transformers_quantization_config",
    "read_safetensors_raw",
    "write_safetensors",
    "dequantize_state_dict",
]

DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
               np.dtype(ml_dtypes.bfloat16): "bfloat16"}
_NAME_TO_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}

# safetensors dtype codes <-> NumPy


_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def dtype_name(dtype) -> str:
    """"float32" / "float16" / "bfloat16", as bitsandbytes writes ``str(torch_dtype).strip("torch.")``."""
    dt = np.dtype(dtype)
    if dt not in DTYPE_NAMES:
        raise ValueError(f"dtype {dt} has no bitsandbytes name; expected float32, float16 or bfloat16")
    return DTYPE_NAMES[dt]


def dtype_from_name(name: str) -> np.dtype:
    if name not in _NAME_TO_DTYPE:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {', '.join(_NAME_TO_DTYPE)}")
    return _NAME_TO_DTYPE[name]


def pack_dict_to_tensor(d: dict) -> np.ndarray:
    """uint8[L]: the UTF-8 bytes of ``json.dumps(d)`` (bitsandbytes' ``pack_dict_to_tensor``, same separators)."""
    return np.frombuffer(json.dumps(d).encode("utf-8"), dtype=np.uint8).copy()


def unpack_tensor_to_dict(t: np.ndarray, what: str = "quant_state tensor") -> dict:
    """The inverse of :func:`pack_dict_to_tensor`; ``ValueError`` naming ``what`` if it is not UTF-8 JSON."""
    try:
        d = json.loads(bytes(np.asarray(t, dtype=np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{what} does not hold UTF-8 JSON") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what} holds JSON that is not an object")
    return d


def state_to_tensors(name: str, packed: np.ndarray, state: QuantState) -> dict[str, np.ndarray]:
    """The state-dict entries bitsandbytes writes for a 4-bit weight called ``name`` (e.g. "….q_proj.weight").

    Parameters
    ----------
    name : the weight's full name, ending in ``.weight`` by convention
    packed : uint8[ceil(n/2)] from :func:`lora_ref.quant.quantize_4bit`
    state : its QuantState (``quant_type`` "nf4" or "fp4")

    Returns
    -------
    dict name → array: ``name`` (uint8 (ceil(n/2), 1)), ``name.absmax``, ``name.quant_map`` and, with double
    quantization, ``name.nested_absmax``, ``name.nested_quant_map``; plus ``name.quant_state.bitsandbytes__<type>``.
    """
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: only 4-bit states (nf4, fp4) have a Linear4bit format, got {state.quant_type!r}")
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1, 1)  # bitsandbytes keeps a (n/2, 1) column
    out = {
        name: packed,
        f"{name}.absmax": np.ascontiguousarray(state.absmax),
        f"{name}.quant_map": np.asarray(state.code, dtype=np.float32),
    }
    info = {
        "quant_type": state.quant_type,
        "blocksize": int(state.blocksize),
        "dtype": dtype_name(state.dtype),
        "shape": [int(d) for d in state.shape],
    }
    if state.nested:
        out[f"{name}.nested_absmax"] = np.asarray(state.state2.absmax, dtype=np.float32)
        out[f"{name}.nested_quant_map"] = np.asarray(state.state2.code, dtype=np.float32)
        info.update({
            "nested_blocksize": int(state.state2.blocksize),
            "nested_dtype": dtype_name(state.state2.dtype),
            "nested_offset": float(state.offset),
        })
    out[f"{name}.quant_state.bitsandbytes__{state.quant_type}"] = pack_dict_to_tensor(info)
    return out


def _state_key(tensors: dict, name: str) -> str:
    keys = [f"{name}.quant_state.bitsandbytes__{qt}" for qt in QUANT_TYPES if
            f"{name}.quant_state.bitsandbytes__{qt}" in tensors]
    if len(keys) != 1:
        raise ValueError(f"{name}: expected exactly one '{name}.quant_state.bitsandbytes__nf4|fp4' tensor, "
                         f"found {len(keys)}")
    return keys[0]


def state_from_tensors(tensors: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, QuantState]:
    """Read the 4-bit weight ``name`` back from bitsandbytes' state-dict entries (ours or bitsandbytes').

    Returns ``(packed uint8[ceil(n/2)], QuantState)``; ``ValueError`` naming the tensor for anything missing or
    inconsistent.
    """
    if name not in tensors:
        raise ValueError(f"quantized weight {name!r} not found")
    key = _state_key(tensors, name)
    info = unpack_tensor_to_dict(tensors[key], key)
    try:
        quant_type, blocksize, dtype, shape = info["quant_type"], info["blocksize"], info["dtype"], info["shape"]
    except KeyError as e:
        raise ValueError(f"{key} lacks the field {e.args[0]!r}") from None
    if quant_type not in QUANT_TYPES or not key.endswith(quant_type):
        raise ValueError(f"{key}: quant_type {quant_type!r} does not match the key")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"{key}: blocksize {blocksize!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{key}: shape {shape!r} is not a list of positive integers")
    for suffix in ("absmax", "quant_map"):
        if f"{name}.{suffix}" not in tensors:
            raise ValueError(f"{name}: missing tensor '{name}.{suffix}'")
    packed = np.asarray(tensors[name])
    if packed.dtype != np.uint8:
        raise ValueError(f"{name}: packed 4-bit data must be uint8, got {packed.dtype}")
    n = math.prod(shape)
    if packed.size != (n + 1) // 2:
        raise ValueError(f"{name}: {packed.size} packed bytes do not fit shape {tuple(shape)} ({(n + 1) // 2} needed)")
    nested = "nested_offset" in info
    state2 = None
    offset = None
    if nested:
        for suffix in ("nested_absmax", "nested_quant_map"):
            if f"{name}.{suffix}" not in tensors:
                raise ValueError(f"{name}: double-quantized, but '{name}.{suffix}' is missing")
        state2 = QuantState(
            absmax=np.asarray(tensors[f"{name}.nested_absmax"], dtype=np.float32).reshape(-1),
            shape=(-(-n // blocksize),),
            dtype=dtype_from_name(info.get("nested_dtype", "float32")),
            blocksize=int(info.get("nested_blocksize", NESTED_BLOCKSIZE)),
            quant_type=None,
            code=np.asarray(tensors[f"{name}.nested_quant_map"], dtype=np.float32).reshape(-1),
        )
        offset = float(np.float32(info["nested_offset"]))  # bitsandbytes keeps it as a float32 tensor
    state = QuantState(
        absmax=np.asarray(tensors[f"{name}.absmax"]).reshape(-1),
        shape=tuple(shape),
        dtype=dtype_from_name(dtype),
        blocksize=int(blocksize),
        quant_type=quant_type,
        code=np.asarray(tensors[f"{name}.quant_map"], dtype=np.float32).reshape(-1),
        offset=offset,
        state2=state2,
    )
    return packed.reshape(-1), state


def quantized_weight_names(tensors: dict) -> list[str]:
    """Names of the 4-bit weights in a state dict: those with a ``.quant_state.bitsandbytes__*`` companion."""
    marker = ".quant_state.bitsandbytes__"
    return sorted(k.split(marker)[0] for k in tensors if marker in k)


def transformers_quantization_config(quant_type: str = "nf4", double_quant: bool = True,
                                     compute_dtype: str = "float32") -> dict:
    """The ``quantization_config`` entry transformers 5.24 writes into ``config.json`` for ``load_in_4bit``.

    Same keys and values as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=…,
    bnb_4bit_use_double_quant=…, bnb_4bit_compute_dtype=…).to_dict()`` after ``save_pretrained``. transformers
    always quantizes with blocksize 64; a checkpoint's own blocksize is read from each tensor's JSON.
    """
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def dequantize_state_dict(tensors: dict[str, np.ndarray], impl: str = "numpy") -> dict[str, np.ndarray]:
    """Replace every 4-bit weight of a bitsandbytes state dict by its dequantized array (in its state's dtype).

    Non-quantized tensors are passed through; the quantization companions (``.absmax``, ``.quant_map``, …) are
    dropped. The result is a plain state dict such as :meth:`lora_ref.modeling.llama.Llama.load_checkpoint_tensors` takes.
    """
    from lora_ref.quant.blockwise import dequantize_4bit

    names = quantized_weight_names(tensors)
    companions = set()
    out: dict[str, np.ndarray] = {}
    for name in names:
        packed, state = state_from_tensors(tensors, name)
        out[name] = dequantize_4bit(packed, state, impl=impl)
        companions.update(f"{name}.{s}" for s in _STATE_SUFFIXES)
        companions.add(_state_key(tensors, name))
    for k, v in tensors.items():
        if k not in out and k not in companions:
            out[k] = v
    return out

