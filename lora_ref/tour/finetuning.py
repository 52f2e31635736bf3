"""Tour section: fine-tuning on Python source with full training, LoRA and QLoRA from the same base."""

from __future__ import annotations

from lora_ref.training.finetune import DEFAULT_LR, METHODS, finetune


def section_comparison(ctx) -> None:
    """Full fine-tuning vs LoRA vs QLoRA from the tutorial base: the same batches, curves, parameters, time."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    from lora_ref.modeling.llama import Llama
    from lora_ref.training import tutorial

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
