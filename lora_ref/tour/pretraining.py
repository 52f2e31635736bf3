"""Tour section: pretraining the tutorial model (or loading it from the cache)."""

from __future__ import annotations

import math

from lora_ref.tour.context import TourContext


def section_pretraining(ctx: TourContext) -> None:
    """Pretrain (or load from the cache) the tutorial model; report the data, the model, the loss, a sample."""
    import numpy as np

    from lora_ref.training import tutorial
    from lora_ref.training.data import decode, encode, pretraining_corpus, unigram_bits_per_byte

    corpus = pretraining_corpus()
    r = tutorial.recipe(ctx.quick)
    cached = tutorial.is_cached(ctx.quick)
    ctx.log("loading the pretrained base from the cache" if cached else
            f"pretraining the tutorial model ({r['steps']} steps; cached afterwards)")
    folder = tutorial.pretrained_base_dir(ctx.quick, progress=ctx.progress)
    from lora_ref.modeling.llama import Llama

    base = Llama.from_pretrained(folder / "model")
    hist = tutorial.pretraining_history(ctx.quick)
    ctx.state["base"] = base
    ctx.state["base_dir"] = folder / "model"
    ctx.state["pretraining_corpus"] = corpus
    base.save_pretrained(ctx.out / "base")

    cfg = base.config
    n_params = base.num_parameters()
    unigram = unigram_bits_per_byte(corpus)
    val_nats = tutorial.validation_loss(base, corpus, seq=r["seq"])
    val_bits = tutorial.bits_per_byte(val_nats)
    from lora_ref.training.loop import evaluate

    recorded = evaluate(base, corpus.val, r["batch"], r["seq"], r["eval_batches"])  # the windows training used
    ctx.check(abs(recorded - hist.final_val_loss) <= 1e-4 * hist.final_val_loss,
              f"the saved model reproduces the validation loss recorded at the end of training "
              f"({recorded:.5f} vs {hist.final_val_loss:.5f})")
    ctx.check(val_bits < unigram - 0.5, f"the model beats the unigram baseline by more than 0.5 bit/byte "
                                        f"({val_bits:.3f} vs {unigram:.3f})")
    ctx.check(hist.val_loss[-1] < hist.val_loss[0], "validation loss fell during pretraining")

    ctx.text(f"""
The base model every later section starts from: a Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU) over
**bytes** (vocabulary 256, the UTF-8 bytes of the text), pretrained on the English help pages that ship with
CPython (`pydoc_data.topics`: the text `help("if")` shows).

| | |
|---|---|
| corpus | `{corpus.name}`: {corpus.train.size:,} training bytes, {corpus.val.size:,} validation bytes (every 10th block of 4 KiB) |
| model | {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, {cfg.num_attention_heads} query heads sharing {cfg.num_key_value_heads} key/value heads (head size {cfg.head_dim}), SwiGLU width {cfg.intermediate_size}, context {cfg.max_position_embeddings} bytes |
| parameters | {n_params:,} |
| training | {hist.steps} steps of {r['batch']} × {r['seq']} bytes = {hist.tokens:,} bytes seen, AdamW (lr {r['lr']:g}, cosine to {r['min_lr']:g}, {r['warmup']} warmup steps, weight decay {r['weight_decay']} on matrices, clip {r['max_grad_norm']}) |
| speed | {hist.tokens_per_second:,.0f} bytes/s ({hist.seconds:.0f} s of training steps{'; loaded from the cache this time' if cached else ''}) |

**Validation loss: {val_nats:.3f} nats = {val_bits:.3f} bits per byte**, over all {corpus.val.size:,} validation bytes.
For comparison: a uniform guess costs 8 bits per byte, and the best prediction that ignores context (each byte's
frequency in the training text, the *unigram* model) costs {unigram:.3f} bits per byte. The model uses context
to save {unigram - val_bits:.2f} bits on every byte (its perplexity per byte is {math.exp(val_nats):.1f}
out of 256).""")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, hist.steps + 1)
    train_bits = np.asarray(hist.train_loss) / math.log(2)
    k = max(1, hist.steps // 30)
    smooth = np.convolve(train_bits, np.ones(k) / k, mode="valid")
    ax.plot(steps, train_bits, color="C0", alpha=0.25, lw=0.8, label="training batch")
    ax.plot(steps[k - 1:], smooth, color="C0", lw=1.5, label=f"training (mean of {k} steps)")
    ax.plot(hist.val_steps, np.asarray(hist.val_loss) / math.log(2), "o-", color="C1", label="validation")
    ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_ylim(0, 8.5)
    ax.set_title("Pretraining the tutorial model on pydoc text")
    ax.legend()
    ax.grid(alpha=0.3)
    ctx.figure(fig, "pretraining_loss", "Pretraining loss in bits per byte; the dashed line is what byte "
                                        "frequencies alone achieve.")

    prompt = 'The "for" statement'
    rng = np.random.default_rng(0)
    n_new = min(100, cfg.max_position_embeddings - len(encode(prompt)))
    out = base.generate(encode(prompt)[None, :], n_new, temperature=0.8, top_k=40, rng=rng)
    sample = decode(out[0])
    ctx.text(f"A sample (temperature 0.8, top-k 40, seed 0), prompt `{prompt}`:\n\n```text\n{sample}\n```")
    ctx.state["sample"] = sample
    ctx.summarize(f"pretrained base: {n_params:,} parameters, validation {val_bits:.3f} bits/byte "
                  f"(unigram baseline {unigram:.3f}); {'from the cache' if cached else f'trained in {hist.seconds:.0f} s, {hist.tokens_per_second:,.0f} tokens/s'}")
    ctx.summarize(f"sample: {sample!r}")
