"""Tour section: merging adapters into float and 4-bit bases."""

from __future__ import annotations

import copy

import numpy as np

from lora_ref.tour.context import lora_settings, tutorial_base


def _logits(model, ids) -> np.ndarray:
    from lora_ref.autograd.tensor import no_grad

    with no_grad():
        return np.asarray(model(ids), dtype=np.float64)


def section_merging(ctx) -> None:
    """Merge equivalence in float32, and the error of the three ways to merge into a 4-bit base."""
    import matplotlib.pyplot as plt

    from lora_ref.adapters.lora import disable_adapters, merge_and_unload
    from lora_ref.adapters.qlora import merge_and_unload_4bit
    from lora_ref.analysis import experiments as X

    base = tutorial_base(ctx)
    steps, lr = lora_settings(ctx.quick)
    ctx.log(f"LoRA and QLoRA runs for merging ({steps} steps each; cached)")
    lora_run = X.lora_finetune(base, r=8, alpha=16, lr=lr, steps=steps, progress=ctx.progress)
    qlora_run = X.qlora_finetune(base, r=8, alpha=16, lr=lr, steps=steps, progress=ctx.progress)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, base.config.vocab_size, size=(4, 64))  # (B, T)

    unmerged = lora_run.model()
    y_unmerged = _logits(unmerged, ids)
    merged = merge_and_unload(copy.deepcopy(unmerged))
    y_merged = _logits(merged, ids)
    float_gap = float(np.max(np.abs(y_merged - y_unmerged)))
    scale = float(np.max(np.abs(y_unmerged)))
    ctx.check(float_gap <= 1e-4 * max(1.0, scale), f"float32: merged logits equal unmerged ones (max |Δ| "
                                                   f"{float_gap:.2e})")

    q_unmerged = qlora_run.model()
    yq = _logits(q_unmerged, ids)
    with disable_adapters(q_unmerged):
        y_base = _logits(q_unmerged, ids)  # the 4-bit base alone
    effect = float(np.linalg.norm(yq - y_base) / np.linalg.norm(yq))
    errors = {}
    for strategy in ("float", "requantize", "refit"):
        m = merge_and_unload_4bit(copy.deepcopy(q_unmerged), strategy)
        errors[strategy] = float(np.linalg.norm(_logits(m, ids) - yq) / np.linalg.norm(yq))
    ctx.check(errors["float"] < 1e-5, f"a float merge of the QLoRA model is exact ({errors['float']:.1e})")
    ctx.check(min(errors["requantize"], errors["refit"]) > 10 * errors["float"],
              "re-quantizing the merged weight costs far more than a float merge")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(errors) + ["adapter's own effect"]
    vals = [errors[k] for k in errors] + [effect]
    ax.bar(names, [max(v, 1e-9) for v in vals], color=["C0", "C1", "C2", "gray"])
    ax.set_yscale("log")
    ax.set_ylabel("relative output error vs the unmerged QLoRA model")
    ax.set_title("merging a QLoRA adapter into its 4-bit base")
    ctx.text(f"""
**Float base.** Merging W ← W + s·B·A gives the same model as running the adapter beside the base: on a batch of
4 × 64 bytes the merged and unmerged logits differ by at most {float_gap:.1e} (float32 rounding; logits up to
{scale:.1f}).

**4-bit base.** A QLoRA adapter (rank 8, {steps} steps) merged three ways, relative error of the logits against
the unmerged QLoRA model:

| merge | relative output error |
|---|---:|
| keep a float32 merged model (dequant(W) + ΔW) | {errors['float']:.2e} |
| dequantize + add + re-quantize (what PEFT does) | {errors['requantize']:.4f} |
| re-quantize with each block's scale re-fitted (lora_ref) | {errors['refit']:.4f} |
| for scale: the adapter's own effect on the logits | {effect:.4f} |

Re-quantizing the merged weight costs an NF4 error of the same order as quantizing the base did, comparable to
what a short fine-tune changes: keep QLoRA adapters unmerged, or merge into a float copy of the base. (Re-fitting
each block's scale minimizes the *weight* error per block; whether that lowers the *output* error varies from
model to model — compare the two rows.)""")
    ctx.figure(fig, "merge_4bit", "Output error of three ways to merge a QLoRA adapter into the 4-bit base")
    ctx.summarize(f"merging: float32 merged == unmerged (max |Δ| {float_gap:.1e}); 4-bit merge error requantize "
                  f"{errors['requantize']:.4f}, refit {errors['refit']:.4f}, float {errors['float']:.1e}")
