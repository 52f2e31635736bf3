"""Tour sections after pretraining and fine-tuning: the rank study, memory, merging and NF4.

Each function is a section of ``lora-ref tour`` (see :mod:`lora_ref.commands.tour`): it computes its numbers with
the library (the cached runs of :mod:`lora_ref.analysis.experiments`, the memory model, the merges, the quantizer), checks
the claims its text makes (``ctx.check``), writes markdown and a figure, and adds a summary line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

# (steps, peak learning rate) of the runs these sections make, for the full and the quick tour. The full tour uses
# the book's settings (experiments.BOOK), so it reads the runs chapters 9-11 made (and they read its runs): the cache
# keys on every setting. The quick tour trains shorter runs on the quick base.
def _full_settings(quick: bool) -> tuple[int, float]:
    from lora_ref.analysis.experiments import BOOK

    return (30, 1e-3) if quick else (BOOK["steps"], BOOK["lr_full"])


def _lora_settings(quick: bool) -> tuple[int, float]:
    from lora_ref.analysis.experiments import BOOK

    return (20, 3e-3) if quick else (BOOK["steps"], BOOK["lr_lora"])


def _base(ctx):
    from lora_ref.training import tutorial
    from lora_ref.modeling.llama import Llama

    if "base" not in ctx.state:
        ctx.state["base"] = Llama.from_pretrained(tutorial.pretrained_base_dir(ctx.quick, progress=ctx.progress)
                                                  / "model")
    return ctx.state["base"]


# ================================================================================================================
# the rank study
# ================================================================================================================
def section_rank_study(ctx) -> None:
    """Singular values of a full fine-tune's ΔW: energy rank against functional rank, with a random baseline."""
    import matplotlib.pyplot as plt

    from lora_ref.analysis import experiments as X

    base = _base(ctx)
    steps, lr = _full_settings(ctx.quick)
    ctx.log(f"full fine-tuning of the block matrices for the rank study ({steps} steps; cached)")
    run = X.full_finetune(base, steps=steps, lr=lr, progress=ctx.progress)
    deltas = run.deltas()  # {name: ΔW (out, in)}
    rng = np.random.default_rng(0)
    rows = []
    for name, d in deltas.items():
        rows.append((name, X.energy_rank(d), X.energy_rank(X.random_like(d, rng)), min(d.shape)))
    energy = np.array([r[1] for r in rows])
    random_energy = np.array([r[2] for r in rows])
    ctx.log("functional rank: truncating every ΔW to rank k and measuring the loss (cached)")
    fr = X.functional_rank(run)
    kmax = max(r[3] for r in rows)
    ctx.check(run.gain > 0, f"full fine-tuning lowered the Python-source validation loss (gain {run.gain:.4f} nats)")
    ctx.check(fr.rank is not None, "some truncation rank recovers 90% of the fine-tuning gain")
    ctx.check(np.median(energy) <= np.median(random_energy),
              f"ΔW concentrates its energy in fewer directions than a random matrix of the same shape and norm "
              f"(median 90%-energy rank {np.median(energy):.0f} vs {np.median(random_energy):.0f})")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in list(deltas.items())[:: max(1, len(deltas) // 6)]:
        s = X.spectrum(d)
        axes[0].semilogy(np.arange(1, s.size + 1), s / s[0], label=name.replace("model.layers.", "L"))
    d0 = next(iter(deltas.values()))
    s0 = X.spectrum(X.random_like(d0, rng))
    axes[0].semilogy(np.arange(1, s0.size + 1), s0 / s0[0], "k--", label="random, same shape and norm")
    axes[0].set_xlabel("index i of the singular value")
    axes[0].set_ylabel("σ_i / σ_1 of ΔW")
    axes[0].set_title("singular values of the full fine-tune's ΔW")
    axes[0].legend(fontsize=7)
    ks = np.asarray(fr.ks)
    gains = (fr.base_loss - np.asarray(fr.losses)) / (fr.base_loss - fr.full_loss)
    axes[1].plot(ks, 100 * gains, "o-")
    axes[1].axhline(90, color="gray", ls=":")
    axes[1].set_xscale("symlog", linthresh=1)
    axes[1].set_xlabel("rank k of every truncated ΔW")
    axes[1].set_ylabel("fine-tuning gain recovered (%)")
    axes[1].set_title(f"functional rank (90% of the gain): k = {fr.rank}")
    fig.tight_layout()

    ctx.text(f"""
"Low rank" means two things. The **energy rank** of a matrix is the number of singular values that hold 90% of
‖ΔW‖²_F; the **functional rank** is the smallest k such that truncating *every* ΔW of the fine-tune to rank k
keeps 90% of the improvement in validation loss. Here the block matrices were fully fine-tuned for {steps} steps
(gain {run.gain:.4f} nats/byte on Python source); for its {len(rows)} matrices (up to rank {kmax}):

| | median | min | max |
|---|---:|---:|---:|
| 90%-energy rank of ΔW | {np.median(energy):.0f} | {energy.min()} | {energy.max()} |
| 90%-energy rank of a random matrix (same shape and norm) | {np.median(random_energy):.0f} | {random_energy.min()} | {random_energy.max()} |
| functional rank (one k for all matrices) | {fr.rank} | | |

The singular values of ΔW fall faster than those of noise, yet the energy rank is still a large share of the full
rank: the update is not low rank in the energy sense. The rank needed to keep the *effect* of the update is
{fr.rank} — that is the sense in which LoRA's low-rank assumption holds.""")
    ctx.figure(fig, "rank_study", "Singular values of ΔW (left) and the gain kept by rank-k truncation (right)")
    ctx.state["rank_run"] = run
    ctx.summarize(f"rank study: 90%-energy rank of ΔW median {np.median(energy):.0f} (random "
                  f"{np.median(random_energy):.0f}); functional rank {fr.rank}")


# ================================================================================================================
# memory: predicted against measured
# ================================================================================================================
def section_memory(ctx) -> None:
    """One training step per method on the tutorial model: tracemalloc's peak against the memory model."""
    import matplotlib.pyplot as plt

    from lora_ref.analysis.memory_profile import measure_all

    ctx.log("measuring one training step each as full, LoRA and QLoRA (tracemalloc)")
    rows = measure_all()
    for r in rows:
        err = r["measured_bytes"] / r["predicted_bytes"] - 1
        ctx.check(abs(err) <= 0.10, f"{r['method']}: measured step memory within 10% of the prediction "
                                    f"({err:+.1%})")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["predicted_bytes"] / 2**20 for r in rows], 0.4, label="predicted (memory model)")
    ax.bar(x + 0.2, [r["measured_bytes"] / 2**20 for r in rows], 0.4, label="measured (tracemalloc peak)")
    ax.set_xticks(x, [r["method"] for r in rows])
    ax.set_ylabel("memory of one training step (MiB)")
    ax.set_title(f"tutorial model, batch {rows[0]['batch']} × {rows[0]['seq']} bytes")
    ax.legend()
    table = "\n".join(f"| {r['method']} | {r['predicted_bytes'] / 2**20:.2f} | {r['measured_bytes'] / 2**20:.2f} | "
                      f"{r['measured_bytes'] / r['predicted_bytes'] - 1:+.1%} | {r['phase']} |" for r in rows)
    ctx.text(f"""
The memory model of `lora-ref count` predicts every buffer a training step of lora_ref's NumPy implementation
allocates (activations kept for backward, gradients, the optimizer's temporaries, the 4-bit kernels' scratch).
One step per method, measured as the peak that `tracemalloc` traces above what was already resident:

| method | predicted (MiB) | measured (MiB) | error | peak during |
|---|---:|---:|---:|---|
{table}
""")
    ctx.figure(fig, "memory", "Step memory of full fine-tuning, LoRA and QLoRA: predicted and measured")
    ctx.summarize("memory (measured vs predicted): " + ", ".join(
        f"{r['method']} {r['measured_bytes'] / r['predicted_bytes'] - 1:+.1%}" for r in rows))


# ================================================================================================================
# merging
# ================================================================================================================
def _logits(model, ids) -> np.ndarray:
    from lora_ref.autograd.tensor import no_grad

    with no_grad():
        return np.asarray(model(ids), dtype=np.float64)


def section_merging(ctx) -> None:
    """Merge equivalence in float32, and the error of the three ways to merge into a 4-bit base."""
    import matplotlib.pyplot as plt

    from lora_ref.analysis import experiments as X
    from lora_ref.adapters.lora import disable_adapters, merge_and_unload
    from lora_ref.adapters.qlora import merge_and_unload_4bit

    base = _base(ctx)
    steps, lr = _lora_settings(ctx.quick)
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


# ================================================================================================================
# NF4 against bitsandbytes
# ================================================================================================================
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "bnb"


def _fixture_files() -> dict[str, Path]:
    found = {k: FIXTURES / f"nf4_fp4_{k}.safetensors" for k in ("cuda", "cpu")}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise ValueError(f"bitsandbytes reference outputs not found: {', '.join(missing)} (a source checkout has "
                         "them in tests/data/bnb/)")
    return found


def section_nf4(ctx) -> None:
    """lora_ref's quantizer against bitsandbytes' stored CUDA and CPU outputs, code by code."""
    import matplotlib.pyplot as plt
    import ml_dtypes
    from safetensors import safe_open

    from lora_ref.quant import quantize_4bit
    from lora_ref.quant.blockwise import unpack_nibbles

    results = []
    for rounding, path in _fixture_files().items():
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads(f.metadata()["manifest"])
            for entry in manifest:
                key = f"case{int(entry['case']):02d}"
                dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[entry["dtype"]]
                x = f.get_tensor(f"{key}.input").astype(dtype).reshape(entry["shape"])
                packed, _ = quantize_4bit(x, blocksize=entry["blocksize"], quant_type=entry["quant_type"],
                                          double_quant=entry["double_quant"], rounding=rounding)
                theirs = f.get_tensor(f"{key}.packed").reshape(-1)
                n = 2 * theirs.size  # every nibble, the padding one of an odd count included
                same = float(np.mean(unpack_nibbles(packed.reshape(-1), n) == unpack_nibbles(theirs, n)))
                results.append({"rounding": rounding, "case": key, "quant_type": entry["quant_type"],
                                "dtype": entry["dtype"], "double_quant": entry["double_quant"],
                                "n": int(np.prod(entry["shape"])), "agree": same})
    nf4 = [r for r in results if r["quant_type"] == "nf4"]
    ctx.check(all(r["agree"] == 1.0 for r in nf4),
              "every NF4 code equals bitsandbytes' (CUDA kernel and CPU path, each in its rounding mode)")
    fp4 = [r for r in results if r["quant_type"] == "fp4"]
    ctx.check(all(r["agree"] >= 0.9999 for r in fp4), "FP4 codes agree at least 99.99% (CUDA's fast-math "
                                                       "reciprocal flips a few on the thresholds)")

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, rounding in enumerate(("cuda", "cpu")):
        rs = [r for r in results if r["rounding"] == rounding]
        ax.bar(np.arange(len(rs)) + 0.4 * i, [100 * (1 - r["agree"]) + 1e-4 for r in rs], 0.4,
               label=f"vs bitsandbytes {rounding.upper()} (rounding='{rounding}')")
    ax.set_yscale("log")
    ax.set_xlabel("fixture case")
    ax.set_ylabel("codes that differ (%; 1e-4 = none)")
    ax.set_title("lora_ref's 4-bit codes against bitsandbytes 0.50.2")
    ax.legend(fontsize=8)
    rows = "\n".join(f"| {r['case']} | {r['rounding']} | {r['quant_type']} | {r['dtype']} | "
                     f"{'yes' if r['double_quant'] else 'no'} | {r['n']:,} | {100 * r['agree']:.4f}% |"
                     for r in results)
    total = sum(r["n"] for r in nf4)
    ctx.text(f"""
NF4 is QLoRA's 4-bit code: 16 values at quantiles of the normal distribution, scaled per block of 64 weights by
the block's absolute maximum. lora_ref's `quantize_4bit` reproduces bitsandbytes 0.50.2 — its CUDA kernel with
`rounding="cuda"` (decimal thresholds, ties to the lower code, −0.0 for all-zero blocks) and its CPU path with
`rounding="cpu"` — on the outputs stored from both ({total:,} NF4 codes in all, every one equal):

| case | path | type | dtype | double quant | elements | codes equal |
|---|---|---|---|---|---:|---:|
{rows}
""")
    ctx.figure(fig, "nf4_agreement", "Share of 4-bit codes that differ from bitsandbytes, per stored case")
    ctx.summarize(f"NF4: {total:,} codes equal to bitsandbytes (CUDA and CPU); FP4 agreement min "
                  f"{100 * min(r['agree'] for r in fp4):.3f}%")
