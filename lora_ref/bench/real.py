"""Benchmark rows on a real model (SmolLM2-135M-Instruct): LoRA and QLoRA training steps, prefill, and contention.

Rows (:func:`lora_ref.bench.timing.row`; ``ratio = ours / baseline``, lower is better):

- ``real_lora_step`` vs ``torch_peft``: one LoRA training step (r 16, α 32, every linear layer of the blocks, as
  PEFT's ``target_modules="all-linear"``) on a batch of 4 × 256 tokens: forward, cross-entropy, backward,
  ``clip_grad_norm`` (1.0) and AdamW over the adapter parameters. The baseline is transformers'
  ``LlamaForCausalLM`` (``sdpa`` attention) loaded from the same folder, wrapped by PEFT's ``get_peft_model`` with
  the same settings, with our initial adapter weights copied into it, on the same batch, with ``torch.optim.AdamW``
  of the same settings. Two steps run on each side before timing and their losses must agree: both sides compute
  the same thing (and the second loss shows that both updates moved the adapters alike).
- ``real_qlora_step`` vs ``real_lora_step``: the same step on the NF4 base (blocksize 64, double quantization,
  ``lm_head`` and embeddings float, as ``lora-ref quantize`` writes it) against the step on the float32 base.
- ``real_prefill`` vs ``torch``: one 1 × 512 forward without gradients (logits of every position) against
  transformers' ``LlamaForCausalLM`` under ``torch.no_grad``, with ``attn_implementation="eager"`` and
  ``"sdpa"``; the faster of the two is the baseline (both times are in ``params``). The logits are compared
  before timing.
- ``contention`` vs ``quiet``: the tutorial model's training step (:func:`lora_ref.bench.training.train_step_row`'s
  work) with the thread count a compute command picks by default (:func:`lora_ref.threads.default_threads`,
  probed each time), while one single-threaded ``while True: pass`` process runs beside it, against the same step
  without it. The busy process is started once and paused (``SIGSTOP``) / resumed (``SIGCONT``), so the two phases
  alternate in one run like every other row.

The batch is the start of the pretraining corpus (CPython's help text) tokenized with SmolLM2's tokenizer. The
model comes from the artifact cache (:func:`lora_ref.files.models.resolve_model`, fetched on first use). The torch
side needs the ``interop`` extra (torch, transformers, peft): without it, :func:`real_rows` raises
``ImportError`` and ``lora-ref bench`` prints a note instead of the rows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np

from lora_ref.bench.timing import row, time_pair, time_rotating

__all__ = ["MODEL", "LORA", "real_rows", "real_lora_rows", "real_prefill_row", "contention_row", "batch_tokens",
           "peft_model", "require_torch"]

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "lora_alpha": 32.0, "target_modules": "all-linear"}
QUANT = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}
OPTIM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
BATCH, SEQ, PREFILL = 4, 256, 512


def require_torch() -> None:
    """Raise ``ImportError`` naming what is missing when the torch side (the ``interop`` extra) is not installed."""
    missing = []
    for name in ("torch", "transformers", "peft"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed (pip install 'lora_ref[interop]')")


def _reps(quick: bool, timing: dict | None = None) -> dict:
    """Rounds of :func:`lora_ref.bench.timing.time_pair` (each times both sides twice, in both orders); the steps
    that compare the two sides before timing have already run each side (warm-up). ``timing`` overrides (tests)."""
    if timing is not None:
        return dict(timing)
    return {"repeats": 1, "warmup": 0} if quick else {"repeats": 3, "warmup": 1}


def _folder(model_dir=None):
    from lora_ref.files.models import resolve_model

    return resolve_model(model_dir if model_dir is not None else MODEL)


def batch_tokens(folder, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets (batch, seq) each: consecutive windows of the pretraining corpus's text
    tokenized with the model's tokenizer."""
    from lora_ref.modeling.tokenizer import load_tokenizer
    from lora_ref.training.data import pydoc_text

    need = batch * (seq + 1)
    text = pydoc_text()
    ids = load_tokenizer(folder).encode(text[: 8 * need])
    if ids.size < need:
        raise ValueError(f"the corpus gives only {ids.size} tokens, {need} needed")
    w = ids[:need].reshape(batch, seq + 1).astype(np.int64)
    return w[:, :-1].copy(), w[:, 1:].copy()


def _ours_lora(folder, quantized: bool):
    """Our model from ``folder`` with LoRA (``quantized``: on the NF4 base), and AdamW over the adapters."""
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.qlora import quantize_model
    from lora_ref.modeling.llama import Llama
    from lora_ref.training.optim import AdamW

    model = Llama.from_pretrained(folder)
    if quantized:
        quantize_model(model, **QUANT)
    inject_lora(model, LoraConfig(**LORA), rng=np.random.default_rng(2))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], **OPTIM)
    return model, opt


def peft_model(folder, ours, *, attn: str = "sdpa"):
    """transformers' model of ``folder`` under PEFT's LoRA (the settings of :data:`LORA`), with the adapter weights of
    our LoRA model ``ours`` copied in; returns the PEFT model and its AdamW."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules=LORA["target_modules"],
                          lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg)
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            key = "base_model.model." + name
            if key not in theirs:
                raise ValueError(f"PEFT's model has no trainable parameter {key}")
            theirs[key].copy_(torch.from_numpy(np.ascontiguousarray(p.data)))
            copied += 1
    if copied != len(theirs):
        raise ValueError(f"PEFT trains {len(theirs)} tensors, ours {copied}: not the same adapters")
    opt = torch.optim.AdamW(list(theirs.values()), lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    return pm, opt


def _torch_step(model, opt, x, y, max_grad_norm: float = 1.0) -> float:
    """transformers + PEFT: the same step as :func:`lora_ref.training.loop.train_step`."""
    import torch
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_grad_norm)
    opt.step()
    return float(loss.detach())


def _threads() -> dict:
    from lora_ref.bench.training import _threads as threads

    return threads()


def real_lora_rows(quick: bool = False, model_dir=None, *, batch: int = BATCH, seq: int = SEQ,
                   timing: dict | None = None) -> list[dict]:
    """``real_lora_step`` vs ``torch_peft`` and ``real_qlora_step`` vs ``real_lora_step`` (module docstring).

    ``model_dir``: a model folder or known name (default :data:`MODEL`); ``batch``, ``seq`` and ``timing``
    (``{"repeats", "warmup"}``) change the work and the repeats, for tests; the bench uses the defaults."""
    require_torch()
    import torch

    from lora_ref.training.loop import train_step

    folder = _folder(model_dir)
    x, y = batch_tokens(folder, batch, seq)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    model, opt = _ours_lora(folder, quantized=False)
    pm, topt = peft_model(folder, model)
    losses = [(train_step(model, opt, x, y), _torch_step(pm, topt, tx, ty)) for _ in range(2)]
    for i, (a, b) in enumerate(losses):
        if abs(a - b) > 1e-3 * abs(b):
            raise ValueError(f"real_lora_step: step {i + 1} loss {a:.6f} differs from PEFT's {b:.6f}: "
                             "the two sides would not do the same work")
    reps = _reps(quick, timing)
    ours_s, base_s = time_pair(lambda: train_step(model, opt, x, y), lambda: _torch_step(pm, topt, tx, ty), **reps)
    import peft
    import transformers

    common = dict(model=MODEL, lora=dict(LORA), optimizer=f"AdamW {OPTIM}", batch=batch, seq=seq,
                  work="forward + cross-entropy + backward + clip_grad_norm(1.0) + AdamW over the adapters, float32",
                  trainable_parameters=model.num_parameters(trainable_only=True))
    lora = row("real_lora_step", ours_s, "torch_peft", base_s, **common, losses=[list(p) for p in losses],
               torch=f"torch {torch.__version__}, transformers {transformers.__version__} (sdpa), "
                     f"peft {peft.__version__}, eager", tokens_per_s_ours=x.size / ours_s,
               tokens_per_s_torch=x.size / base_s, **reps, **_threads())
    pm = topt = None  # free the torch model before building the 4-bit one
    qmodel, qopt = _ours_lora(folder, quantized=True)
    qlosses = [train_step(qmodel, qopt, x, y) for _ in range(2)]
    q_s, l_s = time_pair(lambda: train_step(qmodel, qopt, x, y), lambda: train_step(model, opt, x, y), **reps)
    qlora = row("real_qlora_step", q_s, "real_lora_step", l_s, **common, quantization=dict(QUANT),
                losses={"qlora": qlosses, "lora": [a for a, _ in losses]}, **reps, **_threads())
    return [lora, qlora]


def real_prefill_row(quick: bool = False, model_dir=None, *, seq: int = PREFILL, timing: dict | None = None) -> dict:
    """``real_prefill`` vs ``torch`` (module docstring); the keywords as in :func:`real_lora_rows`."""
    require_torch()
    import torch
    import transformers

    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import Llama

    folder = _folder(model_dir)
    x, _ = batch_tokens(folder, 1, seq)
    tx = torch.from_numpy(x)
    model = Llama.from_pretrained(folder)
    model.eval()
    theirs = {a: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation=a).eval()
              for a in ("eager", "sdpa")}

    def ours():
        with no_grad():
            return model(x).data

    def torch_fn(m):
        def f():
            with torch.no_grad():
                return m(input_ids=tx).logits
        return f

    ref = ours()
    diffs = {}
    for a, m in theirs.items():
        diffs[a] = float(np.abs(torch_fn(m)().numpy() - ref).max())
        if not diffs[a] < 1e-2:
            raise ValueError(f"real_prefill: logits differ from transformers ({a}) by {diffs[a]:.3g}: "
                             "the two sides would not do the same work")
    reps = _reps(quick, timing)
    times = time_rotating({"ours": ours, **{a: torch_fn(m) for a, m in theirs.items()}}, **reps)
    best = min(theirs, key=lambda a: times[a])
    return row("real_prefill", times["ours"], "torch", times[best], model=MODEL, batch=1, seq=seq,
               work="forward without gradients, logits of every position, float32",
               torch=f"torch {torch.__version__}, transformers {transformers.__version__}",
               baseline_attention=best, torch_s={a: times[a] for a in theirs}, max_abs_logit_diff=diffs,
               tokens_per_s_ours=seq / times["ours"], tokens_per_s_torch=seq / times[best], **reps, **_threads())


@contextlib.contextmanager
def busy_process():
    """One single-threaded ``while True: pass`` process beside this one, paused at first; yields a function
    ``set_busy(flag)`` that resumes (``SIGCONT``) or pauses (``SIGSTOP``) it. Killed on exit."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.kill(proc.pid, signal.SIGSTOP)

        def set_busy(flag: bool) -> None:
            os.kill(proc.pid, signal.SIGCONT if flag else signal.SIGSTOP)
            time.sleep(0.05)  # let the scheduler see the change

        yield set_busy
    finally:
        proc.kill()
        proc.wait()


def contention_row(quick: bool = False, *, timing: dict | None = None) -> dict:
    """``contention`` vs ``quiet`` (module docstring): the tutorial training step beside one busy loop ÷ quiet.
    Each round times a busy and a quiet step in both orders, as :func:`lora_ref.bench.timing.time_pair`."""
    from lora_ref.bench.training import _setup
    from lora_ref.modeling.llama import Llama
    from lora_ref.threads import default_threads, set_threads, thread_info
    from lora_ref.training.loop import decay_groups, train_step
    from lora_ref.training.optim import AdamW

    r, cfg, x, y = _setup()
    model = Llama(cfg, rng=np.random.default_rng(0))
    opt = AdamW(decay_groups(model, r["weight_decay"]), lr=r["lr"], betas=tuple(r["betas"]))
    before = thread_info()
    chosen = {"busy": [], "quiet": []}
    reps = _reps(quick, timing)
    try:
        with busy_process() as set_busy:
            def timed(busy: bool):
                set_busy(busy)
                n = min(default_threads(), _numba_pool())  # what a compute command would start with, now
                chosen["busy" if busy else "quiet"].append(n)
                set_threads(n)
                t0 = time.perf_counter()
                train_step(model, opt, x, y, max_grad_norm=r["max_grad_norm"])
                return time.perf_counter() - t0

            for _ in range(reps["warmup"]):
                timed(False)
                timed(True)
            t_busy, t_quiet = [], []
            for _ in range(reps["repeats"]):
                for busy in (True, False, False, True):
                    (t_busy if busy else t_quiet).append(timed(busy))
    finally:
        set_threads(before["numba_threads"])
        if before.get("blas_threads"):
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=before["blas_threads"], user_api="blas")
    import statistics

    return row("contention", statistics.median(t_busy), "quiet", statistics.median(t_quiet),
               model="tutorial Llama", batch=int(x.shape[0]), seq=int(x.shape[1]),
               work="the train_step row's step (ours only) with lora_ref.threads.default_threads() probed per step",
               busy="one single-threaded `while True: pass` process, paused and resumed between steps",
               threads_busy=chosen["busy"], threads_quiet=chosen["quiet"], **reps)


def _numba_pool() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


def real_rows(quick: bool = False, model_dir=None) -> list[dict]:
    """``real_lora_step``, ``real_qlora_step`` and ``real_prefill``."""
    return [*real_lora_rows(quick, model_dir), real_prefill_row(quick, model_dir)]
