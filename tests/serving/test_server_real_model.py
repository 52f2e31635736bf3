"""The server on SmolLM2-135M-Instruct (the session's real model) with two adapters: the greedy chat answers, alone
and in one mixed batch, equal `lora-ref generate --chat ... --greedy` for the same model, adapter and max tokens."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from tiny_serving import generate_text, openai_client

from lora_ref.modeling.generate import stop_token_ids
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.serving.batch import write_random_adapter
from lora_ref.serving.server import BackgroundServer, create

QUESTION = "What is the capital of France? Answer in one sentence."
N = 10


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-real")
    model = Llama.from_pretrained(smollm2_dir)
    # strong enough that each adapter changes the greedy answer (checked below)
    folders = {"x": write_random_adapter(model, root / "x", rng=np.random.default_rng(0), r=8,
                                         target_modules=["q_proj", "v_proj"], b_std=0.2),
               "y": write_random_adapter(model, root / "y", rng=np.random.default_rng(0), r=16, b_std=0.1)}
    tok = load_tokenizer(smollm2_dir)
    engine, app = create(model, tok, stop_ids=stop_token_ids(smollm2_dir, tok), served_name="smollm2",
                         max_batch=4, max_adapters=2, rng=np.random.default_rng(0), threads=1)
    try:
        for name, folder in folders.items():
            engine.load_adapter(name, folder).result()
        with BackgroundServer(app) as server:
            yield server, engine, folders
    finally:
        engine.close()


def test_real_model_alone_and_mixed_equal_generate(served, smollm2_dir):
    server, engine, folders = served
    refs = {name: generate_text(smollm2_dir, None if name == "smollm2" else folders[name], chat=QUESTION,
                                max_tokens=N) for name in ("smollm2", "x", "y")}
    assert refs["smollm2"] == "The capital of France is Paris."
    assert len(set(refs.values())) == 3, refs  # each adapter changes the answer
    client = openai_client(server.url)

    def ask(name):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=N)
        return r.choices[0].message.content

    assert {name: ask(name) for name in refs} == refs
    before = engine.stats()["peak_running"]
    assert before == 1
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        names = ["x", "smollm2", "y", "x"]
        assert list(pool.map(ask, names)) == [refs[n] for n in names]
    assert engine.stats()["errors"] == 0
