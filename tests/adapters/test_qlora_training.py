"""QLoRA on the tutorial model: a short fine-tune learns, and its measured peak memory is below LoRA's by what the
storage arithmetic predicts (float32 weights: 4 bytes each; NF4 with double quantization: packed codes + scales).

Uses the quick-recipe tutorial base (trained once and cached by lora_ref.training.tutorial).
"""

import tracemalloc

import numpy as np
import pytest

from lora_ref.adapters.qlora import Linear4bit
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.nn import Linear
from lora_ref.training import tutorial
from lora_ref.training.data import finetuning_corpus, sample_batch
from lora_ref.training.finetune import finetune, prepare_model
from lora_ref.training.loop import train_step
from lora_ref.training.optim import AdamW

TARGETS = ("all-linear",)


@pytest.fixture(scope="module")
def base_dir():
    return tutorial.pretrained_base_dir(quick=True, progress=False) / "model"


def test_qlora_finetune_learns(base_dir):
    model, hist, summary = finetune("qlora", r=8, alpha=16, targets=TARGETS, steps=12, batch=8, seq=64, seed=0,
                                    base=Llama.from_pretrained(base_dir), progress=False, eval_batches=4,
                                    eval_every=12)
    assert hist.val_steps == [0, 12]
    # the validation windows are fixed, so any drop is the model's; 12 steps on a new domain give a few hundredths
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.01
    assert len(hist.train_loss) == 12 and all(np.isfinite(hist.train_loss))
    quantized = [m for _, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is Linear  # the head stays float
    n_adapter = sum(p.size for p in model.parameters() if p.requires_grad)
    assert summary["trainable_parameters"] == n_adapter
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _traced_training(method: str, base_dir, steps: int = 2) -> tuple[int, int, int]:
    """Bytes held after building the model, peak bytes during ``steps`` training steps, and bytes held after
    them (weights, adapters, gradients, AdamW state), all traced from zero by tracemalloc."""
    corpus = finetuning_corpus()
    tracemalloc.start()
    try:
        model = prepare_model(method, r=8, alpha=16, targets=TARGETS, rng=np.random.default_rng(0),
                              base=Llama.from_pretrained(base_dir), impl="numba")
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        rng = np.random.default_rng(1)
        for _ in range(steps):
            x, y = sample_batch(corpus.train, BATCH, SEQ, rng)
            train_step(model, opt, x, y)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held, peak, after


def kernel_scratch_bytes(model, rows: int) -> int:
    """The most memory one call of the fused 4-bit kernels allocates beyond its result (its packed panels),
    over the model's 4-bit layers, forward and input-gradient products with ``rows`` rows."""
    from lora_ref.quant import kernels

    worst = 0
    for _, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        for f, cols in ((kernels.matmul_4bit, m.in_features), (kernels.matmul_4bit_t, m.out_features)):
            a = np.ones((rows, cols), np.float32)
            f(a, m.weight.data, m.quant_state)  # compiled before tracing
            tracemalloc.start()
            try:
                y = f(a, m.weight.data, m.quant_state)
                worst = max(worst, tracemalloc.get_traced_memory()[1] - y.nbytes)
            finally:
                tracemalloc.stop()
    return worst


BATCH, SEQ = 4, 64


def test_qlora_memory_is_below_lora_by_the_storage_arithmetic(base_dir):
    # QLoRA runs the fused kernel (impl="numba"), which never holds a float32 weight. Compile it first: Numba's
    # compiler allocates Python objects, which tracemalloc would count.
    _traced_training("qlora", base_dir, steps=1)

    held_lora, peak_lora, after_lora = _traced_training("lora", base_dir)
    held_qlora, peak_qlora, after_qlora = _traced_training("qlora", base_dir)

    # prediction: every quantized linear weight of n elements goes from 4n bytes to
    # n/2 (codes) + n/64 (uint8 scales) + 4·⌈n/64/256⌉ (nested float32 scales) + 4 (offset)
    model = prepare_model("qlora", r=8, alpha=16, targets=TARGETS, base=Llama.from_pretrained(base_dir))
    predicted = 0
    for _, m in model.named_modules():
        if isinstance(m, Linear4bit):
            n = m.in_features * m.out_features
            predicted += 4 * n - (n // 2 + -(-n // 64) + 4 * -(-n // (64 * 256)) + 4)
    assert predicted > 2_000_000  # megabytes of weights, not noise
    scratch = kernel_scratch_bytes(model, BATCH * SEQ)
    print(f"held: LoRA {held_lora:,} B, QLoRA {held_qlora:,} B; peak: LoRA {peak_lora:,} B, QLoRA {peak_qlora:,} B; "
          f"predicted saving {predicted:,} B; kernel scratch {scratch:,} B")

    # what stays allocated (weights, adapters, gradients, optimizer state) shrinks by the predicted amount
    assert abs((held_lora - held_qlora) / predicted - 1) <= 0.1
    assert abs((after_lora - after_qlora) / predicted - 1) <= 0.1
    # the peak shrinks by the same amount, less at most the 4-bit kernel's scratch buffers (one call's worth)
    assert peak_qlora < peak_lora
    assert predicted - scratch <= peak_lora - peak_qlora <= 1.1 * predicted
