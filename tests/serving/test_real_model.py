"""BatchDecoder on SmolLM2-135M-Instruct (the session's real model): a mixed batch of two adapters of different
ranks and targets and the bare base gives each row the greedy tokens it gets alone, and lora_ref's own generation
with that adapter applied unmerged, and the merged model's. Tolerances as in test_batch.py (relative 1e-5 of the
logits' scale; 1e-4 against the merged model, whose weights are rounded once more)."""

import copy

import numpy as np
import pytest

from lora_ref.adapters.lora import merge_and_unload, unload
from lora_ref.adapters.peft_files import load_adapter
from lora_ref.modeling.generate import generate
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.serving.batch import AdapterSet, BatchDecoder, write_random_adapter

NEW = 4


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Llama.from_pretrained(smollm2_dir), load_tokenizer(smollm2_dir)


def greedy(dec, prompts):
    toks, logits = {}, {}
    for row, (ids, ad) in prompts.items():
        lg = dec.prefill(row, ids, ad)
        toks[row], logits[row] = [int(np.argmax(lg))], [lg]
    for _ in range(NEW - 1):
        rows = list(prompts)
        lg = dec.decode(rows, [toks[r][-1] for r in rows])
        for j, r in enumerate(rows):
            toks[r].append(int(np.argmax(lg[j])))
            logits[r].append(lg[j])
    return toks, {r: np.array(v) for r, v in logits.items()}


def test_mixed_batch_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    rng = np.random.default_rng(0)
    folders = {"x": write_random_adapter(model, tmp_path / "x", rng=rng, r=8, target_modules=["q_proj", "v_proj"],
                                         b_std=0.05),
               "y": write_random_adapter(model, tmp_path / "y", rng=rng, r=16, b_std=0.02)}
    aset = AdapterSet(model)
    for name, f in folders.items():
        aset.load(name, f)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a", "The capital of France is"]
    prompts = {0: (tok.encode(texts[0]), "x"), 1: (tok.encode(texts[1]), "y"), 2: (tok.encode(texts[2]), None),
               3: (tok.encode(texts[3]), "y")}
    mixed_toks, mixed_logits = greedy(BatchDecoder(model, aset, max_batch=4), prompts)
    assert np.abs(mixed_logits[0][0] - mixed_logits[3][0]).max() > 0.1  # same prompt, adapters x and y differ
    for row, (ids, ad) in prompts.items():
        alone_toks, alone_logits = greedy(BatchDecoder(model, aset, max_batch=1), {0: (ids, ad)})
        assert mixed_toks[row] == alone_toks[0]
        scale = 1e-5 * float(np.abs(alone_logits[0]).max())
        np.testing.assert_allclose(mixed_logits[row], alone_logits[0], rtol=0, atol=scale)
        if ad is not None:
            load_adapter(model, folders[ad])
        try:
            assert alone_toks[0] == generate(model, ids, NEW)
        finally:
            unload(model)
        if ad == "y":  # and the merged model: W + s·B·A rounded to float32 once per weight
            merged = merge_and_unload(load_adapter(copy.deepcopy(model), folders[ad]))
            assert generate(merged, ids, NEW) == alone_toks[0]
            merged_first = BatchDecoder(merged, AdapterSet(merged), max_batch=1).prefill(0, ids, None)
            np.testing.assert_allclose(merged_first, alone_logits[0][0], rtol=0,
                                       atol=1e-4 * float(np.abs(alone_logits[0][0]).max()))
            del merged
