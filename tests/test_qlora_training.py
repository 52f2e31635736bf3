"""QLoRA on the tutorial model: a short fine-tune learns, and its measured peak memory is below LoRA's by what the
storage arithmetic predicts (float32 weights: 4 bytes each; NF4 with double quantization: packed codes + scales).

Uses the quick-recipe tutorial base (trained once and cached by lora_ref.tutorial).
"""

import tracemalloc

import numpy as np
import pytest

from lora_ref import tutorial
from lora_ref.commands.finetune import finetune, prepare_model
from lora_ref.data import finetuning_corpus, sample_batch
from lora_ref.llama import Llama
from lora_ref.nn import Linear
from lora_ref.optim import AdamW
from lora_ref.qlora import Linear4bit
from lora_ref.train import train_step

TARGETS = ("all-linear",)


@pytest.fixture(scope="module")
def base_dir():
    return tutorial.pretrained_base_dir(quick=True, progress=False) / "model"


def test_qlora_finetune_learns(base_dir):
    model, hist, summary = finetune("qlora", r=8, alpha=16, targets=TARGETS, steps=12, batch=8, seq=128, seed=0,
                                    base=Llama.from_pretrained(base_dir), progress=False, eval_batches=4,
                                    eval_every=12)
    assert hist.val_steps == [0, 12]
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05
    assert np.mean(hist.train_loss[-4:]) < np.mean(hist.train_loss[:4])
    quantized = [m for _, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is Linear  # the head stays float
    n_adapter = sum(p.size for p in model.parameters() if p.requires_grad)
    assert summary["trainable_parameters"] == n_adapter
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _peak_training_bytes(method: str, base_dir, steps: int = 2) -> tuple[int, int]:
    """(bytes held after building the model, peak bytes during ``steps`` training steps), both traced from zero."""
    corpus = finetuning_corpus()
    tracemalloc.start()
    try:
        model = prepare_model(method, r=8, alpha=16, targets=TARGETS, rng=np.random.default_rng(0),
                              base=Llama.from_pretrained(base_dir))
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        rng = np.random.default_rng(1)
        for _ in range(steps):
            x, y = sample_batch(corpus.train, 4, 64, rng)
            train_step(model, opt, x, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return held, peak


def test_qlora_peak_memory_is_below_lora_by_the_storage_arithmetic(base_dir):
    # compile the 4-bit kernels first: Numba's compiler allocates Python objects, which tracemalloc would count
    _peak_training_bytes("qlora", base_dir, steps=1)

    held_lora, peak_lora = _peak_training_bytes("lora", base_dir)
    held_qlora, peak_qlora = _peak_training_bytes("qlora", base_dir)

    # prediction: every quantized linear weight of n elements goes from 4n bytes to
    # n/2 (codes) + n/64 (uint8 scales) + 4·⌈n/64/256⌉ (nested float32 scales) + 4 (offset)
    model = prepare_model("qlora", r=8, alpha=16, targets=TARGETS, base=Llama.from_pretrained(base_dir))
    predicted = 0
    for _, m in model.named_modules():
        if isinstance(m, Linear4bit):
            n = m.in_features * m.out_features
            predicted += 4 * n - (n // 2 + -(-n // 64) + 4 * -(-n // (64 * 256)) + 4)
    assert predicted > 2_000_000  # megabytes of weights, not noise

    saved_held = held_lora - held_qlora
    saved_peak = peak_lora - peak_qlora
    print(f"held: LoRA {held_lora:,} B, QLoRA {held_qlora:,} B; peak: LoRA {peak_lora:,} B, QLoRA {peak_qlora:,} B; "
          f"saved {saved_peak:,} B at the peak, predicted {predicted:,} B")
    assert peak_qlora < peak_lora
    assert abs(saved_held - predicted) <= 0.1 * predicted
    assert abs(saved_peak - predicted) <= 0.1 * predicted
