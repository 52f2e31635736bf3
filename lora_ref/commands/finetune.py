"""``lora-ref finetune``: fine-tune the tutorial model on Python source with full training, LoRA or QLoRA.

:func:`finetune` is the library function behind the command (the tour and the notebooks call it); it returns the
trained model, its :class:`~lora_ref.train.History` and a summary dict.
"""

from __future__ import annotations

HELP = "fine-tune the tutorial model with full, LoRA or QLoRA training"

EXAMPLES = """\
examples:
  lora-ref finetune --method lora --r 8 --alpha 16 --targets q_proj v_proj --out runs/lora
  lora-ref finetune --method qlora --r 8 --alpha 16 --targets all-linear --steps 200 --out runs/qlora
  lora-ref finetune --method full --steps 100 --out runs/full --json
  lora-ref finetune --method lora --quick --steps 20 --json          # no --out: train and report only

Starts from the pretrained tutorial model (lora_ref.tutorial; trained once and cached, --quick uses the
quick-recipe base) and trains on the fine-tuning corpus (the source of some standard-library modules, a different
domain than the pretraining prose) with AdamW, a cosine schedule and gradient clipping. full trains every weight;
lora freezes the base and trains adapters of rank --r with scaling --alpha/--r on --targets (module names or
'all-linear'); qlora does the same on a base whose linear layers (not the embeddings or lm_head) are quantized to
NF4 with double quantization, blocksize 64. --out receives the adapter in PEFT's format (adapter_config.json +
adapter_model.safetensors) for lora and qlora, or an HF checkpoint (config.json + model.safetensors) for full,
plus trainer_state.json (the loss history); it must be missing or empty. With --json, stdout is one JSON document
with the losses before and after, the trainable parameter count and the time."""

METHODS = ("full", "lora", "qlora")
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}


def add_arguments(p) -> None:
    p.add_argument("--method", required=True, choices=METHODS, help="full, lora or qlora")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                   help="modules to adapt: names (q_proj v_proj ...) or all-linear (default q_proj v_proj)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter input (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 full, 3e-3 lora/qlora)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--seq", type=int, default=128, help="bytes per sequence (default 128, the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and batches (default 0)")
    p.add_argument("--quick", action="store_true", help="start from the quick-recipe base (cached in under a minute)")
    p.add_argument("--out", default=None, help="folder for the adapter / checkpoint (missing or empty)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def prepare_model(method: str, *, r: int = 8, alpha: float = 16.0, targets=("q_proj", "v_proj"),
                  use_rslora: bool = False, dropout: float = 0.0, rng=None, quick: bool = False, base=None,
                  impl: str = "auto"):
    """The tutorial base set up for ``method``: all weights trainable (full), LoRA adapters on a frozen float base
    (lora), or on a frozen NF4 base (qlora; ``impl`` as :class:`lora_ref.qlora.Linear4bit`). ``base`` overrides the
    cached tutorial model (a Llama to modify). A ``base`` that is already 4-bit (``Llama.from_pretrained`` of a
    bitsandbytes NF4/FP4 folder) is used directly by ``qlora`` — its codes are the file's, not quantized again —
    and refused by ``full`` and ``lora``."""
    import numpy as np

    from lora_ref import tutorial
    from lora_ref.lora import LoraConfig, inject_lora
    from lora_ref.qlora import inject_qlora, quantize_model

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    rng = np.random.default_rng(0) if rng is None else rng
    model = tutorial.pretrained_base(quick) if base is None else base
    from lora_ref.qlora import Linear4bit

    already_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    if already_4bit and method != "qlora":
        raise ValueError(f"the base model is already quantized to 4 bits (a bitsandbytes checkpoint); --method "
                         f"{method} needs a floating-point base, use --method qlora")
    if method == "full":
        return model.requires_grad_(True)
    targets = list(targets)
    tm = targets[0] if len(targets) == 1 and targets[0].lower() == "all-linear" else targets
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, use_rslora=use_rslora, lora_dropout=dropout)
    if method == "lora":
        return inject_lora(model, config, rng=rng)
    # a 4-bit checkpoint (Llama.from_pretrained of a bitsandbytes folder) is used as it is, never re-quantized
    return inject_qlora(model if already_4bit else quantize_model(model, impl=impl), config, rng=rng)


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
        "targets": None if method == "full" else list(targets),
        "steps": steps, "lr": lr, "batch": batch, "seq": seq, "seed": seed,
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "train_loss_first": hist.train_loss[0], "train_loss_last": hist.train_loss[-1],
        "val_loss_before": hist.val_loss[0], "val_loss_after": hist.val_loss[-1],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return model, hist, summary


def run(args) -> int:
    import json
    import math
    import sys

    from lora_ref.errors import UsageError
    from lora_ref.fsutil import check_out_dir, write_json

    if args.r < 1:
        raise UsageError(f"--r must be >= 1, got {args.r}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        raise UsageError(f"--alpha must be a positive number, got {args.alpha}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.batch < 1 or not 1 <= args.seq <= 128:
        raise UsageError(f"--batch must be >= 1 and --seq in 1..128 (the model's context), got {args.batch}, {args.seq}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.out is not None:
        check_out_dir(args.out)  # refuse before training

    model, hist, summary = finetune(args.method, r=args.r, alpha=args.alpha, targets=args.targets,
                                    use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
                                    batch=args.batch, seq=args.seq, seed=args.seed, quick=args.quick)
    if args.out is not None:
        if args.method == "full":
            model.save_pretrained(args.out)
        else:
            from lora_ref.peft_io import save_adapter

            save_adapter(model, args.out)
        write_json(f"{args.out}/trainer_state.json", {**hist.to_dict(), "summary": summary})
    summary["out"] = args.out
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
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
