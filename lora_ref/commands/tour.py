"""``lora-ref tour``: the whole story in one command, written to a folder as ``report.md`` plus figures.

The tour is a list of sections (:data:`SECTIONS`). Each section is a function ``section(ctx: TourContext)`` that
computes its numbers, checks its claims (a failed check raises ``ValueError``: exit 1, nothing written), and adds
markdown, figures and summary lines through ``ctx``. Sections run in order and share objects through
``ctx.state`` (for example ``ctx.state["base"]``, the pretrained model). To extend the tour, write a section
function in the module that owns the topic and add ``("Title", "lora_ref.module:function")`` to :data:`SECTIONS`.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HELP = "run the whole story: pretrain (cached), fine-tune, LoRA, QLoRA, ranks, memory, merging, NF4"

EXAMPLES = """\
examples:
  lora-ref tour                       # full tour into runs/tour/ (pretrains once, then reuses the cache)
  lora-ref tour --quick               # about a minute: shorter training everywhere, same steps
                                      # (without the real-LLM section, which needs SmolLM2)
  lora-ref tour --out runs/tour2      # another folder

The tour writes report.md, one PNG per figure and the pretrained base checkpoint (base/, Hugging Face layout) to
--out (default runs/tour). The folder must be missing, empty, or a folder an earlier tour wrote (it holds the
marker file .lora_ref_tour), which is then replaced; any other non-empty folder is refused. Nothing is written
unless every section finishes and every check passes.

The pretrained base model is cached in $LORA_REF_CACHE (default ~/.cache/lora_ref), keyed by the model config,
the corpus and the training recipe; a cold cache adds the pretraining time (about 3 minutes on 2 cores; --quick
under one minute). Progress goes to stderr; stdout gets a generated sample and a short summary."""

MARKER = ".lora_ref_tour"

# (title, "module:function"); each function takes a TourContext. Later topics append their sections here.
SECTIONS: list[tuple[str, str]] = [
    ("Pretraining the tutorial model", "lora_ref.commands.tour:section_pretraining"),
    ("Fine-tuning on Python source: full, LoRA and QLoRA", "lora_ref.commands.finetune:section_comparison"),
    ("The rank study: singular values of the full fine-tune's updates", "lora_ref.tour_sections:section_rank_study"),
    ("Memory: predicted and measured", "lora_ref.tour_sections:section_memory"),
    ("Merging: float and 4-bit bases", "lora_ref.tour_sections:section_merging"),
    ("NF4: agreement with bitsandbytes", "lora_ref.tour_sections:section_nf4"),
    ("A real LLM: SmolLM2-135M-Instruct learns invented facts", "lora_ref.analysis.real_llm:section_real_llm"),
]


@dataclass
class TourContext:
    """What a section gets: the output folder (a temporary one, renamed into place at the end), the flags, and
    writers for the report."""

    out: Path
    quick: bool
    progress: bool = True
    state: dict = field(default_factory=dict)  # objects shared between sections
    markdown: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def text(self, md: str) -> None:
        """Append a markdown paragraph (or table, or list) to the report."""
        self.markdown.append(md.strip("\n") + "\n")

    def figure(self, fig, name: str, caption: str) -> str:
        """Save a matplotlib figure as ``<name>.png`` in the output folder and show it in the report."""
        import matplotlib.pyplot as plt

        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"figure name must be letters, digits, '-' or '_', got {name!r}")
        if name in self.figures:
            raise ValueError(f"figure name {name!r} is used twice")
        fig.savefig(self.out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(name)
        self.text(f"![{caption}]({name}.png)\n\n*{caption}*")
        return f"{name}.png"

    def summarize(self, line: str) -> None:
        """A line of the short summary the command prints at the end."""
        self.summary.append(line)

    def check(self, ok: bool, claim: str) -> None:
        """Assert a claim the report makes; a false one stops the tour with ``ValueError`` (nothing written)."""
        if not ok:
            raise ValueError(f"tour check failed: {claim}")

    def log(self, msg: str) -> None:
        """A progress line on stderr."""
        if self.progress:
            sys.stderr.write(f"[tour] {msg}\n")
            sys.stderr.flush()


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="about a minute: shorter training, same sections")
    p.add_argument("--out", default="runs/tour", help="output folder (default runs/tour)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (report path, figures, summary, section times) instead of the summary")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from lora_ref.fsutil import check_out_dir, output_dir

    check_out_dir(args.out, replace_marker=MARKER)  # refuse before any work
    t0 = time.perf_counter()
    with output_dir(args.out, replace_marker=MARKER) as tmp:
        ctx = TourContext(out=tmp, quick=args.quick)
        toc = []
        for i, (title, target) in enumerate(SECTIONS, 1):
            ctx.log(f"section {i}/{len(SECTIONS)}: {title}")
            ctx.text(f"## {i}. {title}")
            ts = time.perf_counter()
            _resolve(target)(ctx)
            toc.append((title, time.perf_counter() - ts))
        head = ["# lora_ref tour" + (" (quick)" if args.quick else ""), "",
                "LoRA, QLoRA and adapter merging from first principles in NumPy. Every number below was computed "
                "by this run (`lora-ref tour" + (" --quick" if args.quick else "") + "`); every claim in the text "
                "is checked by the tour, which stops instead of writing a report when a check fails.", "",
                "| section | seconds |", "|---|---:|"]
        head += [f"| {i}. {t} | {s:.1f} |" for i, (t, s) in enumerate(toc, 1)]
        head += [f"| total | {time.perf_counter() - t0:.1f} |", ""]
        body = "\n".join(head) + "\n" + "\n".join(ctx.markdown)
        from lora_ref.fsutil import atomic_write

        atomic_write(tmp / "report.md", body)
    seconds = time.perf_counter() - t0
    if getattr(args, "json", False):
        import json

        print(json.dumps({"report": str(Path(args.out) / "report.md"), "quick": args.quick,
                          "figures": [f"{name}.png" for name in ctx.figures], "summary": ctx.summary,
                          "sections": [{"title": t, "seconds": sec} for t, sec in toc], "seconds": seconds}, indent=1))
        return 0
    print("\n".join(ctx.summary))
    print(f"report: {Path(args.out) / 'report.md'} ({seconds:.0f} s)")
    return 0


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ================================================================================================================
# section: pretraining
# ================================================================================================================
def section_pretraining(ctx: TourContext) -> None:
    """Pretrain (or load from the cache) the tutorial model; report the data, the model, the loss, a sample."""
    import numpy as np

    from lora_ref import tutorial
    from lora_ref.data import decode, encode, pretraining_corpus, unigram_bits_per_byte

    corpus = pretraining_corpus()
    r = tutorial.recipe(ctx.quick)
    cached = tutorial.is_cached(ctx.quick)
    ctx.log("loading the pretrained base from the cache" if cached else
            f"pretraining the tutorial model ({r['steps']} steps; cached afterwards)")
    folder = tutorial.pretrained_base_dir(ctx.quick, progress=ctx.progress)
    from lora_ref.llama import Llama

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
    from lora_ref.train import evaluate

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
