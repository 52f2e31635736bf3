"""The tutorial model: a small byte-level Llama pretrained on CPython's help text, cached for reuse.

Every later experiment (full fine-tuning, LoRA, QLoRA, merging, the benchmarks) starts from this one base model,
so it is trained once per machine and kept in the artifact cache (:mod:`lora_ref.files.cache`), keyed by the model
config, the corpus fingerprint and the training recipe. The tour, the notebooks and the tests all call
:func:`pretrained_base` and get the same checkpoint.

Why this size. The budget is about 3 minutes of pretraining on 2 CPU cores for the full recipe (under a minute
for the quick one), and the model must end clearly better than context-free prediction. Training time grows
with the parameter count (6·N floating-point operations per token, plus attention), so within a fixed budget a
bigger model sees fewer bytes. Measured CPU time of one training step (32 × 128 bytes, one thread, NumPy
readable paths): 0.65 s at width 128 with SwiGLU width 384 (0.85 M parameters), 1.2 s at width 192 (1.9 M),
2.0 s at width 256 (3.3 M). The chosen model (width 128, SwiGLU width 512, 1.05 M parameters) takes 0.79 s with
the readable paths and 0.53 s with the fused kernels (:mod:`lora_ref.kernels.switch`), and its 300 pretraining steps reach
2.23 bits per byte on the validation text, against 4.69 for the unigram baseline
(:func:`lora_ref.training.data.unigram_bits_per_byte`); the quick recipe's 100 steps reach 3.57. ``lora-ref tour`` reports
the loss of the cached model it uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import lora_ref
from lora_ref.files import cache
from lora_ref.files.outputs import write_json
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.training.data import Corpus, pretraining_corpus
from lora_ref.training.loop import History, evaluate, train

# The tutorial Llama: byte vocabulary, 4 layers of width 128, 4 query heads sharing 2 key/value heads (GQA),
# SwiGLU width 512 (= 4·D), untied head, context 128 bytes: 1.05 M parameters.
TUTORIAL_CONFIG: dict = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": None,
}

# Pretraining recipes: "full" for the tour and the notebooks, "quick" for ``lora-ref tour --quick`` and tests.
RECIPES: dict[str, dict] = {
    "full": {"steps": 300, "lr": 3e-3, "batch": 32, "seq": 128, "warmup": 15, "min_lr": 3e-4, "weight_decay": 0.1,
             "betas": [0.9, 0.95], "max_grad_norm": 1.0, "seed": 0, "eval_every": 30, "eval_batches": 8},
    "quick": {"steps": 100, "lr": 3e-3, "batch": 32, "seq": 128, "warmup": 5, "min_lr": 3e-4, "weight_decay": 0.1,
              "betas": [0.9, 0.95], "max_grad_norm": 1.0, "seed": 0, "eval_every": 20, "eval_batches": 8},
}
# Bump when the meaning of a recipe changes without its numbers changing. 2: bases cached before the learning-rate
# schedule's refactor (one scale factor for every parameter group) differed from today's in the last bit of some
# steps' learning rate, and so in every weight; a fresh machine trains the version-2 base.
RECIPE_VERSION = 2

CACHE_KIND = "tutorial-base"
HISTORY_FILE = "history.json"


def tutorial_config() -> LlamaConfig:
    """The tutorial model's :class:`~lora_ref.modeling.llama.LlamaConfig`."""
    return LlamaConfig.from_dict(dict(TUTORIAL_CONFIG), source="TUTORIAL_CONFIG")


def recipe(quick: bool = False) -> dict:
    """The pretraining settings (a copy) for the full or the quick base."""
    return dict(RECIPES["quick" if quick else "full"])


def cache_description(quick: bool = False, corpus: Corpus | None = None) -> dict:
    """Everything that determines the pretrained weights: what the cache key is made of."""
    corpus = pretraining_corpus() if corpus is None else corpus
    return {
        "what": "lora_ref tutorial base model",
        "config": tutorial_config().to_dict(),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint},
        "recipe": recipe(quick),
        "recipe_version": RECIPE_VERSION,
        "lora_ref": lora_ref.__version__,
    }


def pretrain(quick: bool = False, *, corpus: Corpus | None = None, progress: bool = True) -> tuple[Llama, History]:
    """Train the tutorial model from its seeded initialization with the recipe (no cache involved)."""
    corpus = pretraining_corpus() if corpus is None else corpus
    r = recipe(quick)
    rng = np.random.default_rng(r["seed"])
    init_rng, data_rng = rng.spawn(2)
    model = Llama(tutorial_config(), rng=init_rng)
    hist = train(model, corpus, r["steps"], r["lr"], r["batch"], r["seq"], data_rng, warmup=r["warmup"],
                 min_lr=r["min_lr"], weight_decay=r["weight_decay"], betas=tuple(r["betas"]),
                 max_grad_norm=r["max_grad_norm"], eval_every=r["eval_every"], eval_batches=r["eval_batches"],
                 progress=progress, desc="pretraining" + (" (quick)" if quick else ""))
    return model, hist


def pretrained_base_dir(quick: bool = False, *, progress: bool = True) -> Path:
    """The cache folder of the pretrained base (HF checkpoint + ``history.json``), training it first if needed."""
    corpus = pretraining_corpus()

    def build(folder: Path) -> None:
        model, hist = pretrain(quick, corpus=corpus, progress=progress)
        model.save_pretrained(folder / "model")
        write_json(folder / HISTORY_FILE, hist.to_dict())

    return cache.get_or_build(CACHE_KIND, cache_description(quick, corpus), build)


def is_cached(quick: bool = False) -> bool:
    """Whether the base is already in the cache (then :func:`pretrained_base` only loads it)."""
    return cache.lookup(CACHE_KIND, cache_description(quick)) is not None


def pretrained_base(quick: bool = False, *, progress: bool = True) -> Llama:
    """The pretrained tutorial model: loaded from the cache, or trained (about 3 minutes; quick: under one) and cached."""
    return Llama.from_pretrained(pretrained_base_dir(quick, progress=progress) / "model")


def pretraining_history(quick: bool = False) -> History:
    """The :class:`~lora_ref.training.loop.History` of the cached base's pretraining run (trains it if not cached)."""
    folder = pretrained_base_dir(quick)
    return History.from_dict(json.loads((folder / HISTORY_FILE).read_text()))


def bits_per_byte(nats: float) -> float:
    """Convert a per-byte loss in nats to bits per byte (÷ ln 2)."""
    return nats / math.log(2)


def validation_loss(model, corpus: Corpus | None = None, *, seq: int | None = None) -> float:
    """Mean next-byte loss (nats) over every validation window of the pretraining corpus."""
    corpus = pretraining_corpus() if corpus is None else corpus
    seq = RECIPES["full"]["seq"] if seq is None else seq
    return evaluate(model, corpus.val, 32, seq)
