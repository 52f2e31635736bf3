"""Fine-tuning: the model set up for full training, LoRA or QLoRA, trained on the tutorial corpus or on the user's
own data (``lora-ref finetune``).

:func:`finetune` trains the pretrained tutorial model on the tutorial's fine-tuning corpus (the tour and the notebooks
call it); :func:`finetune_data` trains any model folder on a ``.txt`` / ``.jsonl`` file read by
:mod:`lora_ref.training.datasets` (loss masks for chat and prompt-completion records). Both return the trained model,
its :class:`~lora_ref.training.loop.History` and a summary dict; :func:`save_finetuned` writes the result.
"""

from __future__ import annotations

METHODS = ("full", "lora", "qlora")
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}


#: peak learning rates for the user's data: 2e-4 for adapters (the QLoRA paper's rate for 7B–13B models), 2e-5 for
#: every weight (transformers' and TRL's SFTTrainer default)
DATA_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
DATA_BATCH = 4  # default --batch with --data (the tutorial corpus: 16)
DEFAULT_TARGETS = "q_proj,v_proj"


def model_folder(spec, *, quick: bool = False, progress: bool = True):
    """The folder that ``--model`` names: a model folder, a known model's name (fetched and cached on first use:
    ``lora-ref models``), or the cached tutorial base when None."""
    if spec is None:
        from lora_ref.training import tutorial

        return tutorial.pretrained_base_dir(quick, progress=progress) / "model"
    from lora_ref.files.models import resolve_model

    return resolve_model(spec)


def prepare_model(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"),
                  use_rslora: bool = False, dropout: float = 0.0, rng=None, quick: bool = False, base=None,
                  impl: str = "auto", modules_to_save=None):
    """The tutorial base set up for ``method``: all weights trainable (full), LoRA adapters on a frozen float base
    (lora), or on a frozen NF4 base (qlora; ``impl`` as :class:`lora_ref.modeling.linear4bit.Linear4bit`). ``base`` overrides the
    cached tutorial model (a Llama to modify). ``targets`` is a list of names (or ``["all-linear"]``) or a
    ``--targets`` string (:mod:`lora_ref.adapters.targets`; ``NAME=RANK`` entries become ``rank_pattern``).
    A ``base`` that is already 4-bit (``Llama.from_pretrained`` of a bitsandbytes NF4/FP4 folder) is used directly
    by ``qlora`` (its codes are the file's, not quantized again) and refused by ``full`` and ``lora``. ``modules_to_save`` (lora, qlora): module names trained in full next
    to the adapter (PEFT's ``modules_to_save``, e.g. ``["embed_tokens", "lm_head"]``)."""
    import numpy as np

    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.qlora import Linear4bit, inject_qlora, quantize_model
    from lora_ref.training import tutorial

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    rng = np.random.default_rng(0) if rng is None else rng
    model = tutorial.pretrained_base(quick) if base is None else base
    already_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    if already_4bit and method != "qlora":
        raise ValueError(f"the base model is already quantized to 4 bits (a bitsandbytes checkpoint); --method "
                         f"{method} needs a floating-point base, use --method qlora")
    if method == "full":
        return model.requires_grad_(True)
    rank_pattern = {}
    if isinstance(targets, str):  # the --targets syntax: "q_proj,v_proj=4" or "all-linear"
        from lora_ref.adapters.targets import lora_config_targets

        tm, rank_pattern = lora_config_targets(targets)
    else:
        targets = list(targets)
        tm = targets[0] if len(targets) == 1 and targets[0].lower() == "all-linear" else targets
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, use_rslora=use_rslora, lora_dropout=dropout,
                        rank_pattern=rank_pattern, modules_to_save=list(modules_to_save) if modules_to_save else None)
    if method == "lora":
        return inject_lora(model, config, rng=rng)
    # a 4-bit checkpoint (Llama.from_pretrained of a bitsandbytes folder) is used as it is, never re-quantized
    return inject_qlora(model if already_4bit else quantize_model(model, impl=impl), config, rng=rng)


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
        "targets": None if method == "full" else (targets if isinstance(targets, str) else list(targets)),
        "modules_to_save": None if method == "full" or not modules_to_save else list(modules_to_save),
        "steps": steps, "lr": lr, "batch": batch, "seq": seq, "seed": seed,
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "train_loss_first": hist.train_loss[0], "train_loss_last": hist.train_loss[-1],
        "val_loss_before": hist.val_loss[0], "val_loss_after": hist.val_loss[-1],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, hist, summary


def train_examples(model, data, steps: int, lr: float, batch: int, rng, *, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float | None = 1.0,
                   eval_data=None, pad_id: int = 0, progress: bool = True, desc: str = "finetune"):
    """Train ``model`` for ``steps`` steps on a :class:`lora_ref.training.datasets.TokenDataset`; a History.

    Batches: :func:`~lora_ref.training.datasets.batch_indices` (epochs of ``rng`` permutations) →
    :func:`~lora_ref.training.datasets.collate` (right padding, ignored targets); each step is
    :func:`lora_ref.training.loop.train_step` (masked mean cross-entropy, clipping, AdamW) under the same schedule as
    :func:`lora_ref.training.loop.train`: linear warmup over 5% of the steps (rounded down, so none under 20 steps), cosine
    decay to lr/10. ``eval_data`` is
    scored with :func:`~lora_ref.training.datasets.mean_nll` before the first and after the last step
    (``History.val_loss``, at ``val_steps`` 0 and ``steps``).
    """
    from lora_ref.files.progress import bar as progress_bar
    from lora_ref.training.datasets import batch_indices, collate, mean_nll
    from lora_ref.training.loop import History, decay_groups, recorded_step
    from lora_ref.training.optim import AdamW, cosine_schedule

    if steps < 1 or batch < 1 or not lr > 0:
        raise ValueError(f"steps and batch must be >= 1 and lr > 0, got steps={steps}, batch={batch}, lr={lr}")
    optimizer = AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, weight_decay=weight_decay)
    warmup = steps // 20  # 5%, rounded down: a short run starts at the full rate (no step at lr 0)
    hist = History(batch=batch, seq=data.seq)
    if eval_data is not None:
        hist.val_steps.append(0)
        hist.val_loss.append(mean_nll(model, eval_data, batch, pad_id))
    sampler = batch_indices(len(data), batch, rng)
    model.train()
    bar = progress_bar(steps, desc, progress)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_schedule(step, max_lr=1.0, total_steps=steps, warmup_steps=warmup,
                                                   min_lr=0.1)
            x, y = collate([data.examples[i] for i in next(sampler)], pad_id)  # (B, T) each
            loss = recorded_step(hist, step, model, optimizer, x, y, max_grad_norm=max_grad_norm,
                                 hint="; try a smaller --lr")
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    if eval_data is not None:
        hist.val_steps.append(steps)
        hist.val_loss.append(mean_nll(model, eval_data, batch, pad_id))
    return hist


def load_training_data(folder, data, eval_data=None, seq: int | None = None):
    """(tokenizer, training set, eval set or None, model context) for model folder ``folder``; nothing heavy loaded.

    Reads the folder's config (for the context) and tokenizer and the data files, so bad data is refused before
    the weights are read.
    """
    from lora_ref.modeling.llama import LlamaConfig
    from lora_ref.modeling.tokenizer import load_tokenizer
    from lora_ref.training.datasets import load_data

    config = LlamaConfig.from_json_file(folder / "config.json")
    context = config.max_position_embeddings
    tok = load_tokenizer(folder)
    train_set = load_data(data, tok, seq=seq, context=context)
    eval_set = None if eval_data is None else load_data(eval_data, tok, seq=seq, context=context)
    for ds in (train_set, eval_set):
        top = -1 if ds is None else max(int(e.ids.max()) for e in ds.examples)
        if top >= config.vocab_size:
            raise ValueError(f"{ds.path}: the tokenizer of {folder} gives token id {top}, but the model's vocabulary "
                             f"has {config.vocab_size} ids (config.json vocab_size); tokenizer and model do not match")
    return tok, train_set, eval_set, context


def finetune_data(method: str, data, *, model=None, eval_data=None, r: int = 8, alpha: float = 16.0,
                  targets="q_proj,v_proj", use_rslora: bool = False, dropout: float = 0.0, steps: int = 100,
                  lr: float | None = None, batch: int = DATA_BATCH, seq: int | None = None, seed: int = 0,
                  quick: bool = False, progress: bool = True, modules_to_save=None):
    """Fine-tune the model in folder ``model`` (None: the tutorial model) on data file ``data``.

    Returns ``(model, history, summary, folder)``: the trained model (full: every weight trained; lora / qlora: with
    adapter ``"default"``), its :class:`~lora_ref.training.loop.History` (``val_loss``: the loss on ``eval_data`` before
    and after), a summary dict and the model folder it started from. The data are read by
    :func:`lora_ref.training.datasets.load_data` (``seq`` as there), the model by
    :meth:`lora_ref.modeling.llama.Llama.from_pretrained`; qlora quantizes its linear layers in memory
    (:func:`lora_ref.adapters.qlora.quantize_model`: NF4, double quantization, blocksize 64, ``lm_head`` kept). One seed drives
    everything: ``np.random.default_rng(seed).spawn(2)`` gives the adapter-init/dropout generator and the batch
    generator. Weight decay 0 and AdamW betas (0.9, 0.999): transformers' Trainer defaults.
    """
    import time

    import numpy as np

    from lora_ref.modeling.llama import Llama

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    lr = DATA_LR[method] if lr is None else lr
    folder = model_folder(model, quick=quick, progress=progress)
    tok, train_set, eval_set, _ = load_training_data(folder, data, eval_data, seq)
    init_rng, data_rng = np.random.default_rng(seed).spawn(2)
    net = prepare_model(method, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, dropout=dropout,
                        rng=init_rng, base=Llama.from_pretrained(folder), modules_to_save=modules_to_save)
    if method != "full" and model is not None:
        net.peft_config["default"].base_model_name_or_path = str(model)  # as PEFT records the base it was given
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    hist = train_examples(net, train_set, steps, lr, batch, data_rng, eval_data=eval_set, pad_id=pad_id,
                          progress=progress, desc=f"finetune ({method})")
    summary = {
        "method": method, "model": str(folder) if model is not None else None,
        "data": str(data), "data_kind": train_set.kind, "examples": len(train_set),
        "target_tokens": train_set.n_targets, "eval_data": None if eval_data is None else str(eval_data),
        "r": None if method == "full" else r,
        "alpha": None if method == "full" else alpha,
        "targets": None if method == "full" else targets,
        "steps": steps, "lr": lr, "batch": batch, "seq": train_set.seq, "seed": seed,
        "trainable_parameters": net.num_parameters(trainable_only=True),
        "train_loss_first": hist.train_loss[0], "train_loss_last": hist.train_loss[-1],
        "eval_loss_before": hist.val_loss[0] if hist.val_loss else None,
        "eval_loss_after": hist.val_loss[-1] if hist.val_loss else None,
        "seconds_per_step": round(hist.seconds / steps, 4),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return net, hist, summary, folder


def save_finetuned(model, method: str, out, *, source_folder=None, state: dict | None = None):
    """Write the result of a run into ``out`` (missing or empty; complete or not at all).

    lora / qlora: the adapter as PEFT writes it (:func:`lora_ref.adapters.peft_files.save_adapter`); full: the model folder
    (:meth:`lora_ref.modeling.llama.Llama.save_pretrained`) plus the tokenizer and generation files of ``source_folder``.
    ``state`` goes to ``trainer_state.json``.
    """
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.files.outputs import output_dir, write_json
    from lora_ref.modeling.llama import copy_model_side_files

    with output_dir(out) as tmp:
        if method == "full":
            model.save_pretrained(tmp)
            if source_folder is not None:
                copy_model_side_files(source_folder, tmp)
        else:
            save_adapter(model, tmp)
        if state is not None:
            write_json(tmp / "trainer_state.json", state)
    return out
