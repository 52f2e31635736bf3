"""The decode loop without per-token Python: a preallocated KV cache and one compiled call per generated token.

:mod:`lora_ref.modeling.generate` runs the prompt through the model once (the prefill, a matrix product per
layer, where the autograd modules are the right tool) and then feeds one token at a time. A one-token step of
the module graph costs ~250 Python-level operations (a Tensor per op, reshapes, a growing cache), each a few
microseconds, for ~60 matrix-vector products that are themselves bound by memory bandwidth. :class:`Decoder`
does the one-token steps instead with the kernels of :mod:`lora_ref.kernels.decode`:

- the keys and values live in two arrays (L, K, capacity, Dh) allocated once for the prompt plus every new token;
  the prefill's cache is copied in, each step writes one position;
- RoPE's cos/sin for every position are computed once (the same float32 values the model computes per call);
- one call per token runs every layer and the head (:func:`lora_ref.kernels.decode.decode_step`), with no
  autograd graph and no temporaries beyond one row per thread;
- 4-bit layers (:class:`lora_ref.modeling.linear4bit.Linear4bit`) are read in their stored form, packed codes and
  (double-quantized) scales, decoded and multiplied in one pass (the fused NF4 GEMV); the head, float32, is read
  once per token (a tied head is the embedding matrix: one array, one read).

The step computes exactly what the module graph computes for that position, up to the order of float32 sums
(tested against the graph and, on SmolLM2-135M-Instruct, greedy tokens equal transformers' ``generate``).
Models the kernels do not cover — LoRA or other wrapped layers, biases, float64, a batch of several sequences —
keep the module graph: :func:`unsupported` says why, and :mod:`lora_ref.modeling.generate` falls back.
"""

from __future__ import annotations

import numpy as np

from lora_ref.autograd.tensor import no_grad
from lora_ref.kernels import decode as kernels
from lora_ref.kernels.decode import readonly, weight_list
from lora_ref.kernels.decode_reference import Weight4bit
from lora_ref.modeling.linear4bit import Linear4bit
from lora_ref.modeling.llama import KVCache, rope_cos_sin
from lora_ref.modeling.nn import Linear
from lora_ref.quant import nf4

__all__ = ["Decoder", "unsupported", "weight4bit", "PROJECTIONS"]

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
"""The seven projections of a layer, in the order the decode kernels take them."""


def weight4bit(packed: np.ndarray, state) -> Weight4bit:
    """The kernels' view of a 4-bit weight (packed codes and a :class:`~lora_ref.quant.blockwise.QuantState`):
    the stored arrays as they are (read-only views), double-quantized scales left double-quantized."""
    flat = readonly(np.ascontiguousarray(np.asarray(packed, np.uint8).reshape(-1)))
    n, k = (int(d) for d in state.shape)
    code = readonly(np.ascontiguousarray(nf4.kernel_lut(state.quant_type), np.float32))
    none_f, none_u = readonly(np.empty(0, np.float32)), readonly(np.empty(0, np.uint8))
    if state.nested:
        s2 = state.state2
        return Weight4bit(flat, none_f, readonly(np.ascontiguousarray(state.absmax, np.uint8)),
                          readonly(np.ascontiguousarray(s2.absmax, np.float32)),
                          readonly(np.ascontiguousarray(s2.code, np.float32)), np.float32(state.offset),
                          int(s2.blocksize), code, int(state.blocksize), True, n, k)
    return Weight4bit(flat, readonly(np.ascontiguousarray(state.absmax, np.float32)), none_u, none_f, none_f,
                      np.float32(0.0), 1, code, int(state.blocksize), False, n, k)


def _kernel_weight(module):
    """A projection as the kernels take it: a float32 matrix (Linear) or a :class:`Weight4bit` (Linear4bit)."""
    if type(module) is Linear:
        return readonly(np.ascontiguousarray(module.weight.data))
    return weight4bit(module.weight.data, module.quant_state)


def unsupported(model) -> str | None:
    """Why :class:`Decoder` cannot run ``model``, or None when it can.

    It can when the parameters are float32 and every projection is a bias-free :class:`~lora_ref.modeling.nn.Linear`
    or a bias-free float32-state :class:`Linear4bit`, the seven of a layer of one kind (the head may be either).
    """
    cfg = model.config
    if model.model.embed_tokens.weight.data.dtype != np.float32:
        return "the model is not float32"
    kinds = []
    for i, layer in enumerate(model.model.layers):
        kinds_here = set()
        for name in PROJECTIONS:
            m = layer.get_submodule(name)
            if type(m) not in (Linear, Linear4bit):
                return f"model.layers.{i}.{name} is a {type(m).__name__}"
            if getattr(m, "bias", None) is not None:
                return f"model.layers.{i}.{name} has a bias"
            if type(m) is Linear4bit and np.dtype(m.quant_state.dtype) != np.float32:
                return f"model.layers.{i}.{name} is a 4-bit weight of a {np.dtype(m.quant_state.dtype)} model"
            kinds_here.add(type(m))
        if len(kinds_here) != 1:
            return f"model.layers.{i} mixes float and 4-bit projections"
        kinds.append(kinds_here.pop())
    head = model.lm_head
    if type(head) not in (Linear, Linear4bit) or getattr(head, "bias", None) is not None:
        return f"the head is a {type(head).__name__}"
    if len(set(kinds)) > 1:
        return "the layers mix float and 4-bit projections"
    if cfg.head_dim % 2 or cfg.num_attention_heads % cfg.num_key_value_heads:
        return "the head size is odd or the query heads do not group over the key/value heads"
    return None


class Decoder:
    """Greedy or sampled generation's one-token steps for ``model``, with room for ``capacity`` positions.

    ``prefill(ids)`` runs the prompt (1-D ids) through the module graph and returns the logits (V,) of its last
    position; ``step(token)`` feeds one token and returns the next logits (V,). ``impl``: "auto" (the compiled
    kernels when the fast-path switch is on), "numba" or "numpy" (the readable twins), as everywhere
    (:mod:`lora_ref.kernels.switch`). ``ValueError`` when :func:`unsupported` names a reason.

    The returned logits array is reused by the next step: copy it to keep it.
    """

    def __init__(self, model, capacity: int, *, impl: str = "auto"):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the one-token decoder cannot run this model: {reason}")
        cfg = model.config
        if capacity < 1 or capacity > cfg.max_position_embeddings:
            raise ValueError(f"capacity must lie in [1, {cfg.max_position_embeddings}], got {capacity}")
        self.model, self.capacity, self.impl = model, int(capacity), impl
        L, K, Dh, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        layers = model.model.layers
        self.norms = np.stack([np.stack([lay.input_layernorm.weight.data, lay.post_attention_layernorm.weight.data])
                               for lay in layers]).astype(np.float32)                   # (L, 2, D)
        self.weights = weight_list(_kernel_weight(lay.get_submodule(n)) for lay in layers for n in PROJECTIONS)
        self.final_norm = np.ascontiguousarray(model.model.norm.weight.data, np.float32)  # (D,)
        self.head = _kernel_weight(model.lm_head)                                     # (V, D), tied: the embedding
        self.embed = model.model.embed_tokens.weight.data                              # (V, D)
        self.cache_k = np.zeros((L, K, self.capacity, Dh), np.float32)
        self.cache_v = np.zeros((L, K, self.capacity, Dh), np.float32)
        self.cos, self.sin = rope_cos_sin(model.model.inv_freq, np.arange(self.capacity))  # (capacity, Dh) each
        self.eps, self.scale = float(cfg.rms_norm_eps), float(Dh) ** -0.5
        self.x = np.empty(D, np.float32)
        self.logits = np.empty(cfg.vocab_size, np.float32)
        self.length = 0
        self._step = kernels.pick("decode_step", self.x, impl=impl).decode_step

    def prefill(self, ids) -> np.ndarray:
        """Run the prompt ``ids`` (T,) through the model from position 0; its keys and values fill the cache.
        Returns the logits (V,) of the last position."""
        ids = self.model.check_ids(np.asarray(ids).reshape(1, -1))
        T = ids.shape[1]
        if T > self.capacity:
            raise ValueError(f"a prompt of {T} tokens does not fit a decoder of capacity {self.capacity}")
        cache = KVCache(self.model.config.num_hidden_layers)
        with no_grad():
            h = self.model.model(ids, cache)                                           # (1, T, D)
            self.logits[:] = np.asarray(self.model.lm_head(h[:, -1:, :]).data)[0, -1]
        for layer in range(len(cache.keys)):
            self.cache_k[layer, :, :T] = cache.keys[layer].data[0]
            self.cache_v[layer, :, :T] = cache.values[layer].data[0]
        self.length = T
        return self.logits

    def step(self, token: int) -> np.ndarray:
        """Feed ``token`` at position ``length``; return the logits (V,) of the next token (reused buffer)."""
        pos = self.length
        if pos >= self.capacity:
            raise ValueError(f"the decoder is full: {self.capacity} positions")
        self.x[:] = self.embed[token]
        self._step(self.x, self.norms, self.weights, self.cache_k, self.cache_v, pos, self.cos[pos], self.sin[pos],
                   self.eps, self.scale, self.final_norm, self.head, self.logits)
        self.length = pos + 1
        return self.logits

    def weight_bytes(self) -> dict:
        """Bytes the step reads from the weights, by part: ``layers`` (the seven projections of every layer, as
        stored), ``norms`` (the RMSNorm gains, final included), ``head`` (read once; for a tied head this is the
        embedding matrix), ``embedding_row`` (the fed token's row of an untied embedding; 0 when tied, inside
        the head's read)."""
        def nbytes(w):
            if isinstance(w, Weight4bit):
                return sum(int(a.nbytes) for a in (w.packed, w.absmax, w.qabsmax, w.absmax2)) + (4 if w.nested else 0)
            return int(w.nbytes)

        tied = self.model.lm_head.weight is self.model.model.embed_tokens.weight
        return {"layers": sum(nbytes(self.weights[i]) for i in range(len(self.weights))),
                "norms": int(self.norms.nbytes + self.final_norm.nbytes), "head": nbytes(self.head),
                "embedding_row": 0 if tied else int(self.embed.shape[1] * self.embed.itemsize)}

    def kv_bytes(self, positions: int) -> int:
        """Bytes of keys and values one step reads when attending over ``positions`` positions (every layer)."""
        L, K, _, Dh = self.cache_k.shape
        return 2 * L * K * int(positions) * Dh * self.cache_k.itemsize
