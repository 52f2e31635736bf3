"""Tour section: memory of full fine-tuning, LoRA and QLoRA, predicted against measured."""

from __future__ import annotations

import numpy as np


def section_memory(ctx) -> None:
    """One training step per method on the tutorial model: tracemalloc's peak against the memory model."""
    import matplotlib.pyplot as plt

    from lora_ref.analysis.memory_measure import measure_all

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
