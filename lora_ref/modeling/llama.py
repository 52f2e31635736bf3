"""Llama in NumPy: the config, RoPE, grouped-query attention, the SwiGLU MLP, the model, generation, HF checkpoints.

The model is the decoder of Llama 2/3 [Touvron et al. 2023; Grattafiori et al. 2024] exactly as transformers'
``LlamaForCausalLM`` computes it, so a checkpoint gives the same logits here and there (tested to 1e-4 in float32):

.. math::

    h_0 &= E[\\text{ids}] \\\\
    a_\\ell &= h_{\\ell-1} + \\operatorname{Attn}_\\ell(\\operatorname{RMSNorm}(h_{\\ell-1})) \\\\
    h_\\ell &= a_\\ell + \\operatorname{MLP}_\\ell(\\operatorname{RMSNorm}(a_\\ell)) \\\\
    \\text{logits} &= \\operatorname{RMSNorm}(h_L)\\, W_{\\text{head}}^\\top

Module names equal transformers' state-dict keys (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``,
``model.layers.N.mlp.gate_proj``, ``model.norm``, ``lm_head``, ...), so a checkpoint's tensors map one to one onto
``named_parameters()``. Every projection is a :class:`lora_ref.modeling.nn.Linear` called as a module (``self.q_proj(x)``),
never through its ``.weight``: LoRA, QLoRA and 4-bit code replace a layer with ``model.set_submodule(name, new)``
and the model keeps working.

Shapes: B batch, T time (new tokens), S time of the keys (cached + new), D hidden size, H query heads, K key/value
heads, G = H / K query heads per key/value head, Dh head size, F intermediate size, V vocabulary.

Taught in ``notebooks/02_llama.ipynb``.

References
----------
- Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (RoPE).
- Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (RMSNorm).
- Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints".
- Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU).
- transformers 5.24 ``models/llama/modeling_llama.py`` and ``modeling_rope_utils.py`` (``_compute_llama3_parameters``).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lora_ref.autograd import functional as F
from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor, is_grad_enabled, no_grad
from lora_ref.files.outputs import output_dir, read_json, require_dir, write_json
from lora_ref.files.safetensors import NP_TO_ST, read_safetensors_raw, write_safetensors
from lora_ref.kernels import blas, switch
from lora_ref.modeling.nn import Embedding, Linear, Module, ModuleList, RMSNorm

__all__ = [
    "LlamaConfig", "rope_inv_freq", "rope_cos_sin", "rotate_half", "apply_rope", "KVCache", "LlamaAttention",
    "LlamaMLP", "LlamaDecoderLayer", "LlamaModel", "Llama", "sample_next_token", "row_parts", "whole_rows",
    "ROW_PART_MIN",
    "checkpoint_tensor_names", "read_safetensors", "load_checkpoint_tensors", "read_quantization_config",
    "read_4bit_weight", "quantized_tensor_names", "copy_model_side_files", "save_4bit_pretrained",
]

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


# ================================================================================================================
# config
# ================================================================================================================
@dataclass
class LlamaConfig:
    """The hyper-parameters of a Llama model, with transformers' ``LlamaConfig`` defaults and meaning.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads`` to
    ``num_attention_heads`` (plain multi-head attention). ``rope_parameters`` holds ``rope_type`` (``"default"``
    or ``"llama3"``), ``rope_theta`` and, for ``llama3``, ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``.

    Read a checkpoint's ``config.json`` with :meth:`from_dict` / :meth:`from_json_file`; both styles are understood:
    the older top-level ``rope_theta`` plus ``rope_scaling`` dict, and the newer ``rope_parameters`` dict. Keys that
    do not change the computation (``torch_dtype``, ``transformers_version``, ``use_cache``, ...) are ignored; a
    value that would change it in a way this model does not implement (another ``rope_type``, another activation,
    attention dropout, ...) raises ``ValueError``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.rope_parameters, dict):
            raise ValueError(f"config: rope_parameters must be a dict, got {self.rope_parameters!r}")
        self.rope_parameters = _normalize_rope(dict(self.rope_parameters), None, self.max_position_embeddings)
        self._validate()

    # ------------------------------------------------------------------------------------------------- checks
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {v!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.rms_norm_eps) or not self.rms_norm_eps > 0:
            raise ValueError(f"config: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"config: initializer_range must be a number >= 0, got {self.initializer_range!r}")
        if self.hidden_act not in ("silu", "swish"):  # both are SiLU in transformers' ACT2FN
            raise ValueError(f"config: hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
        if self.hidden_size % self.num_attention_heads:  # transformers 5.24 refuses this even with head_dim set
            raise ValueError(f"config: hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id)
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"config: pad_token_id must lie in [0, {self.vocab_size}), got {self.pad_token_id!r}")
        _validate_rope(self.rope_parameters)

    # ------------------------------------------------------------------------------------------------- derived
    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def num_key_value_groups(self) -> int:
        """G = H / K: how many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------------------------------------- HF json
    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "LlamaConfig":
        """Build a config from the dict of an HF ``config.json`` (either rope style); ``source`` names it in errors.

        Priority of the RoPE keys is transformers': a non-empty ``rope_scaling`` dict replaces ``rope_parameters``;
        a missing ``rope_theta`` inside it is taken from the top-level ``rope_theta`` (default 10000); the
        legacy ``type`` key stands for ``rope_type``; ``original_max_position_embeddings`` defaults to
        ``max_position_embeddings``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (only 'llama')")
        for key in ("attention_dropout",):
            if key in d and d[key] not in (0, 0.0, None):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only 0.0)")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters / rope_scaling must be a JSON object, got {rope!r}")
        rope = dict(rope)
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        if "partial_rotary_factor" in d:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        max_pos = d.get("max_position_embeddings", 2048)
        rope = _normalize_rope(rope, d.get("original_max_position_embeddings"), max_pos)
        kwargs: dict[str, Any] = {}
        for f in cls.__dataclass_fields__:
            if f in d and f != "rope_parameters":
                kwargs[f] = d[f]
        try:
            return cls(**kwargs, rope_parameters=rope)
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('config: ')}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read an HF ``config.json``; a missing or unreadable file raises ``ValueError`` naming it."""
        return cls.from_dict(read_json(path, "config file"), source=str(path))

    def to_dict(self) -> dict:
        """The ``config.json`` transformers writes for this model (newer ``rope_parameters`` style)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": dict(self.rope_parameters),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": "float32",
        }


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _normalize_rope(rope: dict, top_level_original_max, max_position_embeddings) -> dict:
    """Fill in ``rope_type`` (from the legacy ``type``) and llama3's ``original_max_position_embeddings``."""
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    rope.setdefault("rope_theta", 10000.0)
    if rope["rope_type"] == "llama3":
        if top_level_original_max is not None:  # transformers gives a top-level value priority
            rope["original_max_position_embeddings"] = top_level_original_max
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def _validate_rope(rope: dict) -> None:
    rope_type = rope["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config: rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if not _is_number(rope["rope_theta"]) or not rope["rope_theta"] > 0:
        raise ValueError(f"config: rope_theta must be a positive number, got {rope['rope_theta']!r}")
    prf = rope.get("partial_rotary_factor", 1.0)
    if prf not in (1, 1.0, None):
        raise ValueError(f"config: partial_rotary_factor={prf!r} is not supported (RoPE rotates the whole head)")
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in rope]
        if missing:
            raise ValueError(f"config: rope_type 'llama3' needs {', '.join(missing)} in rope_parameters")
        for k in LLAMA3_KEYS:
            if not _is_number(rope[k]) or not rope[k] > 0:
                raise ValueError(f"config: llama3 rope {k} must be a positive number, got {rope[k]!r}")
        if not rope["high_freq_factor"] > rope["low_freq_factor"]:
            raise ValueError(f"config: llama3 rope needs high_freq_factor > low_freq_factor, got "
                             f"{rope['high_freq_factor']} and {rope['low_freq_factor']}")


# ================================================================================================================
# RoPE
# ================================================================================================================
def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The rotation frequencies θ_i of RoPE, float32 (Dh/2,).

    Default RoPE [Su et al. 2021]: θ_i = base^(−2i/Dh), i = 0 … Dh/2−1, base = ``rope_theta``.

    Llama 3.1 scaling (``rope_type="llama3"``) stretches the slow rotations to reach longer contexts. With the
    wavelength λ_i = 2π/θ_i, the original context length L (``original_max_position_embeddings``) and the factors
    s (``factor``), α (``low_freq_factor``), β (``high_freq_factor``):

    - λ_i < L/β (fast, high frequency): θ_i is kept;
    - λ_i > L/α (slow, low frequency): θ_i / s;
    - in between: (1 − γ) θ_i / s + γ θ_i with γ = (L/λ_i − α) / (β − α), a smooth blend.

    Computed in float32 like transformers, so the band edges fall on the same side in both.
    """
    dim = config.head_dim
    base = np.float32(config.rope_theta)
    inv_freq = (np.float32(1.0) / base ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))  # (Dh/2,)
    if config.rope_type == "default":
        return inv_freq.astype(np.float32)
    r = config.rope_parameters
    factor, low, high = float(r["factor"]), float(r["low_freq_factor"]), float(r["high_freq_factor"])
    old_context_len = float(r["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq  # (Dh/2,)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles m·θ_i for each position m: two arrays (T, Dh).

    The angles are laid out as [θ_0 … θ_{Dh/2−1}, θ_0 … θ_{Dh/2−1}]: dimension i is paired with i + Dh/2, the
    "rotate half" layout of transformers, not with i + 1 as in the paper's interleaved layout (transformers'
    conversion script permutes the rows of Meta's q/k weights so that the two give the same attention scores).
    """
    freqs = np.asarray(positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (T, Dh)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last axis: the 90° turn of every (i, i + Dh/2) pair."""
    half = x.shape[-1] // 2
    return ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """Rotate every (i, i + Dh/2) pair of ``x`` (…, T, Dh) by the angle m·θ_i of its position m.

    y = x ⊙ cos + rotate_half(x) ⊙ sin, the real form of multiplying the complex number x_i + j·x_{i+Dh/2} by
    e^{j m θ_i}. Rotating both q and k makes q_m · k_n depend on the positions only through m − n.

    One graph node, :func:`lora_ref.autograd.functional.rotary`: the map is a rotation, so its backward is the rotation by
    the opposite angle. ``x * cos + rotate_half(x) * sin`` from primitives gives the same values and gradients
    (tested).
    """
    return F.rotary(x, cos, sin)


# ================================================================================================================
# the model
# ================================================================================================================
class KVCache:
    """Keys and values of the tokens seen so far, per layer, so each generated token costs one position.

    ``update(layer, k, v)`` appends the new keys/values (B, K, T, Dh) along time and returns all of them
    (B, K, S, Dh); ``length`` is the number of cached positions (the position of the next token).

    Without gradients (generation) the positions live in a buffer per layer that doubles when full, and
    ``update`` writes the new ones in place and returns views of the filled part: appending costs the T new
    positions, not a copy of the whole cache per token. When a gradient must flow through the cache, ``update``
    concatenates (a graph node, so the keys' gradient reaches the earlier positions).
    """

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self._buffers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        from lora_ref.autograd.tensor import is_grad_enabled

        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self._buffers[layer] = None
            if self.keys[layer] is not None:
                k = ops.concatenate([self.keys[layer], k], axis=2)  # (B, K, S, Dh)
                v = ops.concatenate([self.values[layer], v], axis=2)  # (B, K, S, Dh)
            self.keys[layer], self.values[layer] = k, v
            return k, v
        past = 0 if self.keys[layer] is None else self.keys[layer].shape[2]
        S = past + k.shape[2]
        buf = self._buffers[layer]
        if buf is None or buf[0].shape[2] < S or buf[0].shape[:2] != k.shape[:2] or buf[0].dtype != k.dtype:
            B, K, _, Dh = k.shape
            cap = max(S, 2 * past, 16)
            buf = (np.empty((B, K, cap, Dh), dtype=k.dtype), np.empty((B, K, cap, Dh), dtype=v.dtype))
            if past:  # the positions so far (from the old buffer or a concatenated tensor)
                buf[0][:, :, :past] = self.keys[layer].data
                buf[1][:, :, :past] = self.values[layer].data
            self._buffers[layer] = buf
        buf[0][:, :, past:S] = k.data
        buf[1][:, :, past:S] = v.data
        self.keys[layer], self.values[layer] = Tensor(buf[0][:, :, :S]), Tensor(buf[1][:, :, :S])  # (B, K, S, Dh)
        return self.keys[layer], self.values[layer]


# ------------------------------------------------------------------------------------------------------------
# a layer's position-wise steps in parallel (the fast path of forwards without gradients)
# ------------------------------------------------------------------------------------------------------------
ROW_PART_MIN = 64  # rows (batch × positions) per part, at least: below it one thread runs the layer's steps

_whole = threading.local()


@contextmanager
def whole_rows():
    """Run every decoder layer of the block (in this thread) as one piece, never in parts (:func:`row_parts`): for
    code that watches the layers' modules and expects one call per layer in order (as
    :func:`lora_ref.adapters.merge_report.capture_inputs` does)."""
    prev = getattr(_whole, "on", False)
    _whole.on = True
    try:
        yield
    finally:
        _whole.on = prev


def _row_parallel(m: Module) -> bool:
    """``row_parallel`` as declared by ``type(m)`` itself (a class attribute or a property), False if not declared."""
    flag = type(m).__dict__.get("row_parallel", False)
    return bool(flag.__get__(m)) if isinstance(flag, property) else bool(flag)


def row_parts(layer: Module, x: Tensor) -> list[tuple[int, int]] | None:
    """The ranges of positions [t0, t1) in which ``layer`` runs its position-wise steps as whole tasks, or ``None``
    to run it as one piece.

    Everything in a decoder layer except attention works on each position's row alone: RMSNorm, the seven
    products, RoPE, SwiGLU and the residual additions. A prefill of 512 positions runs 7 products and 5 kernels per
    layer, and sharing each of them out between threads costs a hand-over (a thread woken, a thread waited for,
    50-150 µs each on this project's 2-core machine) per product or kernel. So without gradients the layer is run
    in three steps: (1) norm, q/k/v and RoPE of each range of positions as one task per thread, (2) attention over
    all positions (whose query blocks are themselves shared out, :func:`lora_ref.autograd.functional.scaled_dot_product_attention`),
    (3) ``o_proj``, residual, norm, MLP and residual of each range as one task. Each task runs its products and
    kernels on one thread (:func:`lora_ref.kernels.blas.run_parallel`), so the pools never nest. On SmolLM2-135M,
    1 × 512 positions on 2 threads, interleaved in one process: best 667 → 609 ms, 737 → 658 ms (two runs).

    Every row is computed by the same kernels on the same inputs, so the result has the same bits as the layer run
    as one piece (tested) — as long as every product of a part takes the same road through the BLAS as the product
    of all rows: OpenBLAS gives each output element the same bits whatever the number of rows only between two
    "regular" products (:func:`lora_ref.kernels.blas.regular_product`: more than 10⁶ multiply-adds; smaller ones
    go to kernels that sum in another order). So every weight matrix of the layer (the projections, and LoRA's A
    and B, whose rank-r products are the smallest) must make a regular product with one part's rows. Parts are used
    only when all of these hold, else ``None``:

    - no gradient is being recorded (a backward would need the graph of every part);
    - every module of the layer declares ``row_parallel`` true in its own class (not inherited: a subclass with
      another forward must declare it again): its output rows each come from that row alone, its forward changes no
      state, and it runs no product whose bits follow the thread count. The model's modules, ``Linear`` and
      ``RMSNorm`` declare it; a LoRA layer declares it as a property that is false while a dropout is active in
      training mode (it draws random numbers in order), for DoRA (its weight norm is a product of its own) and while
      its adapters are merged but disabled (its next forward unmerges them, changing the weight in place). Anything
      else (a 4-bit layer, ``ModulesToSave``, a user's module) keeps the layer in one piece;
    - the fast paths are on (:mod:`lora_ref.kernels.switch`), the input is float32, and the BLAS has at least 2
      threads;
    - so no 4-bit layer inside: :class:`lora_ref.modeling.linear4bit.Linear4bit` does not declare it, because its
      product picks the fused kernel or dequantize-then-multiply by the number of rows
      (:data:`lora_ref.quant.kernels.AUTO_DEQUANTIZE_ROWS`), so a part could take the other road;
    - every part gets at least :data:`ROW_PART_MIN` rows (batch × positions) and 8 positions, and with every weight
      matrix (out × in) of the layer its rows make a regular product;
    - the BLAS allows cutting products by rows (:func:`lora_ref.kernels.blas.cut_steps`), and the parts begin at
      multiples of its row step. On OpenBLAS's AVX2 cores (step 12) a row is summed in an order that depends on its
      place in its panel of 12 rows, and rows left over after the last full panel in yet another: a part's rows must
      sit at the same places as in the product of all rows, so with several sequences (B > 1, rows b·T + t of the
      whole, b·(t1 − t0) + t − t0 of a part) the positions T must be a multiple of 12 too;
    - not inside :func:`whole_rows`.
    """
    if is_grad_enabled() or not switch.enabled() or getattr(_whole, "on", False) or x.dtype != np.float32:
        return None
    n = blas.blas_threads()
    step = blas.cut_steps()[0]
    B, T = x.shape[0], x.shape[1]
    if n < 2 or step is None or (B > 1 and T % step):
        return None
    edges = [step * ((T // step) * i // n) for i in range(n)] + [T]  # parts begin at multiples of the row step
    shortest = min(j - i for i, j in zip(edges, edges[1:]))
    if shortest < 8 or B * shortest < ROW_PART_MIN:
        return None
    rows = B * shortest  # the rows of the smallest part
    for m in layer.modules():
        if not _row_parallel(m):  # e.g. Linear4bit, which does not declare it (below)
            return None
        w = getattr(m, "weight", None)
        if w is not None and w.ndim == 2 and not blas.regular_product(rows, w.shape[0], w.shape[1]):
            return None
    return list(zip(edges, edges[1:]))


class LlamaAttention(Module):
    """Causal self-attention with RoPE and grouped-query attention (GQA).

    H query heads share K key/value heads in groups of G = H / K (K = H is multi-head attention, K = 1 is
    multi-query attention): query head h reads key/value head h // G, as transformers' ``repeat_kv`` arranges it.

        softmax(q kᵀ / √Dh + mask) v,   mask = −∞ where a key lies in the query's future

    The softmax-attention itself is :func:`lora_ref.autograd.functional.scaled_dot_product_attention`, one graph node with
    a fused backward rule; ``notebooks/02_llama.ipynb`` builds it step by step from primitives and checks that the
    two agree.
    """

    row_parallel = True  # its position-wise steps may run in parts (row_parts; attention runs whole)

    def __init__(self, config: LlamaConfig, layer_idx: int, *, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        D, H, K, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        std, bias = config.initializer_range, config.attention_bias
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, Dh
        self.scaling = Dh**-0.5
        self.q_proj = Linear(D, H * Dh, bias=bias, rng=rng, std=std, dtype=dtype)
        self.k_proj = Linear(D, K * Dh, bias=bias, rng=rng, std=std, dtype=dtype)
        self.v_proj = Linear(D, K * Dh, bias=bias, rng=rng, std=std, dtype=dtype)
        self.o_proj = Linear(H * Dh, D, bias=bias, rng=rng, std=std, dtype=dtype)

    def forward(self, x: Tensor, cos: np.ndarray, sin: np.ndarray, cache: KVCache | None = None) -> Tensor:
        """x (B, T, D), cos/sin (T, Dh) of the T new positions → (B, T, D)."""
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.attend(q, k, v, cache))  # (B, T, D)

    def project(self, x: Tensor, cos: np.ndarray, sin: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values of x (B, T, D), rotated by position: (B, H, T, Dh), (B, K, T, Dh) twice.
        Each position's row is computed from that position's input alone."""
        B, T, _ = x.shape
        H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (B, H, T, Dh)
        k = self.k_proj(x).reshape(B, T, K, Dh).transpose(0, 2, 1, 3)  # (B, K, T, Dh)
        v = self.v_proj(x).reshape(B, T, K, Dh).transpose(0, 2, 1, 3)  # (B, K, T, Dh)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # q and k rotated by position

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None = None) -> Tensor:
        """Causal attention of the new positions' queries over the cached and new keys → (B, T, H·Dh), the heads
        side by side (the input of ``o_proj``)."""
        B, H, T, Dh = q.shape
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, Dh): the cached past, then the new positions
        y = F.scaled_dot_product_attention(q, k, v, causal=True, scale=self.scaling)  # (B, H, T, Dh)
        return y.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)  # (B, T, H·Dh): heads side by side


class LlamaMLP(Module):
    """SwiGLU feed-forward: down( SiLU(gate(x)) ⊙ up(x) ) [Shazeer 2020], D → F → D."""

    row_parallel = True  # its position-wise steps may run in parts (row_parts; attention runs whole)

    def __init__(self, config: LlamaConfig, *, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        D, Fd, std, bias = config.hidden_size, config.intermediate_size, config.initializer_range, config.mlp_bias
        self.gate_proj = Linear(D, Fd, bias=bias, rng=rng, std=std, dtype=dtype)
        self.up_proj = Linear(D, Fd, bias=bias, rng=rng, std=std, dtype=dtype)
        self.down_proj = Linear(Fd, D, bias=bias, rng=rng, std=std, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) → (B, T, D)."""
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))  # (B, T, F) → (B, T, D)


class LlamaDecoderLayer(Module):
    """One pre-norm block: x + Attn(RMSNorm(x)), then + MLP(RMSNorm(·))."""

    row_parallel = True  # its position-wise steps may run in parts (row_parts; attention runs whole)

    def __init__(self, config: LlamaConfig, layer_idx: int, *, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rng=rng, dtype=dtype)
        self.mlp = LlamaMLP(config, rng=rng, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def forward(self, x: Tensor, cos: np.ndarray, sin: np.ndarray, cache: KVCache | None = None) -> Tensor:
        """x (B, T, D) → (B, T, D)."""
        parts = row_parts(self, x)
        if parts:
            return self._forward_in_parts(x, cos, sin, cache, parts)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)

    def _forward_in_parts(self, x: Tensor, cos: np.ndarray, sin: np.ndarray, cache: KVCache | None,
                          parts: list[tuple[int, int]]) -> Tensor:
        """:meth:`forward` with the position-wise steps run as whole tasks per range of positions (:func:`row_parts`):
        the same computation and the same bits, two hand-overs between threads per step instead of one per product
        and kernel."""
        attn = self.self_attn
        xd = x.data
        B, T, _ = xd.shape
        q = np.empty((B, attn.num_heads, T, attn.head_dim), dtype=xd.dtype)
        k = np.empty((B, attn.num_kv_heads, T, attn.head_dim), dtype=xd.dtype)
        v = np.empty_like(k)

        def project(t0: int, t1: int) -> None:  # norm, q/k/v products, RoPE of positions t0..t1
            with no_grad():  # gradient recording is per thread: off in the pool's threads too
                h = self.input_layernorm(Tensor(np.ascontiguousarray(xd[:, t0:t1])))
                qi, ki, vi = attn.project(h, cos[t0:t1], sin[t0:t1])
            q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1] = qi.data, ki.data, vi.data

        blas.run_parallel([partial(project, t0, t1) for t0, t1 in parts])
        y = attn.attend(Tensor(q), Tensor(k), Tensor(v), cache).data  # (B, T, H·Dh): its blocks run in parallel
        out = np.empty_like(xd)

        def finish(t0: int, t1: int) -> None:  # o_proj, residual, norm, MLP, residual of positions t0..t1
            with no_grad():
                a = Tensor(np.ascontiguousarray(xd[:, t0:t1])) + attn.o_proj(Tensor(np.ascontiguousarray(y[:, t0:t1])))
                out[:, t0:t1] = (a + self.mlp(self.post_attention_layernorm(a))).data

        blas.run_parallel([partial(finish, t0, t1) for t0, t1 in parts])
        return Tensor(out)


class LlamaModel(Module):
    """The decoder stack without the head: ids (B, T) → final normalized hidden states (B, T, D)."""

    def __init__(self, config: LlamaConfig, *, rng: np.random.Generator | None = None, dtype=np.float32):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rng=rng, std=config.initializer_range,
                                      dtype=dtype)
        if rng is not None and config.pad_token_id is not None:  # transformers zeroes the padding row at init
            self.embed_tokens.weight.data[config.pad_token_id] = 0.0
        self.layers = ModuleList([LlamaDecoderLayer(config, i, rng=rng, dtype=dtype)
                                  for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.inv_freq = rope_inv_freq(config)  # (Dh/2,) a constant, not a parameter

    def forward(self, ids: np.ndarray, cache: KVCache | None = None) -> Tensor:
        """ids int (B, T), already checked → (B, T, D)."""
        T = ids.shape[1]
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, np.arange(past, past + T), dtype=x.dtype)  # (T, Dh) each
        for layer in self.layers:
            x = layer(x, cos, sin, cache)  # (B, T, D)
        return self.norm(x)  # (B, T, D)


class Llama(Module):
    """A Llama causal language model: ``Llama(config, rng=rng)`` → ``model(ids)`` → logits (B, T, V).

    Parameters
    ----------
    config : LlamaConfig or dict
        The hyper-parameters (a dict is read as an HF ``config.json``).
    rng : numpy.random.Generator, optional
        Random initialization like transformers: every Linear and the embedding from N(0, initializer_range²),
        biases 0, RMSNorm weights 1. Without ``rng`` the weights are zeros, to be filled by
        :meth:`from_pretrained` or ``load_state_dict``.
    dtype : numpy float dtype
        Of the parameters and so of the computation: float32 (default, like transformers' float32 checks) or
        float64 (for gradient checks and reference values).

    With ``tie_word_embeddings`` the head's weight *is* the embedding's Parameter (one array, two uses), and the
    checkpoint stores it once, as ``model.embed_tokens.weight``.
    """

    def __init__(self, config: LlamaConfig | dict, *, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        super().__init__()
        if isinstance(config, dict):
            config = LlamaConfig.from_dict(config)
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"Llama needs a LlamaConfig or a config dict, got {type(config).__name__}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"Llama dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.config = config
        self.model = LlamaModel(config, rng=rng, dtype=dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, rng=rng,
                              std=config.initializer_range, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, ids, cache: KVCache | None = None) -> Tensor:
        """Logits of the next token at every position.

        Parameters
        ----------
        ids : int array-like (B, T)
            Token ids in [0, vocab_size).
        cache : KVCache, optional
            Keys/values of earlier positions; ``ids`` then continue at position ``cache.length``.

        Returns
        -------
        Tensor (B, T, V) in the parameters' dtype (float32 unless built with ``dtype=np.float64``).
        """
        past = cache.length if cache is not None else 0
        ids = self.check_ids(ids, past=past)
        h = self.model(ids, cache)  # (B, T, D)
        return self.lm_head(h)  # (B, T, V)

    def check_ids(self, ids, *, past: int = 0) -> np.ndarray:
        """``ids`` as an int64 array (B, T), or ``ValueError`` saying what is wrong with them."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"token ids must have shape (B, T), got shape {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"token ids must not be empty, got shape {arr.shape}")
        V = self.config.vocab_size
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token id out of range: ids must lie in [0, {V}), got min {lo}, max {hi}")
        limit = self.config.max_position_embeddings
        if past + arr.shape[1] > limit:
            raise ValueError(f"sequence too long: {past + arr.shape[1]} positions"
                             f"{f' ({past} cached + {arr.shape[1]} new)' if past else ''} exceed "
                             f"max_position_embeddings={limit}")
        return arr.astype(np.int64, copy=False)

    # ------------------------------------------------------------------------------------------------- generation
    def generate(self, ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, use_cache: bool = True) -> np.ndarray:
        """Continue ``ids`` (B, T) by ``max_new_tokens`` tokens; returns int64 (B, T + max_new_tokens).

        ``temperature=0`` is greedy decoding (argmax). ``temperature > 0`` samples from
        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens when given; sampling needs
        ``rng``. With ``use_cache`` every step feeds only the newest token and reads the earlier keys/values from
        a :class:`KVCache`; without it every step recomputes the whole sequence (same tokens, T times the work).
        Runs in eval mode under ``no_grad``; the training flag is restored afterwards. Every row gets exactly
        ``max_new_tokens`` tokens: there is no stop at ``eos_token_id`` (transformers' ``generate`` stops there
        and pads) and no padding of prompts (all rows have the same length T).
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        _check_sampling(temperature, top_k, rng)
        arr = self.check_ids(ids)
        total = arr.shape[1] + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(f"sequence too long: {arr.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cache = KVCache(self.config.num_hidden_layers) if use_cache else None
                out, step = arr, arr
                for _ in range(max_new_tokens):
                    logits = np.asarray(self(step if use_cache else out, cache=cache))  # (B, t, V)
                    nxt = sample_next_token(logits[:, -1, :], temperature=temperature, top_k=top_k, rng=rng)  # (B,)
                    out = np.concatenate([out, nxt[:, None]], axis=1)  # (B, t + 1)
                    step = nxt[:, None]  # (B, 1)
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_names(self) -> list[str]:
        """The tensor names a transformers checkpoint of this model holds (a tied head is stored once)."""
        return [name for name, _ in self._unique_parameters()]

    def _unique_parameters(self):
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield name, p

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=np.float32, impl: str = "auto",
                        rounding: str = "cuda") -> "Llama":
        """Load an HF Llama checkpoint folder: ``config.json`` + ``model.safetensors`` (or sharded with
        ``model.safetensors.index.json``). bfloat16/float16/float64 weights are converted to float32, then to
        ``dtype`` (float32 by default).

        **4-bit checkpoints.** A ``config.json`` with a bitsandbytes ``quantization_config`` (``load_in_4bit``), as
        ``lora-ref quantize`` and transformers + bitsandbytes' ``save_pretrained`` write it, loads with every
        quantized linear weight (``<module>.weight`` uint8 with ``.absmax``, ``.quant_map``,
        ``.quant_state.bitsandbytes__nf4|fp4`` and, double-quantized, ``.nested_absmax``/``.nested_quant_map``)
        as a :class:`lora_ref.modeling.linear4bit.Linear4bit` holding the file's codes and scales unchanged (see
        :func:`lora_ref.quant.serialize.state_from_tensors`): no float copy of those weights is ever made. Layers
        the file keeps in floating point (embeddings, norms, usually ``lm_head``) stay float. ``impl`` is the
        4-bit layers' matmul (:class:`~lora_ref.modeling.linear4bit.Linear4bit`); ``rounding`` the arithmetic used if a layer is
        re-quantized later (a PEFT-style merge: ``"cuda"``, or ``"cpu"`` to re-quantize as bitsandbytes' CPU path
        does). The model's ``quantization_config`` attribute holds the config entry (None for a float model).
        4-bit layers compute in float32, so ``dtype`` must be float32 then.

        **Memory.** The model is built with :func:`lora_ref.modeling.nn.placeholders` (parameters take no memory until
        loaded) and each tensor is read from the file straight into its parameter's array
        (:class:`lora_ref.files.safetensors.CheckpointReader`); a tensor stored in another dtype goes through one
        temporary array of that tensor. So the peak is the model's own arrays plus the largest tensor, not the
        file plus the model.

        Raises ``ValueError`` naming the file for a missing folder or file, unreadable JSON, a corrupt safetensors
        file, and naming the tensor for a missing, unexpected or wrongly shaped tensor, or an 8-bit or non-
        bitsandbytes quantization.
        """
        from lora_ref.files.safetensors import CheckpointReader
        from lora_ref.modeling.nn import placeholders

        folder = require_dir(path, "checkpoint folder")
        config = LlamaConfig.from_json_file(folder / CONFIG_FILE)
        qconfig = read_quantization_config(folder / CONFIG_FILE)
        if qconfig is not None and np.dtype(dtype) != np.float32:
            raise ValueError(f"{folder} is a 4-bit checkpoint; its layers compute in float32, not {np.dtype(dtype)}")
        with placeholders():
            model = cls(config, dtype=dtype)
        model.quantization_config = qconfig
        with CheckpointReader(folder) as reader:
            consumed = _load_4bit_layers(model, reader, impl=impl, rounding=rounding) if qconfig is not None else set()
            model._check_checkpoint_names(reader, consumed)
            for name, p in model._unique_parameters():
                if name in consumed:  # a 4-bit layer's codes and bias, already in place
                    continue
                arr = np.empty(p.shape, dtype=p.dtype)  # the parameter's own array, filled from the file
                reader.read(name, out=arr)
                p.data = arr  # a tied head is the same Parameter object, so it follows
        return model

    def _check_checkpoint_names(self, reader, consumed: set[str] = frozenset()) -> None:
        """Names and shapes of a checkpoint (from its headers alone) against the parameters; ``ValueError`` naming
        the first missing, unexpected or wrongly shaped tensor. Also refuses a non-float tensor where a float
        parameter belongs (e.g. a 4-bit weight in a folder whose config.json lacks the quantization_config)."""
        for name in reader.names():
            dt = reader.dtype(name)
            if name not in consumed and dt.kind != "f" and dt != np.dtype(ml_dtypes.bfloat16):
                raise ValueError(f"tensor {name!r} in {reader.source(name)} has dtype {NP_TO_ST.get(dt, dt)}; only "
                                 f"F32, F16, BF16 and F64 are read (a quantized checkpoint without its "
                                 f"quantization_config?)")
        self._check_tensors(reader.names(), reader.shape, reader.source, reader.read, consumed)

    def _check_tensors(self, names, shape, source, read, consumed=frozenset()) -> None:
        """The one validation of a checkpoint's tensors against the parameters, for a file reader and a dict alike:
        ``names`` the tensor names, ``shape(name)``, ``source(name)`` (the file, for messages) and ``read(name)``
        (only for a tied head's stored copy). ``ValueError`` naming the first missing, unexpected or wrongly shaped
        tensor; ``consumed`` tensors (a 4-bit layer's, already in place) are neither unexpected nor shape-checked."""
        params = dict(self._unique_parameters())
        names = set(names)
        ignorable = {k for k in names if k.endswith("rotary_emb.inv_freq")}  # a buffer older versions saved
        ignorable |= set(consumed)
        if self.config.tie_word_embeddings and "lm_head.weight" not in params and "lm_head.weight" in names:
            # a tied checkpoint may carry a copy of the head; transformers unties the two when they differ
            a, b = read("lm_head.weight"), read("model.embed_tokens.weight") \
                if "model.embed_tokens.weight" in names else None
            if b is None or a.shape != b.shape or not np.array_equal(a.astype(np.float32), b.astype(np.float32)):
                raise ValueError(f"config ties lm_head to embed_tokens, but {source('lm_head.weight')} holds a "
                                 "different lm_head.weight; set tie_word_embeddings to false in config.json to use it")
            ignorable.add("lm_head.weight")
        missing = [k for k in params if k not in names]
        if missing:
            raise ValueError(f"checkpoint lacks tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
        unexpected = sorted(k for k in names if k not in params and k not in ignorable)
        if unexpected:
            hint = " (a 4-bit checkpoint whose config.json has no quantization_config?)" \
                if any(".quant_state.bitsandbytes__" in k for k in unexpected) else ""
            raise ValueError(f"checkpoint has unexpected tensor {unexpected[0]!r} in {source(unexpected[0])}"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + hint)
        for name, p in params.items():
            if name in consumed:
                continue
            if shape(name) != p.shape:
                raise ValueError(f"tensor {name!r} in {source(name)} has shape {shape(name)}, "
                                 f"the model expects {p.shape}")

    def load_checkpoint_tensors(self, tensors: dict[str, np.ndarray], sources: dict[str, str] | None = None) -> None:
        """Copy checkpoint tensors (transformers names) into the parameters, checking names and shapes."""
        sources = sources or {}
        self._check_tensors(tensors, lambda k: tensors[k].shape, lambda k: sources.get(k, "the checkpoint"),
                            tensors.__getitem__)
        for name, p in self._unique_parameters():
            p.data[...] = tensors[name]  # in place: a tied head keeps sharing the embedding's array

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
        """Write an HF checkpoint folder transformers' ``LlamaForCausalLM.from_pretrained`` loads: ``config.json``
        and float32 ``model.safetensors`` (metadata ``{"format": "pt"}``), or shards of at most
        ``max_shard_bytes`` each plus ``model.safetensors.index.json``.

        The folder must be missing or empty; it appears complete or not at all (:func:`lora_ref.files.outputs.output_dir`).
        A model whose layers were replaced (LoRA, 4-bit) is refused: merge the adapters into a plain model first.
        """
        expected = set(checkpoint_tensor_names(self.config))
        tensors = {name: np.ascontiguousarray(p.data, dtype=np.float32) for name, p in self._unique_parameters()}
        if set(tensors) != expected:
            extra = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
            raise ValueError(f"cannot save as a Llama checkpoint: the model's parameters differ from a plain Llama's "
                             f"(first difference: {extra[0]!r}); merge or remove replaced layers first")
        with output_dir(path) as tmp:
            write_json(tmp / CONFIG_FILE, self.config.to_dict())
            if max_shard_bytes is None:
                write_safetensors(tmp / WEIGHTS_FILE, tensors)
            else:
                _write_shards(tmp, tensors, max_shard_bytes)
        return Path(path)


def checkpoint_tensor_names(config: LlamaConfig) -> list[str]:
    """The tensor names of a transformers Llama checkpoint with this config (sorted, as transformers writes them)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        names += [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
        for proj, bias in [(f"self_attn.{n}_proj", config.attention_bias) for n in "qkvo"] + \
                          [(f"mlp.{n}_proj", config.mlp_bias) for n in ("gate", "up", "down")]:
            names.append(prefix + proj + ".weight")
            if bias:
                names.append(prefix + proj + ".bias")
    return sorted(names)


_NOT_SIDE_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.safetensors\.index\.json|\.bin\.index\.json)$")


def copy_model_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy a model folder's tokenizer, chat template, generation config and other small files from ``src`` to
    ``dst`` (both folders); returns the names copied: ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja``, and also a tokenizer's own
    files (``tokenizer.model``, ``vocab.json``, ``merges.txt``, ...), a model card or a license.

    Every regular file is copied except ``config.json`` (the writer makes its own), weight files (``*.safetensors``,
    their index, pickle-based ``*.bin``/``*.pt``/``*.pth``, ``*.gguf``) and hidden files (``.name``, e.g. a
    temporary file). ``lora-ref quantize`` and ``lora-ref merge`` both use it, so their outputs load with the base's
    tokenizer.
    """
    import shutil

    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name != CONFIG_FILE and not f.name.startswith(".") and not _NOT_SIDE_FILES.search(f.name):
            shutil.copyfile(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied


QUANTIZED_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a ``config.json`` if it describes bitsandbytes 4-bit weights, None if there is
    none; ``ValueError`` for one lora_ref cannot read (8-bit, another ``quant_method``, ...)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file is not valid JSON: {p} ({e})") from None
    q = d.get("quantization_config") if isinstance(d, dict) else None
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{p}: quantization_config must be a JSON object, got {q!r}")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{p}: quant_method {method!r} is not supported (only bitsandbytes 4-bit checkpoints)")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ValueError(f"{p}: 8-bit (LLM.int8) checkpoints are not supported; only bitsandbytes 4-bit (nf4, fp4)")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise ValueError(f"{p}: quantization_config does not say load_in_4bit; only 4-bit checkpoints are read")
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage not in ("uint8", None):
        raise ValueError(f"{p}: bnb_4bit_quant_storage {storage!r} is not supported (only uint8)")
    return q


def quantized_tensor_names(reader, weight: str) -> list[str]:
    """The file's tensors that make up the 4-bit weight ``weight``: itself, its scales, code tables and state."""
    out = [weight] + [f"{weight}.{s}" for s in QUANTIZED_SUFFIXES if f"{weight}.{s}" in reader]
    return out + [k for k in (f"{weight}.quant_state.bitsandbytes__nf4", f"{weight}.quant_state.bitsandbytes__fp4")
                  if k in reader]


def read_4bit_weight(reader, weight: str):
    """(packed uint8[ceil(n/2)], QuantState) of the 4-bit weight ``weight`` in a checkpoint reader."""
    from lora_ref.quant.serialize import state_from_tensors

    return state_from_tensors({k: reader.read(k) for k in quantized_tensor_names(reader, weight)}, weight)


def _load_4bit_layers(model: "Llama", reader, *, impl: str, rounding: str) -> set[str]:
    """Replace every Linear whose weight the checkpoint stores in 4 bits by a Linear4bit holding its codes; returns
    the names of the tensors this consumed (codes, scales, tables, states, and those layers' biases)."""
    from lora_ref.modeling.linear4bit import Linear4bit

    marker = ".quant_state.bitsandbytes__"
    weights = sorted({k.split(marker)[0] for k in reader.names() if marker in k})
    modules = dict(model.named_modules())
    consumed: set[str] = set()
    for w in weights:
        mname = w.removesuffix(".weight")
        m = modules.get(mname)
        if not w.endswith(".weight") or not isinstance(m, Linear):
            raise ValueError(f"4-bit tensor {w!r} in {reader.source(w)} is not the weight of a linear layer of "
                             f"this model")
        if mname == "lm_head" and model.config.tie_word_embeddings:
            raise ValueError(f"{reader.source(w)} stores lm_head in 4 bits, but config.json ties it to the "
                             "embedding, which stays in floating point")
        packed, state = read_4bit_weight(reader, w)
        if tuple(state.shape) != (m.out_features, m.in_features):
            raise ValueError(f"4-bit tensor {w!r} in {reader.source(w)} has shape {tuple(state.shape)}, the model "
                             f"expects {(m.out_features, m.in_features)}")
        bias = None
        if m.bias is not None:
            bname = mname + ".bias"
            if bname not in reader:
                raise ValueError(f"checkpoint lacks tensor {bname!r}")
            bias = reader.read(bname).astype(np.float32)
            consumed.add(bname)
        model.set_submodule(mname, Linear4bit.from_quantized(packed, state, bias, rounding=rounding, impl=impl))
        consumed.update(quantized_tensor_names(reader, w))
    if not weights:
        raise ValueError(f"config.json in {reader.folder} has a 4-bit quantization_config, but no tensor has a "
                         "'.quant_state.bitsandbytes__nf4|fp4' companion")
    return consumed


def save_4bit_pretrained(model: "Llama", path: str | os.PathLike) -> Path:
    """Write a Llama whose linear layers are :class:`~lora_ref.modeling.linear4bit.Linear4bit` as a bitsandbytes
    4-bit checkpoint folder, the one :meth:`Llama.from_pretrained` and transformers + bitsandbytes read:
    ``config.json`` with the ``quantization_config`` transformers writes (compute dtype float32) and one
    ``model.safetensors`` holding each 4-bit weight in bitsandbytes' state-dict format
    (:func:`lora_ref.quant.serialize.state_to_tensors`: codes, scales, code tables, the state's JSON) and every
    other parameter in float32 (a tied head stored once).

    The 4-bit layers must share one quant type and double-quant setting (one ``quantization_config`` describes
    them all). A model with parameters a Llama checkpoint does not hold (LoRA layers) is refused: merge them first.
    ``lora-ref quantize`` writes the same format while streaming a float checkpoint tensor by tensor.
    """
    from lora_ref.modeling.linear4bit import Linear4bit
    from lora_ref.quant.serialize import state_to_tensors, transformers_quantization_config

    tensors, kinds, quantized = {}, set(), set()
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            tensors.update(state_to_tensors(f"{name}.weight", m.weight.data, m.quant_state))
            kinds.add((m.quant_type, m.double_quant))
            quantized.add(f"{name}.weight")
            if m.bias is not None:
                tensors[f"{name}.bias"] = np.asarray(m.bias.data, dtype=np.float32)
    if len(kinds) != 1:
        raise ValueError(f"a 4-bit checkpoint needs 4-bit layers of one kind, found {sorted(kinds) or 'none'}")
    for pname, p in model.named_parameters():
        if pname not in tensors and p.dtype != np.uint8:
            tensors[pname] = np.ascontiguousarray(p.data, dtype=np.float32)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    parts = tuple(f"{w}." for w in quantized)  # a 4-bit weight's scales, code tables and state
    stored = quantized | {k for k in tensors if k not in quantized and not k.startswith(parts)}
    expected = set(checkpoint_tensor_names(model.config))
    if stored != expected:
        diff = sorted(stored - expected) or sorted(expected - stored)
        raise ValueError(f"cannot save as a 4-bit Llama checkpoint: the model's parameters differ from a Llama's "
                         f"(first difference: {diff[0]!r}); merge or remove replaced layers first")
    quant_type, double_quant = kinds.pop()
    config = model.config.to_dict()
    config["quantization_config"] = transformers_quantization_config(quant_type, double_quant, "float32")
    with output_dir(path) as tmp:
        write_json(tmp / CONFIG_FILE, config)
        write_safetensors(tmp / WEIGHTS_FILE, dict(sorted(tensors.items())), {"format": "pt"})
    return Path(path)


def _write_shards(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    if not _is_int(max_shard_bytes) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():  # greedy, in order; a tensor larger than the limit gets a shard of its own
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(folder / fname, shard)
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    write_json(folder / WEIGHTS_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


# ================================================================================================================
# sampling
# ================================================================================================================
def _check_sampling(temperature, top_k, rng) -> None:
    if not _is_number(temperature) or not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if temperature > 0 and not isinstance(rng, np.random.Generator):
        raise ValueError("sampling (temperature > 0) needs rng=np.random.default_rng(seed)")


def sample_next_token(logits: np.ndarray, *, temperature: float = 0.0, top_k: int | None = None,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick one token per row of ``logits`` (B, V) → int64 (B,).

    ``temperature == 0``: argmax (greedy; the first index on ties). Otherwise draw from
    p = softmax(logits / temperature) computed in float64, after setting every logit below the k-th largest to
    −∞ when ``top_k`` is given (ties with the k-th are kept, as in transformers' ``TopKLogitsWarper``). The draw is
    the inverse CDF at one ``rng.random()`` per row.
    """
    _check_sampling(temperature, top_k, rng)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got {logits.shape}")
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]  # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)  # (B, V), unnormalized
    cdf = np.cumsum(p, axis=-1)  # (B, V)
    u = rng.random(z.shape[0])[:, None] * cdf[:, -1:]  # (B, 1) uniform on [0, total)
    return np.argmax(cdf > u, axis=-1).astype(np.int64)  # first index whose cumulative mass exceeds u


# ================================================================================================================
# safetensors files
# ================================================================================================================
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into float32 arrays (F32 as is; BF16, F16, F64 converted).

    The bytes are parsed by :func:`lora_ref.files.safetensors.read_safetensors_raw`, which raises ``ValueError`` naming
    the file for any inconsistency; a tensor that is not floating point (a quantized checkpoint) is refused here.
    """
    tensors, _ = read_safetensors_raw(path)
    out: dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        if a.dtype.kind != "f" and a.dtype != np.dtype(ml_dtypes.bfloat16):
            raise ValueError(f"tensor {name!r} in {Path(path)} has dtype {NP_TO_ST.get(a.dtype, a.dtype)}; only F32, "
                             f"F16, BF16 and F64 are "
                             f"read (a quantized checkpoint?)")
        out[name] = a.astype(np.float32, copy=False)
    return out


def load_checkpoint_tensors(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of an HF checkpoint folder as float32, plus the file each came from (for error messages).

    Reads ``model.safetensors``, or else the shards listed in ``model.safetensors.index.json``
    (``{"weight_map": {name: shard file}}``), one tensor at a time (:class:`lora_ref.files.safetensors.CheckpointReader`).
    """
    from lora_ref.files.safetensors import CheckpointReader

    tensors: dict[str, np.ndarray] = {}
    with CheckpointReader(folder) as reader:
        for name in reader.names():
            dt = reader.dtype(name)
            if dt.kind != "f" and dt != np.dtype(ml_dtypes.bfloat16):
                raise ValueError(f"tensor {name!r} in {reader.source(name)} has dtype {NP_TO_ST.get(dt, dt)}; only "
                                 f"F32, F16, BF16 and F64 are read (a quantized checkpoint?)")
            tensors[name] = reader.read(name).astype(np.float32, copy=False)
        return tensors, {k: reader.source(k) for k in tensors}
