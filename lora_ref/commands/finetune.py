"""``lora-ref finetune``: fine-tune a model with full training, LoRA or QLoRA, on the user's data or the tutorial's.

Two ways in. With ``--data FILE`` (and ``--model DIR``, or the tutorial model when ``--model`` is not given),
:func:`finetune_data` trains on the user's own ``.txt`` / ``.jsonl`` file, read by
:mod:`lora_ref.training.datasets` (loss masks for chat and prompt–completion records). Without ``--data``,
:func:`finetune` trains the pretrained tutorial model on the tutorial's fine-tuning corpus (the tour and the notebooks
call it). Both return the trained model, its :class:`~lora_ref.train.History` and a summary dict.
"""

from __future__ import annotations

HELP = "fine-tune a model (yours or the tutorial model) with full, LoRA or QLoRA training"

EXAMPLES = """\
examples:
  lora-ref finetune --model path/to/hf-folder --data chats.jsonl --method lora --targets q_proj,v_proj \\
                    --steps 200 --seq 512 --batch 4 --eval-data held_out.jsonl --out runs/my-lora
  lora-ref finetune --model path/to/hf-folder --data notes.txt --method qlora --targets all-linear --out runs/q
  lora-ref finetune --model path/to/hf-folder --data pairs.jsonl --method full --lr 2e-5 --out runs/full
  lora-ref finetune --method lora --r 8 --alpha 16 --targets q_proj,v_proj --out runs/lora   (tutorial model)
  lora-ref finetune --method lora --quick --steps 20 --json          # no --out: train and report only

--model is a Hugging Face model folder (config.json + model.safetensors or shards, with tokenizer.json for a real
model); without it, the pretrained tutorial model (lora_ref.tutorial; trained once and cached, --quick uses the
quick-recipe base). --data is the training file:
  .txt     plain text: tokenized once, cut into consecutive windows of --seq tokens (default 128), loss on every
           token (the same windows and loss as 'lora-ref eval');
  .jsonl   one JSON object per line, either {"messages": [{"role": "user", "content": ...}, ...]}: the model's
           chat template applied, loss on the assistant turns only (their content and end-of-turn token); or
           {"prompt": "...", "completion": "..."}: joined raw (no template; put the separating space or newline in
           the text), the end-of-sequence token appended, loss on the completion only (TRL's SFTTrainer
           conventions; a prompt and completion given as lists of messages use the chat template). A record longer
           than --seq tokens is refused, not truncated; without --seq, the longest record sets it.
Without --data, the tutorial model trains on the tutorial's fine-tuning corpus (Python source).

full trains every weight; lora freezes the base and trains adapters of rank --r with scaling --alpha/--r on
--targets (comma-separated module names, NAME=RANK for a rank of its own, or all-linear: every linear layer but the
output head, the same syntax as 'lora-ref count'); qlora does the same on a base whose linear layers (not the
embeddings or lm_head) are quantized in memory to NF4 with double quantization, blocksize 64. AdamW with a linear
warmup (5% of the steps, rounded down) and a cosine decay to lr/10, gradient clipping at 1.0; batches are drawn in
random order, each example once per epoch, seeded by --seed. --eval-data (a .txt or .jsonl file read the same way) is scored
before and after training: the mean next-token loss over its target tokens.

--out receives the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors; PeftModel loads it
on the same base) for lora and qlora, or a model folder (config.json + model.safetensors + the base's tokenizer and
generation files; transformers loads it) for full, plus trainer_state.json (the loss history). It must be missing
or empty, and it appears complete or not at all. With --json, stdout is one JSON document with the losses, the
trainable parameter count and the time. The progress bar (stderr) shows the loss of each step."""

METHODS = ("full", "lora", "qlora")
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}


#: peak learning rates for the user's data: 2e-4 for adapters (the QLoRA paper's rate for 7B–13B models), 2e-5 for
#: every weight (transformers' and TRL's SFTTrainer default)
DATA_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
DATA_BATCH = 4  # default --batch with --data (the tutorial corpus: 16)
DEFAULT_TARGETS = "q_proj,v_proj"


def add_arguments(p) -> None:
    from lora_ref.commands.targets import HELP as TARGETS_HELP
    from lora_ref.commands.targets import targets_arg

    p.add_argument("--method", required=True, choices=METHODS, help="full, lora or qlora")
    p.add_argument("--model", default=None, help="model folder (default: the tutorial model)")
    p.add_argument("--data", default=None, help="training data: .txt, or .jsonl chat / prompt-completion records")
    p.add_argument("--eval-data", default=None, help="data scored before and after training (.txt or .jsonl)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--targets", type=targets_arg, default=DEFAULT_TARGETS,
                   help=f"modules to adapt: {TARGETS_HELP} (default {DEFAULT_TARGETS})")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter input (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default with --data: 2e-4 lora/qlora, 2e-5 full; tutorial corpus: "
                        "3e-3 lora/qlora, 1e-3 full)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"sequences per batch (default {DATA_BATCH} with --data, 16 on the tutorial corpus)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (with --data: .txt windows, default 128; .jsonl: the longest record "
                        "allowed, default the longest there is; at most the model's context. Tutorial corpus: "
                        "default 128, its context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and batches (default 0)")
    p.add_argument("--quick", action="store_true", help="start from the quick-recipe tutorial base (cached in under "
                                                        "a minute)")
    p.add_argument("--out", default=None, help="folder for the adapter / model (missing or empty)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def model_folder(spec, *, quick: bool = False, progress: bool = True):
    """The folder that ``--model`` names: ``spec`` itself (a model folder), or the cached tutorial base when None.

    Every use of the model argument goes through here, so known model names resolve in this one place.
    """
    from lora_ref import tutorial
    from lora_ref.fsutil import require_dir

    if spec is None:
        return tutorial.pretrained_base_dir(quick, progress=progress) / "model"
    return require_dir(spec, "model folder")


def prepare_model(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"),
                  use_rslora: bool = False, dropout: float = 0.0, rng=None, quick: bool = False, base=None,
                  impl: str = "auto"):
    """The tutorial base set up for ``method``: all weights trainable (full), LoRA adapters on a frozen float base
    (lora), or on a frozen NF4 base (qlora; ``impl`` as :class:`lora_ref.qlora.Linear4bit`). ``base`` overrides the
    cached tutorial model (a Llama to modify). ``targets`` is a list of names (or ``["all-linear"]``) or a
    ``--targets`` string (:mod:`lora_ref.commands.targets`; ``NAME=RANK`` entries become ``rank_pattern``)."""
    import numpy as np

    from lora_ref import tutorial
    from lora_ref.lora import LoraConfig, inject_lora
    from lora_ref.qlora import inject_qlora, quantize_model

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    rng = np.random.default_rng(0) if rng is None else rng
    model = tutorial.pretrained_base(quick) if base is None else base
    if method == "full":
        return model.requires_grad_(True)
    rank_pattern = {}
    if isinstance(targets, str):  # the --targets syntax: "q_proj,v_proj=4" or "all-linear"
        from lora_ref.commands.targets import lora_config_targets

        tm, rank_pattern = lora_config_targets(targets)
    else:
        targets = list(targets)
        tm = targets[0] if len(targets) == 1 and targets[0].lower() == "all-linear" else targets
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, use_rslora=use_rslora, lora_dropout=dropout,
                        rank_pattern=rank_pattern)
    if method == "lora":
        return inject_lora(model, config, rng=rng)
    return inject_qlora(quantize_model(model, impl=impl), config, rng=rng)


def finetune(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"), use_rslora: bool = False,
             dropout: float = 0.0, steps: int = 100, lr: float | None = None, batch: int = 16, seq: int = 128,
             seed: int = 0, quick: bool = False, progress: bool = True, base=None, eval_batches: int = 8,
             eval_every: int | None = None):
    """Fine-tune the tutorial model on :func:`lora_ref.data.finetuning_corpus`; returns (model, history, summary).

    One seed drives everything: ``np.random.default_rng(seed).spawn(2)`` gives the adapter-init/dropout generator
    and the batch generator, so LoRA and QLoRA runs with the same seed see the same batches and the same initial A.
    Weight decay is 0.1 on matrices for full fine-tuning and 0 for adapters (PEFT / transformers' default).
    """
    import time

    import numpy as np

    from lora_ref.data import finetuning_corpus
    from lora_ref.train import train

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lr = DEFAULT_LR[method] if lr is None else lr
    init_rng, data_rng = np.random.default_rng(seed).spawn(2)
    model = prepare_model(method, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, dropout=dropout,
                          rng=init_rng, quick=quick, base=base)
    corpus = finetuning_corpus()
    t0 = time.perf_counter()
    hist = train(model, corpus, steps, lr, batch, seq, data_rng, weight_decay=0.1 if method == "full" else 0.0,
                 eval_batches=eval_batches, eval_every=eval_every, progress=progress, desc=f"finetune ({method})")
    summary = {
        "method": method,
        "r": None if method == "full" else r,
        "alpha": None if method == "full" else alpha,
        "targets": None if method == "full" else (targets if isinstance(targets, str) else list(targets)),
        "steps": steps, "lr": lr, "batch": batch, "seq": seq, "seed": seed,
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "train_loss_first": hist.train_loss[0], "train_loss_last": hist.train_loss[-1],
        "val_loss_before": hist.val_loss[0], "val_loss_after": hist.val_loss[-1],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, hist, summary


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "generation_config.json")


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy the tokenizer and generation files of model folder ``src`` into ``dst`` (those that exist); their names."""
    import shutil
    from pathlib import Path

    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
            copied.append(name)
    return copied


def train_examples(model, data, steps: int, lr: float, batch: int, rng, *, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float | None = 1.0,
                   eval_data=None, pad_id: int = 0, progress: bool = True, desc: str = "finetune"):
    """Train ``model`` for ``steps`` steps on a :class:`lora_ref.training.datasets.TokenDataset`; a History.

    Batches: :func:`~lora_ref.training.datasets.batch_indices` (epochs of ``rng`` permutations) →
    :func:`~lora_ref.training.datasets.collate` (right padding, ignored targets); each step is
    :func:`lora_ref.train.train_step` (masked mean cross-entropy, clipping, AdamW) under the same schedule as
    :func:`lora_ref.train.train`: linear warmup over 5% of the steps (rounded down, so none under 20 steps), cosine
    decay to lr/10. ``eval_data`` is
    scored with :func:`~lora_ref.training.datasets.mean_nll` before the first and after the last step
    (``History.val_loss``, at ``val_steps`` 0 and ``steps``).
    """
    import math
    import sys
    import time

    from tqdm.auto import tqdm

    from lora_ref.optim import AdamW, cosine_schedule
    from lora_ref.train import History, decay_groups, train_step
    from lora_ref.training.datasets import batch_indices, collate, mean_nll

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
    bar = tqdm(total=steps, desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_schedule(step, max_lr=1.0, total_steps=steps, warmup_steps=warmup,
                                                   min_lr=0.1)
            x, y = collate([data.examples[i] for i in next(sampler)], pad_id)  # (B, T) each
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, x, y, max_grad_norm=max_grad_norm)
            hist.seconds += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise ValueError(f"training diverged: loss {loss} at step {step + 1} "
                                 f"(lr {optimizer.param_groups[0]['lr']:.3g}); try a smaller --lr")
            hist.steps = step + 1
            hist.train_loss.append(loss)
            hist.lr.append(optimizer.param_groups[0]["lr"])
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
    from lora_ref.llama import LlamaConfig
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
                  quick: bool = False, progress: bool = True):
    """Fine-tune the model in folder ``model`` (None: the tutorial model) on data file ``data``.

    Returns ``(model, history, summary, folder)``: the trained model (full: every weight trained; lora / qlora: with
    adapter ``"default"``), its :class:`~lora_ref.train.History` (``val_loss``: the loss on ``eval_data`` before
    and after), a summary dict and the model folder it started from. The data are read by
    :func:`lora_ref.training.datasets.load_data` (``seq`` as there), the model by
    :meth:`lora_ref.llama.Llama.from_pretrained`; qlora quantizes its linear layers in memory
    (:func:`lora_ref.qlora.quantize_model`: NF4, double quantization, blocksize 64, ``lm_head`` kept). One seed drives
    everything: ``np.random.default_rng(seed).spawn(2)`` gives the adapter-init/dropout generator and the batch
    generator. Weight decay 0 and AdamW betas (0.9, 0.999): transformers' Trainer defaults.
    """
    import time

    import numpy as np

    from lora_ref.llama import Llama

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    lr = DATA_LR[method] if lr is None else lr
    folder = model_folder(model, quick=quick, progress=progress)
    tok, train_set, eval_set, _ = load_training_data(folder, data, eval_data, seq)
    init_rng, data_rng = np.random.default_rng(seed).spawn(2)
    net = prepare_model(method, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, dropout=dropout,
                        rng=init_rng, base=Llama.from_pretrained(folder))
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

    lora / qlora: the adapter as PEFT writes it (:func:`lora_ref.peft_io.save_adapter`); full: the model folder
    (:meth:`lora_ref.llama.Llama.save_pretrained`) plus the tokenizer and generation files of ``source_folder``.
    ``state`` goes to ``trainer_state.json``.
    """
    from lora_ref.fsutil import output_dir, write_json
    from lora_ref.peft_io import save_adapter

    with output_dir(out) as tmp:
        if method == "full":
            model.save_pretrained(tmp)
            if source_folder is not None:
                copy_tokenizer_files(source_folder, tmp)
        else:
            save_adapter(model, tmp)
        if state is not None:
            write_json(tmp / "trainer_state.json", state)
    return out


def run(args) -> int:
    import json
    import math
    import sys

    from lora_ref.errors import UsageError
    from lora_ref.fsutil import check_out_dir

    if args.r < 1:
        raise UsageError(f"--r must be >= 1, got {args.r}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        raise UsageError(f"--alpha must be a positive number, got {args.alpha}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {args.dropout}")
    user_data = args.data is not None
    if not user_data:
        if args.model is not None:
            raise UsageError("--model needs --data FILE (the training data for that model)")
        if args.eval_data is not None:
            raise UsageError("--eval-data needs --data FILE (without --data, the tutorial corpus has its own "
                             "validation split)")
        if args.seq is not None and not 1 <= args.seq <= 128:
            raise UsageError(f"--seq must lie in 1..128 (the tutorial model's context), got {args.seq}")
    else:
        if args.quick and args.model is not None:
            raise UsageError("--quick selects the quick tutorial base; it does not apply with --model")
        if args.seq is not None and args.seq < 2:
            raise UsageError(f"--seq must be >= 2 (a token and the next one), got {args.seq}")
    if args.out is not None:
        check_out_dir(args.out)  # refuse before training

    if user_data:
        folder = model_folder(args.model, quick=args.quick, progress=not args.json)
        if args.seq is not None:
            from lora_ref.llama import LlamaConfig

            context = LlamaConfig.from_json_file(folder / "config.json").max_position_embeddings
            if args.seq > context:
                raise UsageError(f"--seq {args.seq} is longer than the model's context ({context} tokens, "
                                 "max_position_embeddings)")
        model, hist, summary, folder = finetune_data(
            args.method, args.data, model=args.model, eval_data=args.eval_data, r=args.r, alpha=args.alpha,
            targets=args.targets, use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
            batch=DATA_BATCH if args.batch is None else args.batch, seq=args.seq, seed=args.seed,
            quick=args.quick)
    else:
        folder = None
        model, hist, summary = finetune(args.method, r=args.r, alpha=args.alpha, targets=args.targets,
                                        use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
                                        batch=16 if args.batch is None else args.batch,
                                        seq=128 if args.seq is None else args.seq, seed=args.seed, quick=args.quick)
    if args.out is not None:
        save_finetuned(model, args.method, args.out, source_folder=folder,
                       state={**hist.to_dict(), "summary": summary})
    summary["out"] = args.out
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif user_data:
        evals = (f"; eval loss {summary['eval_loss_before']:.4f} → {summary['eval_loss_after']:.4f} nats/token"
                 if summary["eval_loss_before"] is not None else "")
        sys.stdout.write(
            f"{args.method}: {summary['trainable_parameters']:,} trainable parameters, {args.steps} steps on "
            f"{summary['examples']:,} {summary['data_kind']} examples ({summary['seconds_per_step']:.2f} s/step); "
            f"training loss {summary['train_loss_first']:.4f} (first step) → {summary['train_loss_last']:.4f} "
            f"(last){evals}" + (f"; wrote {args.out}" if args.out else "") + "\n")
    else:
        sys.stdout.write(
            f"{args.method}: {summary['trainable_parameters']:,} trainable parameters, {args.steps} steps in "
            f"{summary['seconds']:.0f} s; validation loss {summary['val_loss_before']:.3f} → "
            f"{summary['val_loss_after']:.3f} nats/byte" + (f"; wrote {args.out}" if args.out else "") + "\n")
    return 0


# ================================================================================================================
# tour section (register in lora_ref.commands.tour.SECTIONS as "lora_ref.commands.finetune:section_comparison")
# ================================================================================================================
def section_comparison(ctx) -> None:
    """Full fine-tuning vs LoRA vs QLoRA from the tutorial base: the same batches, curves, parameters, time."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    from lora_ref import tutorial
    from lora_ref.llama import Llama

    base_dir = ctx.state.get("base_dir") or tutorial.pretrained_base_dir(ctx.quick, progress=ctx.progress) / "model"
    steps = 15 if ctx.quick else 60
    common = dict(steps=steps, batch=8, seq=128, seed=0, progress=ctx.progress, eval_every=max(1, steps // 5),
                  eval_batches=4)
    runs = {}
    for method in METHODS:
        ctx.log(f"fine-tuning: {method} ({steps} steps)")
        kw = {} if method == "full" else dict(r=8, alpha=16, targets=["all-linear"])
        _, hist, summ = finetune(method, base=Llama.from_pretrained(base_dir), **kw, **common)
        runs[method] = (hist, summ)

    n_all = runs["full"][1]["trainable_parameters"]
    for method, (hist, summ) in runs.items():
        ctx.check(summ["val_loss_after"] < summ["val_loss_before"],
                  f"{method}: the validation loss on Python source fell ({summ['val_loss_before']:.3f} → "
                  f"{summ['val_loss_after']:.3f})")
    ctx.check(runs["lora"][1]["trainable_parameters"] == runs["qlora"][1]["trainable_parameters"] < n_all / 10,
              "LoRA and QLoRA train the same adapters, under a tenth of the model's parameters")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, (hist, _) in runs.items():
        ax.plot(hist.val_steps, np.asarray(hist.val_loss) / math.log(2), "o-", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss on Python source (bits per byte)")
    ax.set_title("full fine-tuning, LoRA and QLoRA from the same base")
    ax.legend()
    rows = "\n".join(
        f"| {m} | {s['trainable_parameters']:,} | {100 * s['trainable_parameters'] / n_all:.2f}% | "
        f"{s['val_loss_before'] / math.log(2):.3f} | {s['val_loss_after'] / math.log(2):.3f} | {s['seconds']:.0f} |"
        for m, (_, s) in runs.items())
    ctx.text(f"""
The pretrained model fine-tuned on the source code of some standard-library modules, three ways, with the same
{steps} batches of 8 × 128 bytes: every weight (AdamW, lr {DEFAULT_LR['full']:g}), LoRA (rank 8, α = 16, all linear
layers, lr {DEFAULT_LR['lora']:g}) and QLoRA (the same adapters on a base whose linear layers are NF4 with double
quantization).

| method | trainable | share | val before (bits/byte) | val after | seconds |
|---|---:|---:|---:|---:|---:|
{rows}
""")
    ctx.figure(fig, "finetune_comparison", "Validation loss during fine-tuning: full, LoRA, QLoRA")
    ctx.summarize("fine-tuning (bits/byte after): " + ", ".join(
        f"{m} {s['val_loss_after'] / math.log(2):.3f}" for m, (_, s) in runs.items()))
