"""Fine-tuning the tutorial model on Python source: full training, LoRA or QLoRA (``lora-ref finetune``).

:func:`finetune` returns the trained model, its :class:`~lora_ref.training.loop.History` and a summary dict; the tour,
the notebooks and the command call it.
"""

from __future__ import annotations

METHODS = ("full", "lora", "qlora")
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}



def prepare_model(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"),
                  use_rslora: bool = False, dropout: float = 0.0, rng=None, quick: bool = False, base=None,
                  impl: str = "auto", modules_to_save=None):
    """The tutorial base set up for ``method``: all weights trainable (full), LoRA adapters on a frozen float base
    (lora), or on a frozen NF4 base (qlora; ``impl`` as :class:`lora_ref.adapters.qlora.Linear4bit`). ``base`` overrides the
    cached tutorial model (a Llama to modify). ``modules_to_save`` (lora, qlora): module names trained in full next
    to the adapter (PEFT's ``modules_to_save``, e.g. ``["embed_tokens", "lm_head"]``)."""
    import numpy as np

    from lora_ref.training import tutorial
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.qlora import inject_qlora, quantize_model

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    rng = np.random.default_rng(0) if rng is None else rng
    model = tutorial.pretrained_base(quick) if base is None else base
    if method == "full":
        return model.requires_grad_(True)
    targets = list(targets)
    tm = targets[0] if len(targets) == 1 and targets[0].lower() == "all-linear" else targets
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, use_rslora=use_rslora, lora_dropout=dropout,
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    if method == "lora":
        return inject_lora(model, config, rng=rng)
    return inject_qlora(quantize_model(model, impl=impl), config, rng=rng)


def finetune(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"), use_rslora: bool = False,
             dropout: float = 0.0, steps: int = 100, lr: float | None = None, batch: int = 16, seq: int = 128,
             seed: int = 0, quick: bool = False, progress: bool = True, base=None, eval_batches: int = 8,
             eval_every: int | None = None, modules_to_save=None):
    """Fine-tune the tutorial model on :func:`lora_ref.training.data.finetuning_corpus`; returns (model, history, summary).

    One seed drives everything: ``np.random.default_rng(seed).spawn(2)`` gives the adapter-init/dropout generator
    and the batch generator, so LoRA and QLoRA runs with the same seed see the same batches and the same initial A.
    Weight decay is 0.1 on matrices for full fine-tuning and 0 for adapters (PEFT / transformers' default).
    """
    import time

    import numpy as np

    from lora_ref.training.data import finetuning_corpus
    from lora_ref.training.loop import train

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lr = DEFAULT_LR[method] if lr is None else lr
    init_rng, data_rng = np.random.default_rng(seed).spawn(2)
    model = prepare_model(method, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, dropout=dropout,
                          rng=init_rng, quick=quick, base=base, modules_to_save=modules_to_save)
    corpus = finetuning_corpus()
    t0 = time.perf_counter()
    hist = train(model, corpus, steps, lr, batch, seq, data_rng, weight_decay=0.1 if method == "full" else 0.0,
                 eval_batches=eval_batches, eval_every=eval_every, progress=progress, desc=f"finetune ({method})")
    summary = {
        "method": method,
        "r": None if method == "full" else r,
        "alpha": None if method == "full" else alpha,
        "targets": None if method == "full" else list(targets),
        "modules_to_save": None if method == "full" or not modules_to_save else list(modules_to_save),
        "steps": steps, "lr": lr, "batch": batch, "seq": seq, "seed": seed,
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "train_loss_first": hist.train_loss[0], "train_loss_last": hist.train_loss[-1],
        "val_loss_before": hist.val_loss[0], "val_loss_after": hist.val_loss[-1],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, hist, summary
