"""Benchmark rows of the training step: ours against PyTorch, QLoRA against LoRA, and peak memory.

Rows (:func:`lora_ref.bench.timing.row`; ``ratio = ours / baseline``, lower is better):

- ``train_step`` vs ``torch``: one forward + cross-entropy + backward + clip_grad_norm + AdamW step of the tutorial
  model (:mod:`lora_ref.training.tutorial`: 4 layers, D=128, 4 query / 2 key-value heads, F=384, V=256) on a batch of
  32×128 tokens of the pretraining corpus, against :class:`lora_ref.reference.torch_model.TorchLlama` run eagerly on the CPU
  (``scaled_dot_product_attention``), started from a copy of our initial weights, on the same batch, with AdamW of
  the same settings and parameter groups and the same thread count. Before timing, two steps of each run on the
  same batch and their losses must agree: both sides compute the same thing.
- ``qlora_step`` vs ``lora_step``: the same step with a LoRA adapter (r=8, α=16, every linear layer of the blocks)
  on a float32 base, and on the same base quantized to NF4 (blocksize 64, double quantization; the head stays
  float), only the adapters trained. The 4-bit layers compute through the quantized weight
  (:func:`lora_ref.modeling.linear4bit.linear_4bit`); no float copy of a base weight is kept between steps.
- ``memory_full``, ``memory_lora``, ``memory_qlora`` vs ``memory_full``: peak bytes allocated by NumPy (traced with
  :mod:`tracemalloc`, which NumPy reports its buffers to) from building the model through two training steps:
  weights, gradients, optimizer state and activations. ``ours_s``/``baseline_s`` hold bytes here
  (``params.unit == "bytes"``). Buffers allocated inside compiled Numba code are not traced.

Thread counts are whatever the caller pinned (``lora-ref bench`` pins Numba, OpenBLAS and torch to the same
number); they are recorded in each row. Measure with ``lora-ref bench train``.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from lora_ref.bench.timing import row, time_pair

__all__ = ["train_rows", "train_step_row", "qlora_step_row", "memory_rows", "LORA_SETTINGS"]

LORA_SETTINGS = {"r": 8, "lora_alpha": 16.0, "target_modules": "all-linear"}
QUANT_SETTINGS = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}


def _threads() -> dict:
    import numba

    info = {"numba_threads": numba.get_num_threads()}
    try:
        from threadpoolctl import threadpool_info

        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
        info["blas_threads"] = blas[0].get("num_threads") if blas else None
    except ImportError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _setup():
    from lora_ref.training import tutorial
    from lora_ref.training.data import pretraining_corpus, sample_batch

    r = tutorial.recipe(quick=False)
    cfg = tutorial.tutorial_config()
    x, y = sample_batch(pretraining_corpus().train, r["batch"], r["seq"], np.random.default_rng(1))  # (B, T) each
    return r, cfg, x, y


def _model(kind: str, cfg):
    """The tutorial model (seeded init) for ``kind`` in full / lora / qlora, and its AdamW."""
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.qlora import inject_qlora, quantize_model
    from lora_ref.modeling.llama import Llama
    from lora_ref.training.loop import decay_groups
    from lora_ref.training.optim import AdamW

    model = Llama(cfg, rng=np.random.default_rng(0))
    if kind == "lora":
        inject_lora(model, LoraConfig(**LORA_SETTINGS), rng=np.random.default_rng(2))
    elif kind == "qlora":
        inject_qlora(quantize_model(model, **QUANT_SETTINGS), LoraConfig(**LORA_SETTINGS), rng=np.random.default_rng(2))
    lr = 3e-3 if kind == "full" else 1e-3
    return model, AdamW(decay_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))


def _reps(quick: bool) -> dict:
    """Rounds of :func:`lora_ref.bench.timing.time_pair` (each times both sides twice, in both orders)."""
    return {"repeats": 2, "warmup": 1} if quick else {"repeats": 5, "warmup": 2}


def train_step_row(quick: bool = False) -> dict:
    """``train_step`` vs ``torch`` (see the module docstring)."""
    import torch

    from lora_ref.kernels import switch as fast
    from lora_ref.reference.torch_model import TorchLlama, torch_train_step
    from lora_ref.training.loop import decay_groups, train_step
    from lora_ref.training.optim import AdamW

    r, cfg, x, y = _setup()
    from lora_ref.modeling.llama import Llama

    model = Llama(cfg, rng=np.random.default_rng(0))
    tmodel = TorchLlama.from_state_dict(cfg, model.state_dict(), sdpa=True)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    kw = dict(lr=r["lr"], betas=tuple(r["betas"]))
    opt = AdamW(decay_groups(model, r["weight_decay"]), **kw)
    topt = torch.optim.AdamW([{"params": [p for p in tmodel.parameters() if p.ndim >= 2],
                               "weight_decay": r["weight_decay"]},
                              {"params": [p for p in tmodel.parameters() if p.ndim < 2], "weight_decay": 0.0}], **kw)
    clip = r["max_grad_norm"]
    losses = []
    for _ in range(2):  # same weights and batch: the losses agree, then again after one identical AdamW step
        losses.append((train_step(model, opt, x, y, max_grad_norm=clip),
                       torch_train_step(tmodel, topt, tx, ty, max_grad_norm=clip)))
    for i, (a, b) in enumerate(losses):
        if abs(a - b) > 1e-3 * abs(b):
            raise ValueError(f"train_step: step {i + 1} loss {a:.6f} differs from PyTorch's {b:.6f}: "
                             "the two sides would not do the same work")
    reps = _reps(quick)
    ours_s, base_s = time_pair(lambda: train_step(model, opt, x, y, max_grad_norm=clip),
                               lambda: torch_train_step(tmodel, topt, tx, ty, max_grad_norm=clip), **reps)
    tokens = x.size
    return row("train_step", ours_s, "torch", base_s,
               model=f"tutorial Llama: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, H={cfg.num_attention_heads}"
                     f", K={cfg.num_key_value_heads}, F={cfg.intermediate_size}, V={cfg.vocab_size}",
               parameters=model.num_parameters(), batch=int(x.shape[0]), seq=int(x.shape[1]),
               work="forward + cross-entropy + backward + clip_grad_norm(1.0) + AdamW, float32",
               torch=f"{torch.__version__}, eager, scaled_dot_product_attention",
               fast_paths=fast.enabled(), losses=[list(p) for p in losses],
               tokens_per_s_ours=tokens / ours_s, tokens_per_s_torch=tokens / base_s, **reps, **_threads())


def qlora_step_row(quick: bool = False) -> dict:
    """``qlora_step`` vs ``lora_step``: the adapter step on a 4-bit base against the same on a float32 base."""
    from lora_ref.training.loop import train_step

    r, cfg, x, y = _setup()
    lora, lora_opt = _model("lora", cfg)
    qlora, qlora_opt = _model("qlora", cfg)
    l0 = train_step(lora, lora_opt, x, y)
    q0 = train_step(qlora, qlora_opt, x, y)
    reps = _reps(quick)
    q_s, l_s = time_pair(lambda: train_step(qlora, qlora_opt, x, y), lambda: train_step(lora, lora_opt, x, y), **reps)
    return row("qlora_step", q_s, "lora_step", l_s, model="tutorial Llama", lora=dict(LORA_SETTINGS),
               quantization=dict(QUANT_SETTINGS), batch=int(x.shape[0]), seq=int(x.shape[1]),
               trainable_parameters=lora.num_parameters(trainable_only=True),
               first_step_loss={"qlora": q0, "lora": l0}, **reps, **_threads())


def _peak_bytes(kind: str, cfg, x, y) -> dict:
    """Peak traced bytes from building the ``kind`` model through two training steps, and what is resident."""
    from lora_ref.training.loop import train_step

    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.stop()
    tracemalloc.start()
    try:
        model, opt = _model(kind, cfg)
        built, _ = tracemalloc.get_traced_memory()
        for _ in range(2):
            train_step(model, opt, x, y)
        resident, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        if was_tracing:
            tracemalloc.start()
    weights = sum(p.data.nbytes for _, p in model.named_parameters())
    return {"peak": peak, "model_built": built, "after_steps": resident, "parameter_bytes": weights,
            "optimizer_state_bytes": opt.state_bytes(),
            "trainable_parameters": model.num_parameters(trainable_only=True)}


def memory_rows() -> list[dict]:
    """``memory_full``, ``memory_lora``, ``memory_qlora``: peak bytes of a training step, each against full."""
    r, cfg, x, y = _setup()
    m = {k: _peak_bytes(k, cfg, x, y) for k in ("full", "lora", "qlora")}
    full = m["full"]["peak"]
    return [row(f"memory_{k}", float(v["peak"]), "memory_full", float(full), unit="bytes",
                measured="tracemalloc peak from model build through two training steps (NumPy buffers)",
                batch=int(x.shape[0]), seq=int(x.shape[1]), **{f"{kk}": vv for kk, vv in v.items() if kk != "peak"})
            for k, v in m.items()]


def train_rows(quick: bool = False, *, include_train_step: bool = True) -> list[dict]:
    """Every training row: ``train_step`` (unless ``include_train_step`` is False), ``qlora_step``, memory."""
    rows = [train_step_row(quick)] if include_train_step else []
    rows.append(qlora_step_row(quick))
    rows.extend(memory_rows())
    return rows
