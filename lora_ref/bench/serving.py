"""Benchmark rows of serving many adapters (:mod:`lora_ref.serving`), on the real model SmolLM2-135M-Instruct.

Every figure is seconds per generated token in the steady state of decoding (one decode step of every row, timed
after the prompts are in the caches; a step's time divided by its number of rows), measured through
:class:`lora_ref.serving.batch.BatchDecoder` directly, without HTTP. The adapters are random stand-ins
(:func:`lora_ref.serving.batch.write_random_adapter`, r = 16 on every linear layer of the blocks, PEFT's
"all-linear"): the cost depends on the shapes, not on what an adapter learned.

- ``serve_mixed`` vs ``serve_one_adapter``: a batch of :data:`BATCH` rows, four adapters mixed (each on a quarter
  of the rows), against the same batch with every row on one adapter. What mixing costs: the base product is
  shared either way; only the low-rank terms gather different matrices per row. Goal <= 1.25.
- ``serve_vs_sequential`` vs ``one_request_at_a_time``: the mixed batch against one row decoded alone (the
  per-token time of serving requests one after another). What batching buys: the weights are read once per step
  for all rows. Goal <= 0.33.
- ``unmerged_overhead`` vs ``merged``: one request (batch of one) with its adapter unmerged against the same
  adapter merged into a copy of the base (no low-rank term at all). The glossary's "unmerged adapters cost 5–15%
  latency", settled for this model and this CPU. ``params.generate_ratio`` holds the same ratio for lora_ref's
  single-sequence :func:`~lora_ref.modeling.generate.generate` (LoraLinear layers against the merged model, 8 new
  tokens after a 16-token prompt, prefill included).

Thread counts are whatever the caller pinned (``lora-ref bench`` sets Numba and the BLAS to the same number).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np

from lora_ref.bench.timing import row, time_pair

__all__ = ["serving_rows", "BATCH", "RANK", "MODEL"]

MODEL = "smollm2-135m-instruct"
BATCH = 16
RANK = 16
N_ADAPTERS = 4


def _setup(folder: Path, model_dir):
    from lora_ref.files.models import fetch
    from lora_ref.modeling.llama import Llama
    from lora_ref.serving.batch import AdapterSet, write_random_adapter

    model = Llama.from_pretrained(model_dir or fetch(MODEL, progress=False))
    rng = np.random.default_rng(0)
    aset = AdapterSet(model)
    for k in range(N_ADAPTERS):
        name = f"adapter{k}"
        aset.load(name, write_random_adapter(model, folder / name, rng=rng, r=RANK, lora_alpha=2 * RANK,
                                             b_std=0.01))
    return model, aset


def _prefilled(model, aset, adapters: list[str | None], rng):
    """A BatchDecoder whose rows hold prompts of different lengths (8 … 40 tokens), row j on ``adapters[j]``."""
    from lora_ref.serving.batch import BatchDecoder

    dec = BatchDecoder(model, aset, max_batch=len(adapters))
    vocab = model.config.vocab_size
    for j, ad in enumerate(adapters):
        dec.prefill(j, rng.integers(vocab // 2, vocab, size=8 + (j * 7) % 33).tolist(), ad)
    return dec


def _stepper(dec):
    """One decode step of every row of ``dec`` (each fed a fixed token, so the steps cost alike)."""
    rows = dec.active_rows()
    tokens = [42] * len(rows)
    return lambda: dec.decode(rows, tokens)


def serving_rows(quick: bool = False, *, model_dir=None, batch: int = BATCH) -> list[dict]:
    """The three rows (see the module docstring); ``quick`` cuts repeats, never shapes. ``model_dir`` replaces the
    real model by another Llama folder and ``batch`` the number of rows (tests use a tiny model)."""
    from lora_ref.adapters.lora import merge_and_unload, unload
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.modeling.generate import generate
    from lora_ref.serving.batch import AdapterSet

    reps = {"repeats": 3, "warmup": 1} if quick else {"repeats": 9, "warmup": 2}
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, aset = _setup(Path(tmp), model_dir)
        names = aset.names()
        mixed = _prefilled(model, aset, [names[j % N_ADAPTERS] for j in range(batch)], rng)
        single_adapter = _prefilled(model, aset, [names[0]] * batch, rng)
        mixed_s, one_s = time_pair(_stepper(mixed), _stepper(single_adapter), **reps)
        alone = _prefilled(model, aset, [names[0]], rng)
        batch_s, alone_s = time_pair(_stepper(mixed), _stepper(alone), **reps)
        for dec in (mixed, single_adapter):
            for r in dec.active_rows():
                dec.free(r)
        common = {"model": MODEL, "rank": RANK, "targets": "all-linear", "adapters": N_ADAPTERS,
                  "through": "BatchDecoder (no HTTP)", "unit": "seconds per generated token"}
        rows = [
            row("serve_mixed", mixed_s / batch, "serve_one_adapter", one_s / batch, batch=batch, **common),
            row("serve_vs_sequential", batch_s / batch, "one_request_at_a_time", alone_s, batch=batch, **common),
        ]
        # unmerged against merged, one request: the merged model is a copy of the base with the adapter folded in
        merged = merge_and_unload(load_adapter(copy.deepcopy(model), Path(tmp) / names[0]))
        merged_dec = _prefilled(merged, AdapterSet(merged), [None], np.random.default_rng(1))
        alone_again = _prefilled(model, aset, [names[0]], np.random.default_rng(1))
        check = alone_again.decode([0], [42])[0], merged_dec.decode([0], [42])[0]
        if np.abs(check[0] - check[1]).max() > 1e-3 * np.abs(check[1]).max():
            raise ValueError("unmerged_overhead: the merged model's logits differ from the unmerged adapter's: "
                             "the two sides would not do the same work")
        unmerged_s, merged_s = time_pair(_stepper(alone_again), _stepper(merged_dec), **reps)
        prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, size=16).tolist()
        n = 8
        load_adapter(model, Path(tmp) / names[0])  # lora_ref's LoraLinear layers, for generate()
        try:
            gen_unmerged, gen_merged = time_pair(lambda: generate(model, prompt, n, decode_threads=None),
                                                 lambda: generate(merged, prompt, n, decode_threads=None),
                                                 repeats=3, warmup=1)
        finally:
            unload(model)
        rows.append(row("unmerged_overhead", unmerged_s, "merged", merged_s, batch=1,
                        generate_ratio=gen_unmerged / gen_merged, generate_tokens=n, **common))
    return rows
