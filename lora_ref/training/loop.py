"""Training a causal language model: the loss, one optimizer step, validation, and the training loop.

The objective is next-token prediction: for inputs ``x`` (B, T) and targets ``y`` (B, T) with ``y[b, t] =
x[b, t + 1]`` in the text, the loss is the mean cross-entropy

    L = −1/(B·T) Σ_{b,t} log softmax(model(x)[b, t])[y[b, t]]        (nats per token; ÷ ln 2 for bits per byte)

:func:`train_step` is the unit every experiment shares (full fine-tuning, LoRA, QLoRA, the benchmarks): one
forward, one backward, gradient clipping and one optimizer step. It works on any model whose ``model(ids)`` returns
logits (B, T, V); what gets trained is what the optimizer was given (for LoRA: only the adapter parameters).

:func:`train` adds batches from a :class:`lora_ref.training.data.Corpus`, a cosine learning-rate schedule with warmup, a
progress bar on stderr, periodic validation loss and optional HF-format checkpoints, and returns a
:class:`History`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lora_ref.autograd import functional as F
from lora_ref.autograd.tensor import Tensor, no_grad
from lora_ref.files.outputs import check_out_dir, write_json
from lora_ref.files.progress import bar as progress_bar
from lora_ref.training.data import eval_batches, sample_batch
from lora_ref.training.optim import AdamW, clip_grad_norm, cosine_schedule


def lm_loss(model, x: np.ndarray, y: np.ndarray) -> Tensor:
    """Mean next-token cross-entropy (nats) of ``model(x)`` (B, T, V) against targets ``y`` (B, T): a scalar Tensor."""
    logits = model(x)  # (B, T, V)
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), np.asarray(y).reshape(B * T))


def train_step(model, optimizer, x: np.ndarray, y: np.ndarray, *, max_grad_norm: float | None = 1.0,
               loss_fn=lm_loss) -> float:
    """One step: forward, backward, clip the global gradient norm to ``max_grad_norm`` (None: no clipping), update.

    Parameters
    ----------
    model : a Module with ``model(ids)`` → logits Tensor (B, T, V).
    optimizer : :class:`lora_ref.training.optim.AdamW` (or anything with ``zero_grad``, ``step``, ``parameters``) holding
        the parameters to train; its learning rate is whatever the caller set.
    x, y : int arrays (B, T): inputs and next-token targets.
    loss_fn : ``loss_fn(model, x, y)`` → scalar Tensor; :func:`lm_loss` by default (the chapter-12 experiment passes
        its answer-only loss, :func:`lora_ref.analysis.real_llm.answer_loss`).

    Returns the loss (nats per token) before the update, as a Python float.
    """
    optimizer.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    if max_grad_norm is not None:
        clip_grad_norm(optimizer.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.data)


def recorded_step(hist: "History", step: int, model, optimizer, x: np.ndarray, y: np.ndarray, *,
                  max_grad_norm: float | None, hint: str = "") -> float:
    """Step ``step`` (0-based) of a training loop: :func:`train_step`, its time added to ``hist.seconds``, its loss
    and learning rate appended to ``hist``. A loss that is not finite raises ``ValueError`` (``hint`` appended to the
    message) before anything is recorded. Returns the loss."""
    t0 = time.perf_counter()
    loss = train_step(model, optimizer, x, y, max_grad_norm=max_grad_norm)
    hist.seconds += time.perf_counter() - t0
    if not math.isfinite(loss):
        raise ValueError(f"training diverged: loss {loss} at step {step + 1} "
                         f"(lr {optimizer.param_groups[0]['lr']:.3g}){hint}")
    hist.steps = step + 1
    hist.train_loss.append(loss)
    hist.lr.append(optimizer.param_groups[0]["lr"])
    return loss


def evaluate(model, tokens: np.ndarray, batch: int, seq: int, max_batches: int | None = None) -> float:
    """Mean next-token loss (nats) over the deterministic windows of ``tokens`` (:func:`lora_ref.training.data.eval_batches`).

    Runs in eval mode without recording a graph; the model's training flag is restored.
    """
    was_training = getattr(model, "training", True)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for x, y in eval_batches(tokens, batch, seq, max_batches):
                total += float(lm_loss(model, x, y).data) * x.size
                count += x.size
    finally:
        model.train(was_training)
    return total / count


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (ndim >= 2), none on vectors (RMSNorm weights, biases).

    Frozen parameters (``requires_grad=False``) are left out, so they get no optimizer state.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class History:
    """What a training run did: per-step training loss and learning rate, validation loss at evaluation steps.

    Losses are nats per token (= per byte for the byte-level tokenizer); ``bits = nats / ln 2``.
    """

    steps: int = 0
    batch: int = 0
    seq: int = 0
    train_loss: list[float] = field(default_factory=list)  # one per step
    lr: list[float] = field(default_factory=list)  # one per step
    val_steps: list[int] = field(default_factory=list)  # steps completed when validated (0 = before training)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock time of the training steps (validation excluded)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = self.tokens
        d["tokens_per_second"] = self.tokens_per_second
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def train(model, data, steps: int, lr: float, batch: int, seq: int, rng: np.random.Generator, *,
          warmup: int | None = None, min_lr: float | None = None, weight_decay: float = 0.1,
          betas: tuple[float, float] = (0.9, 0.95), max_grad_norm: float | None = 1.0, optimizer=None,
          eval_every: int | None = None, eval_batches: int | None = 8, eval_batch: int | None = None,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
          progress: bool = True, desc: str = "train") -> History:
    """Train ``model`` for ``steps`` steps on random windows of ``data.train``; return the :class:`History`.

    Parameters
    ----------
    model : Module with ``model(ids)`` → logits (B, T, V).
    data : a :class:`lora_ref.training.data.Corpus` (anything with ``.train`` and ``.val`` token arrays).
    steps, lr, batch, seq : number of optimizer steps, peak learning rate, batch size B, sequence length T.
    rng : the generator that draws every batch (the run is deterministic given it and the model).
    warmup : linear warmup steps (default: 5% of ``steps``); then a cosine decay to ``min_lr`` (default lr/10).
    weight_decay, betas, max_grad_norm : AdamW and clipping settings. Decay applies to matrices only
        (:func:`decay_groups`).
    optimizer : an optimizer to use instead (its parameters are what gets trained; ``weight_decay`` and ``betas``
        are then ignored). Each of its parameter groups keeps its own learning rate as its peak, and the schedule
        scales every group by the same factor (so LoRA+'s ratio between ``lora_B`` and ``lora_A`` stays fixed);
        ``min_lr / lr`` sets the final factor.
    eval_every : validate every this many steps (default: 10 times per run), and always before the first and after
        the last step; ``eval_batches`` batches of ``eval_batch`` (default ``batch``) windows of ``data.val``.
    checkpoint_dir, checkpoint_every : if given, an HF checkpoint (``model.save_pretrained``) plus
        ``trainer_state.json`` is written to ``checkpoint_dir/checkpoint-<step>`` every ``checkpoint_every`` steps
        and after the last step. ``checkpoint_dir`` must be missing or empty.
    progress : show a tqdm bar on stderr (and log the run's progress for the book's builds:
        :mod:`lora_ref.files.progress`).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"train needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    if steps < 1 or batch < 1 or seq < 1:
        raise ValueError(f"steps, batch and seq must be >= 1, got steps={steps}, batch={batch}, seq={seq}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    warmup = max(1, steps // 20) if warmup is None else warmup
    min_lr = lr / 10 if min_lr is None else min_lr
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    eval_batch = batch if eval_batch is None else eval_batch
    if optimizer is None:
        optimizer = AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, weight_decay=weight_decay)
    peaks = [g["lr"] for g in optimizer.param_groups]  # each group's peak learning rate
    ckpt_root = None
    if checkpoint_dir is not None:
        ckpt_root = check_out_dir(checkpoint_dir)
        ckpt_root.mkdir(exist_ok=True)
        checkpoint_every = checkpoint_every or steps

    hist = History(batch=batch, seq=seq)

    def validate(step: int) -> float:
        v = evaluate(model, data.val, eval_batch, seq, eval_batches)
        hist.val_steps.append(step)
        hist.val_loss.append(v)
        return v

    model.train()
    val = validate(0)
    bar = progress_bar(steps, desc, progress)
    try:
        for step in range(steps):
            factor = cosine_schedule(step, max_lr=1.0, total_steps=steps, warmup_steps=warmup, min_lr=min_lr / lr)
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * factor
            x, y = sample_batch(data.train, batch, seq, rng)  # (B, T) each
            loss = recorded_step(hist, step, model, optimizer, x, y, max_grad_norm=max_grad_norm)
            done = step + 1
            if done % eval_every == 0 or done == steps:
                val = validate(done)
            if ckpt_root is not None and (done % checkpoint_every == 0 or done == steps):
                folder = ckpt_root / f"checkpoint-{done}"
                model.save_pretrained(folder)
                write_json(folder / "trainer_state.json", hist.to_dict())
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return hist
