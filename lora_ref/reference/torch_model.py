"""The tutorial Llama written directly in PyTorch: the baseline of ``lora-ref bench train``.

A compact PyTorch twin of :class:`lora_ref.modeling.llama.Llama` for the subset the tutorial model uses (default RoPE, GQA,
RMSNorm, SwiGLU, tied or untied head, no biases). Parameter names equal transformers' ``LlamaForCausalLM``
state-dict keys, so ``TorchLlama.from_state_dict(config, model.state_dict())`` copies our weights one to one.
It exists so that the speed comparison is against plain PyTorch eager code doing the same arithmetic, not against
the framework overhead of a larger library; tests hold its logits equal to ours.

PyTorch is needed only here (the ``interop`` extra); importing this module without it raises ImportError.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _cfg(config, name, default=None):
    return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # x * rsqrt(mean(x²) + eps) * weight, like LlamaRMSNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv: int, head_dim: int, sdpa: bool):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.sdpa = n_heads, n_kv, head_dim, sdpa
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
            v = v.repeat_interleave(rep, dim=1)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            y = att @ v  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class _MLP(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):  # down(silu(gate(x)) * up(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, d, ffn, n_heads, n_kv, head_dim, eps, sdpa):
        super().__init__()
        self.input_layernorm = _RMSNorm(d, eps)
        self.self_attn = _Attention(d, n_heads, n_kv, head_dim, sdpa)
        self.post_attention_layernorm = _RMSNorm(d, eps)
        self.mlp = _MLP(d, ffn)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, V, d, ffn, L, n_heads, n_kv, head_dim, eps, sdpa):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, d)
        self.layers = nn.ModuleList([_Layer(d, ffn, n_heads, n_kv, head_dim, eps, sdpa) for _ in range(L)])
        self.norm = _RMSNorm(d, eps)


class TorchLlama(nn.Module):
    """A Llama decoder in PyTorch with transformers' parameter names (``model.layers.0.self_attn.q_proj.weight``...).

    ``config`` is a :class:`lora_ref.modeling.llama.LlamaConfig` or a dict with the same (transformers) field names.
    ``sdpa=True`` uses ``F.scaled_dot_product_attention`` (PyTorch's fastest eager attention); ``False`` spells
    softmax(QKᵀ/√d + mask)V out in plain tensor ops, the way lora_ref computes it.
    """

    def __init__(self, config, *, sdpa: bool = True):
        super().__init__()
        V, d = _cfg(config, "vocab_size"), _cfg(config, "hidden_size")
        n_heads = _cfg(config, "num_attention_heads")
        n_kv = _cfg(config, "num_key_value_heads") or n_heads
        head_dim = _cfg(config, "head_dim") or d // n_heads
        scaling = _cfg(config, "rope_scaling")
        if scaling and (scaling.get("rope_type", scaling.get("type")) or "default") != "default":
            raise ValueError(f"TorchLlama supports default RoPE only, got rope_scaling={scaling}")
        self.model = _Body(V, d, _cfg(config, "intermediate_size"), _cfg(config, "num_hidden_layers"),
                           n_heads, n_kv, head_dim, _cfg(config, "rms_norm_eps", 1e-6), sdpa)
        self.tie = bool(_cfg(config, "tie_word_embeddings", False))
        if not self.tie:
            self.lm_head = nn.Linear(d, V, bias=False)
        theta = _cfg(config, "rope_theta", None)
        if theta is None:
            theta = (_cfg(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, *, sdpa: bool = True) -> "TorchLlama":
        """A TorchLlama holding copies of ``state_dict``'s arrays ({name: ndarray}, transformers key names)."""
        m = cls(config, sdpa=sdpa)
        sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict.items()}
        if m.tie:
            sd.pop("lm_head.weight", None)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"TorchLlama: state dict mismatch, missing {missing}, unexpected {unexpected}")
        return m

    def forward(self, ids):
        """Logits (B, T, V) of int ids (B, T)."""
        B, T = ids.shape
        pos = torch.arange(T, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)  # (B, T, D)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        return x @ w.T  # (B, T, V)


def torch_train_step(model: TorchLlama, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     max_grad_norm: float | None = 1.0) -> float:
    """One forward + backward + AdamW step, the same work as :func:`lora_ref.training.loop.train_step`."""
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return float(loss.detach())
