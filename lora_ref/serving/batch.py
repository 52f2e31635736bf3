"""Many adapters over one base model: an :class:`AdapterSet` of loaded PEFT adapters, and a :class:`BatchDecoder`
that runs one decode step for rows of different lengths, each with its own adapter and KV cache.

This is the engine half of multi-tenant LoRA serving [Sheng et al. 2023, S-LoRA; Chen et al. 2023, Punica]: the
base weights are held once; every adapter stays unmerged, its A and B packed per layer (:class:`StackedLora`); each
linear layer of the model runs :func:`lora_ref.serving.bgmv.bgmv` on the batch, so row i gets
``x_i Wᵀ + s·(x_i Aᵀ) Bᵀ`` of *its* adapter. Attention is per row against that row's own cache (rows differ in
length), everything else (norms, RoPE at each row's own position, SwiGLU, the head) is row-wise and batched.

The forward pass repeats :class:`lora_ref.modeling.llama.Llama`'s computation with the same functions
(:mod:`lora_ref.autograd.functional`'s one-node kernels, the same BLAS products, :class:`KVCache`), so a row run
alone gives the same logits as lora_ref's own single-sequence generation with that adapter applied unmerged
(:func:`lora_ref.adapters.peft_files.load_adapter` + :func:`lora_ref.modeling.generate.generate`), and a row in
a mixed batch differs from it only by the order of float32 additions inside the BLAS product of the base weight
(the product of n rows may block its sums differently from a product of one row).

Continuous batching (a new request joining the running batch at the next step) is the caller's loop:
``prefill`` a free row, then include it in the next ``decode``; ``free`` it when the request ends.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from lora_ref.adapters.lora import LoraConfig, LoraLinear, find_targets
from lora_ref.adapters.peft_files import (
    PREFIX,
    WEIGHTS_NAME,
    _read_weights,
    peft_config_dict,
    read_adapter_config,
    write_adapter_folder,
)
from lora_ref.autograd import functional as F
from lora_ref.autograd.tensor import Tensor, no_grad
from lora_ref.files.outputs import require_dir
from lora_ref.modeling.llama import KVCache, Llama, rope_cos_sin
from lora_ref.serving.bgmv import IMPLS, StackedLora, base_product, bgmv_unchecked

__all__ = ["AdapterSet", "BatchDecoder", "PROJECTIONS", "read_peft_lora", "write_random_adapter"]

#: The linear layers of one decoder block, by their path inside ``model.layers.N``.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _linear_names(model: Llama) -> list[str]:
    names = [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJECTIONS]
    return names + ["lm_head"]


class AdapterSet:
    """The LoRA adapters loaded for one base model, by name, ready for mixed batches.

    ``load(name, folder)`` reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    :mod:`lora_ref.adapters.peft_files`), checks it against the base and keeps, per targeted linear layer, A, B and
    the scaling s = α/r (α/√r with rsLoRA). Adapters of different ranks and different targets coexist; each layer
    keeps its adapters packed in one :class:`StackedLora`, rebuilt when an adapter is loaded or unloaded (hot
    swap: rows running with other adapters are not disturbed; an adapter a row is using cannot be unloaded).
    Loading, unloading and a decoder's step may run in different threads: a lock guards the set, and each decode
    step reads one consistent snapshot of the packed layers (:meth:`snapshot`).

    Supported: plain LoRA on the linear layers of the blocks and on ``lm_head``. Refused with a ``ValueError``
    naming the feature: DoRA, ``lora_bias``, ``modules_to_save``, trained base biases (``bias`` other than
    "none"), LoRA on the embedding — each changes more than a low-rank term and would need its own kernel.
    """

    def __init__(self, model: Llama):
        if not isinstance(model, Llama):
            raise ValueError(f"AdapterSet needs a lora_ref Llama, got {type(model).__name__}")
        if any(isinstance(m, LoraLinear) for _, m in model.named_modules()):
            raise ValueError("AdapterSet needs the plain base model: this one already has LoRA layers "
                             "(load adapters into the AdapterSet instead of the model)")
        self.model = model
        self._layers = _linear_names(model)
        self._adapters: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}  # name -> layer -> (A, B, s)
        self.configs: dict[str, LoraConfig] = {}
        self._stacks: dict[str, tuple[StackedLora, dict[str, int]]] | None = None  # layer -> (packed, name -> slot)
        self._in_use: dict[str, int] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- load / unload
    def load(self, name: str, folder: str | os.PathLike) -> None:
        """Load the PEFT adapter in ``folder`` under ``name``; ``ValueError`` naming the problem (a missing,
        corrupt or truncated file, an unsupported feature, a target the base lacks, a tensor of the wrong shape,
        NaN or inf, a name already loaded), and then nothing changes."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"adapter name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        layers = read_peft_lora(self.model, folder)  # the slow part (files), outside the lock
        config = read_adapter_config(folder)
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            self._adapters[name] = layers
            self.configs[name] = config
            self._stacks = None

    def unload(self, name: str) -> None:
        """Forget adapter ``name``; ``ValueError`` if it is not loaded or a row of a decoder still uses it."""
        with self._lock:
            if name not in self._adapters:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {self.names()})")
            if self._in_use.get(name, 0):
                raise ValueError(f"adapter {name!r} is in use by {self._in_use[name]} running row(s); free them "
                                 "first")
            del self._adapters[name]
            del self.configs[name]
            self._stacks = None

    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        return list(self._adapters)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def layers_of(self, name: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """{layer name: (A, B, s)} of a loaded adapter (the arrays themselves: do not modify them)."""
        if name not in self._adapters:
            raise ValueError(f"no adapter named {name!r} is loaded (loaded: {self.names()})")
        return self._adapters[name]

    # ------------------------------------------------------------------------------------------- for decoders
    def _acquire(self, name: str) -> None:
        """Mark ``name`` used by one more row; ``ValueError`` if it is not loaded (checked under the lock, so an
        unload cannot slip in between)."""
        with self._lock:
            if name not in self._adapters:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {self.names()})")
            self._in_use[name] = self._in_use.get(name, 0) + 1

    def _release(self, name: str) -> None:
        with self._lock:
            self._in_use[name] -= 1

    def stacked(self, layer: str) -> tuple[StackedLora, dict[str, int]]:
        """The adapters of ``layer`` packed for :func:`bgmv`, and each adapter's slot in the pack (an adapter that
        does not target the layer has none: its rows use index −1 there)."""
        return self.snapshot()[layer]

    def snapshot(self) -> dict[str, tuple[StackedLora, dict[str, int]]]:
        """{layer: (packed adapters, adapter name → slot)} for every linear layer, as of now; rebuilt after a load
        or unload. A decode step uses one snapshot throughout, whatever another thread loads meanwhile."""
        with self._lock:
            return self._stacks if self._stacks is not None else self._build()

    def _build(self) -> dict[str, tuple[StackedLora, dict[str, int]]]:
        stacks, shared = {}, {}
        module = dict(self.model.named_modules())
        for lname in self._layers:
            m = module[lname]
            slots, items = {}, []
            for aname, layers in self._adapters.items():
                if lname in layers:
                    slots[aname] = len(items)
                    items.append(layers[lname])
            # layers with the same slots share one dict, so a decoder maps its rows to slots once per step
            slots = shared.setdefault(tuple(slots.items()), slots)
            stacks[lname] = (StackedLora(items, m.in_features, m.out_features), slots)
        self._stacks = stacks
        return stacks


def read_peft_lora(model: Llama, folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{layer name: (A (r, in), B (out, r), s)} of the PEFT LoRA adapter in ``folder``, checked against ``model``.

    The same reading and checks as :func:`lora_ref.adapters.peft_files.load_adapter` (config, weights, targets,
    shapes, finite values), without touching the model; ``ValueError`` names the file, tensor or feature.
    """
    folder = require_dir(folder, "adapter folder")
    config = read_adapter_config(folder)
    for feature, bad in (("use_dora (DoRA)", config.use_dora), ("lora_bias", config.lora_bias),
                         ("modules_to_save", bool(config.modules_to_save)),
                         (f"bias={config.bias!r} (trained base biases)", config.bias != "none")):
        if bad:
            raise ValueError(f"adapter {folder} uses {feature}, which serving does not support (plain LoRA only)")
    tensors = _read_weights(folder)
    wfile = folder / WEIGHTS_NAME
    try:
        targets = find_targets(model, config)
    except ValueError as e:
        raise ValueError(f"adapter {folder} does not fit the model: {e}") from None
    linear = set(_linear_names(model))
    out, expected = {}, set()
    for t in targets:
        if t not in linear:
            raise ValueError(f"adapter {folder} targets {t}, which serving does not support (only the linear layers "
                             f"of the blocks and lm_head)")
        m = model.get_submodule(t)
        r, alpha = config.rank_and_alpha(t)
        a_key, b_key = f"{PREFIX}{t}.lora_A.weight", f"{PREFIX}{t}.lora_B.weight"
        for key, shape in ((a_key, (r, m.in_features)), (b_key, (m.out_features, r))):
            if key not in tensors:
                raise ValueError(f"{wfile} has no tensor {key} (the config targets {t})")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"tensor {key} in {wfile} has shape {tuple(tensors[key].shape)}, but the model "
                                 f"expects shape {shape}")
            if not np.all(np.isfinite(tensors[key])):
                raise ValueError(f"tensor {key} in {wfile} holds NaN or inf")
        expected.update((a_key, b_key))
        s = alpha / math.sqrt(r) if config.use_rslora else alpha / r  # as LoraLinear.update_layer
        out[t] = (np.ascontiguousarray(tensors[a_key]), np.ascontiguousarray(tensors[b_key]), s)
    base_copy = f"{PREFIX}lm_head.base_layer.weight"  # PEFT saves the head table with an lm_head adapter
    if base_copy in tensors:
        if not np.array_equal(tensors[base_copy], model.lm_head.weight.data):
            raise ValueError(f"{wfile} carries its own lm_head table ({base_copy}) different from the base's; "
                             "serving shares one base and cannot replace it per adapter")
        expected.add(base_copy)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{wfile} holds tensors this LoRA config does not produce: {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    return out


def write_random_adapter(model: Llama, folder: str | os.PathLike, *, rng: np.random.Generator, r: int = 8,
                         lora_alpha: float = 16, target_modules="all-linear", b_std: float = 0.01) -> Path:
    """Write a PEFT LoRA adapter folder for ``model`` with random factors, as a stand-in for a trained adapter in
    tests, benchmarks and the chapter (the cost of serving depends on shapes, not on what the adapter learned).

    A ~ U(±1/√in) (PEFT's Kaiming-uniform init), B ~ N(0, ``b_std``²) (nonzero, unlike a fresh adapter, so the
    adapter changes the output). ``model`` is only read. The config lists the targeted module names, as PEFT saves
    ``"all-linear"``.
    """
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules)
    targets = find_targets(model, config)
    tensors = {}
    for t in targets:
        m = model.get_submodule(t)
        rank, _ = config.rank_and_alpha(t)
        bound = 1.0 / math.sqrt(m.in_features)
        tensors[f"{PREFIX}{t}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, m.in_features)).astype(np.float32)
        tensors[f"{PREFIX}{t}.lora_B.weight"] = rng.normal(0.0, b_std, (m.out_features, rank)).astype(np.float32)
    config.target_modules = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return write_adapter_folder(folder, tensors, peft_config_dict(model, config))


class _Row:
    __slots__ = ("adapter", "cache")

    def __init__(self, adapter: str | None, cache: KVCache):
        self.adapter, self.cache = adapter, cache


class BatchDecoder:
    """One base model, up to ``max_batch`` rows, each a sequence with its own adapter (or none) and KV cache.

    ``prefill(row, ids, adapter)`` runs a prompt into a free row and returns the logits of its last position;
    ``decode(rows, tokens)`` feeds one token to each of the given rows (of any lengths, any adapters) as one batch
    and returns their next-token logits; ``free(row)`` ends a row. Model and adapters are only read. One thread
    drives a decoder (a server's engine loop); the :class:`AdapterSet` may change from other threads meanwhile.
    """

    def __init__(self, model: Llama, adapters: AdapterSet, *, max_batch: int, impl: str = "auto"):
        if not isinstance(adapters, AdapterSet) or adapters.model is not model:
            raise ValueError("BatchDecoder needs an AdapterSet made for the same model")
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
        self.model, self.adapters, self.max_batch, self.impl = model, adapters, int(max_batch), impl
        self.config = model.config
        self._rows: dict[int, _Row] = {}
        self._blocks = [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
        self._modules = dict(model.named_modules())  # name -> the base layer bgmv multiplies by

    # ------------------------------------------------------------------------------------------- rows
    def _check_row(self, row) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self.max_batch:
            raise ValueError(f"row must be an integer in [0, {self.max_batch}), got {row!r}")
        return int(row)

    def active_rows(self) -> list[int]:
        return sorted(self._rows)

    def length(self, row: int) -> int:
        """Positions held in ``row``'s cache (its prompt plus the tokens decoded so far)."""
        return self._rows[self._check_row(row)].cache.length

    def adapter_of(self, row: int) -> str | None:
        return self._rows[self._check_row(row)].adapter

    def free(self, row: int) -> None:
        """Release ``row`` (its cache and its hold on the adapter); freeing a free row does nothing."""
        r = self._rows.pop(self._check_row(row), None)
        if r is not None and r.adapter is not None:
            self.adapters._release(r.adapter)

    def prefill(self, row: int, token_ids, adapter: str | None) -> np.ndarray:
        """Run the prompt ``token_ids`` into the free ``row`` with ``adapter`` (a loaded name, or None for the
        base); returns float32 logits (vocab,) of its last position."""
        row = self._check_row(row)
        if row in self._rows:
            raise ValueError(f"row {row} is in use; free it first")
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r} is loaded (loaded: {self.adapters.names()})")
        arr = np.asarray(token_ids)
        if arr.size == 0:
            raise ValueError("token_ids must not be empty")
        ids = self.model.check_ids(arr[None, :] if arr.ndim == 1 else arr)
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids must be one sequence, got shape {ids.shape}")
        if adapter is not None:
            self.adapters._acquire(adapter)  # held from here on: nobody can unload it under the row
        r = _Row(adapter, KVCache(self.config.num_hidden_layers))
        try:
            logits = self._forward(ids[0], [r], [ids.shape[1]])
        except BaseException:
            if adapter is not None:
                self.adapters._release(adapter)
            raise
        self._rows[row] = r
        return logits[0]

    def decode(self, rows, tokens) -> np.ndarray:
        """One step: feed ``tokens[j]`` to ``rows[j]`` (distinct, prefilled rows) → float32 logits (len(rows), vocab)."""
        rows = [self._check_row(r) for r in rows]
        if not rows:
            raise ValueError("decode needs at least one row")
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must be distinct, got {rows}")
        missing = [r for r in rows if r not in self._rows]
        if missing:
            raise ValueError(f"rows {missing} are not prefilled")
        tok = np.asarray(tokens)
        if tok.shape != (len(rows),) or (tok.size and tok.dtype.kind not in "iu"):
            raise ValueError(f"tokens must be {len(rows)} integers, one per row, got {tok.dtype} {tok.shape}")
        self.model.check_ids(tok[None, :])
        limit = self.config.max_position_embeddings
        full = [r for r in rows if self._rows[r].cache.length + 1 > limit]
        if full:
            raise ValueError(f"rows {full} hold max_position_embeddings={limit} positions already")
        return self._forward(tok.astype(np.int64), [self._rows[r] for r in rows], [1] * len(rows))

    # ------------------------------------------------------------------------------------------- the model
    def _linear(self, name: str, x: np.ndarray, rows, counts, seen: dict) -> np.ndarray:
        """bgmv of layer ``name`` on the step's tokens: each token's row → that row's adapter slot in this layer.
        ``seen`` holds the step's snapshot of the packed layers and the index arrays already made."""
        stack, slots = seen["snapshot"][name]
        plan = seen.get(id(slots))  # the snapshot keeps every slot map alive, so ids are not reused in a step
        if plan is None:  # computed once per step for each distinct slot map (usually one or two)
            per_row = np.asarray([slots.get(r.adapter, -1) for r in rows], dtype=np.int64)
            plan = seen[id(slots)] = (np.repeat(per_row, counts), bool(per_row.size) and bool(per_row.max() >= 0))
        idx, any_adapter = plan
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not any_adapter:  # no row has an adapter in this layer: the base product alone
            return base_product(x, self._modules[name])
        return bgmv_unchecked(x, self._modules[name], stack, idx, self.impl)

    def _forward(self, ids: np.ndarray, rows: list[_Row], counts: list[int]) -> np.ndarray:
        """ids (N,) = the new tokens of every row one after the other (``counts[j]`` of row j) → logits of each
        row's last new token (len(rows), V). Row j's tokens sit at positions cache.length, cache.length + 1, …"""
        cfg = self.config
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        starts = np.cumsum([0] + counts)
        positions = np.concatenate([np.arange(r.cache.length, r.cache.length + c) for r, c in zip(rows, counts)])
        cos, sin = rope_cos_sin(self.model.model.inv_freq, positions)  # (N, Dh): each token at its own position
        scale = Dh ** -0.5
        snapshot = self.adapters.snapshot()  # one consistent set of adapters for the whole step
        seen: dict = {"snapshot": snapshot}
        with no_grad():
            x = self.model.model.embed_tokens.weight.data[ids]  # (N, D)
            for prefix, block in self._blocks:
                attn = block.self_attn
                h = F.rms_norm(x, block.input_layernorm.weight.data, block.input_layernorm.eps).data  # (N, D)
                N = h.shape[0]
                q = self._linear(prefix + "self_attn.q_proj", h, rows, counts, seen).reshape(N, H, Dh)
                k = self._linear(prefix + "self_attn.k_proj", h, rows, counts, seen).reshape(N, K, Dh)
                v = self._linear(prefix + "self_attn.v_proj", h, rows, counts, seen).reshape(N, K, Dh)
                # (1, heads, N, Dh): the batch's tokens along "time", so cos/sin (N, Dh) rotate each by its position
                q = F.rotary(q.transpose(1, 0, 2)[None], cos, sin).data
                k = F.rotary(k.transpose(1, 0, 2)[None], cos, sin).data
                v = v.transpose(1, 0, 2)[None]
                y = np.empty((N, H * Dh), dtype=np.float32)
                for j, r in enumerate(rows):  # attention: each row against its own cache
                    a, b = starts[j], starts[j + 1]
                    kk, vv = r.cache.update(attn.layer_idx, Tensor(k[:, :, a:b]), Tensor(v[:, :, a:b]))
                    o = F.scaled_dot_product_attention(Tensor(q[:, :, a:b]), kk, vv, causal=True, scale=scale).data
                    y[a:b] = o[0].transpose(1, 0, 2).reshape(b - a, H * Dh)
                x = x + self._linear(prefix + "self_attn.o_proj", y, rows, counts, seen)
                h = F.rms_norm(x, block.post_attention_layernorm.weight.data,
                               block.post_attention_layernorm.eps).data
                g = self._linear(prefix + "mlp.gate_proj", h, rows, counts, seen)
                u = self._linear(prefix + "mlp.up_proj", h, rows, counts, seen)
                x = x + self._linear(prefix + "mlp.down_proj", F.swiglu(g, u).data, rows, counts, seen)
            norm = self.model.model.norm
            last = x[starts[1:] - 1]  # (len(rows), D): the last new token of each row
            h = F.rms_norm(last, norm.weight.data, norm.eps).data
            return self._linear("lm_head", h, rows, [1] * len(rows), {"snapshot": snapshot})
