"""LoRA on an embedding table, as PEFT's ``lora.Embedding`` (``peft/tuners/lora/layer.py``).

For a table E (V, d) the layer looks up ids and adds a low-rank update [Hu et al. 2021, and loralib's
``Embedding``]::

    y = E[ids] + s · (Aᵀ[ids]) · Bᵀ,      A = lora_embedding_A (R, V),  B = lora_embedding_B (d, R),  s = α/R

so ΔE = s·(B·A)ᵀ (V, d). PEFT's initialization is the reverse of the linear layer's: A = 0 and B ~ N(0, 1) for
``init_lora_weights=True`` (loralib's choice; the update still starts at zero), both N(0, 1) for ``False``. There is no
dropout on the looked-up rows. In files the tensors are ``<module>.lora_embedding_A`` and ``<module>.lora_embedding_B``
(no ``.weight``), and PEFT also writes the base table as ``<module>.base_layer.weight`` when an ``embed_tokens`` /
``lm_head`` module is targeted (``save_embedding_layers="auto"``; :mod:`lora_ref.adapters.peft_files` does both).

:class:`LoraEmbedding` reuses :class:`~lora_ref.adapters.lora.LoraLinear`'s bookkeeping with A (R, V) in ``lora_A``
and B (d, R) in ``lora_B`` (the shapes of PEFT's ``lora_embedding_A`` / ``lora_embedding_B``; the properties of
those names return them) and sees the table as a (d, V) "linear weight" Eᵀ, so merging is the linear merge:
E ← E + s·(B·A)ᵀ, rounded as PEFT rounds. It is registered for :class:`lora_ref.modeling.nn.Embedding` with
:func:`~lora_ref.adapters.lora.register_lora_layer`; :func:`~lora_ref.adapters.lora.inject_lora` imports this module
when a target is an embedding.
"""

from __future__ import annotations

import numpy as np

from lora_ref.adapters.lora import LoraLinear, register_lora_layer, round_to_dtype
from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor
from lora_ref.modeling.nn import Embedding, Module, ModuleDict

__all__ = ["LoraEmbedding"]


class LoraEmbedding(LoraLinear):
    """An :class:`~lora_ref.modeling.nn.Embedding` plus named LoRA adapters (PEFT's ``lora.Embedding``).

    ``in_features`` is the vocabulary size V and ``out_features`` the embedding width d (PEFT's convention).
    DoRA, ``lora_bias``, dropout and the PiSSA/OLoRA inits are refused (``ValueError``).
    """

    def __init__(self, base_layer: Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True, use_dora: bool = False,
                 lora_bias: bool = False, *, rng: np.random.Generator | None = None):
        if not isinstance(base_layer, Embedding):
            raise ValueError(f"LoraEmbedding needs an Embedding base layer, got {type(base_layer).__name__}")
        Module.__init__(self)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_magnitude_vector = ModuleDict()
        self.lora_dropout, self.scaling, self.r, self.lora_alpha = {}, {}, {}, {}
        self.use_rslora, self.use_dora, self.lora_bias = {}, {}, {}
        self._rngs, self._dora_norms = {}, {}
        self.active_adapters = [adapter_name]
        self.merged_adapters = []
        self.disable_adapters = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora,
                          lora_bias, rng=rng)

    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                     use_dora=False, lora_bias=False, *, rng=None) -> None:
        if use_dora:
            raise ValueError("DoRA on an embedding layer is not implemented here; use use_dora=False")
        if lora_bias:
            raise ValueError("lora_bias is not supported on an embedding layer (as in PEFT)")
        if init_lora_weights in ("pissa", "olora"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} applies to linear layers, not embeddings")
        super().update_layer(adapter_name, r, lora_alpha, 0.0, use_rslora, init_lora_weights, False, False, rng=rng)
        self.lora_dropout[adapter_name] = float(lora_dropout)  # recorded (PEFT keeps it) but never applied

    @property
    def lora_embedding_A(self) -> dict:
        """PEFT's name: adapter → A (R, V)."""
        return {n: m.weight for n, m in self.lora_A.items()}

    @property
    def lora_embedding_B(self) -> dict:
        """PEFT's name: adapter → B (d, R)."""
        return {n: m.weight for n, m in self.lora_B.items()}

    def _random_init(self, adapter_name: str, init_lora_weights, rng) -> None:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"unknown init_lora_weights {init_lora_weights!r} for an embedding")
        if rng is None:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} draws random numbers: "
                             "pass rng=np.random.Generator")
        B.data[...] = rng.standard_normal(B.shape)  # N(0, 1), as nn.Embedding's own init
        if init_lora_weights is False:
            A.data[...] = rng.standard_normal(A.shape)
        else:
            A.data[...] = 0.0

    # the table E (V, d) seen as the (d, V) weight of a linear layer, so that ΔW = s·B·A merges into it
    def base_weight(self) -> np.ndarray:
        return np.array(self.base_layer.weight.data.T, dtype=np.float32, copy=True)

    def set_base_weight(self, w: np.ndarray) -> None:
        self.base_layer.weight.data[...] = round_to_dtype(np.asarray(w, dtype=np.float32).T, self.weight_dtype)

    def forward(self, ids) -> Tensor:
        """E[ids] + Σ_active s·(Aᵀ[ids])·Bᵀ; only E[ids] when merged or disabled. ids (…) int → (…, d)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(ids)
        result = self.base_layer(ids)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            after_A = ops.embedding(ops.transpose(A), ids)  # (…, R)
            result = result + ops.linear(after_A, B) * s  # (…, d)
        return result

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, adapters={list(self.lora_A)}"


register_lora_layer(Embedding, LoraEmbedding)
