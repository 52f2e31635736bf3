"""Generation and evaluation on a real model against transformers (SmolLM2-135M-Instruct, float32).

- greedy decoding equals ``generate(do_sample=False)`` token for token (chat prompts and a plain prompt);
- ``lora-ref eval``'s loss equals the same definition computed in torch to 1e-4, with and without an adapter
  (the adapter case on a small model, through PEFT).
"""

import io
import json
import sys

import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop

FRANCE = "What is the capital of France? Answer in one sentence."

EVAL_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "\"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the 1889 World's Fair, "
    "and to crown the centennial anniversary of the French Revolution. Although initially criticised by some of "
    "France's leading artists and intellectuals for its design, it has since become a global cultural icon of "
    "France and one of the most recognisable structures in the world. Photosynthesis is the process by which "
    "plants use sunlight, water and carbon dioxide to create oxygen and energy in the form of sugar.\n"
)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def _hf_greedy(model, ids, n: int) -> list[int]:
    """transformers' greedy continuation of ``ids``; the end token, which it keeps, removed."""
    import torch

    x = torch.tensor([list(map(int, ids))])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    new = out[0, x.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return new[:-1] if new and new[-1] in eos else new


def _run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_greedy_chat_equals_transformers(smollm2_dir, hf_model, capsys, monkeypatch):
    tok = load_tokenizer(smollm2_dir)
    doc = json.loads(_run(capsys, "generate", "--model", smollm2_dir, "--chat", FRANCE, "--max-new-tokens", 40,
                          "--json"))
    prompt = tok.apply_chat_template([{"role": "user", "content": FRANCE}], tokenize=True)
    assert doc["prompt_tokens"] == prompt.size
    assert doc["token_ids"] == _hf_greedy(hf_model, prompt, 40)
    assert doc["text"] == "The capital of France is Paris." and doc["stop_reason"] == "eos"
    # the streamed text is the same answer
    assert _run(capsys, "generate", "--model", smollm2_dir, "--chat", FRANCE) == "The capital of France is Paris.\n"
    # the interactive chat answers the same through a pipe
    out = _run(capsys, "chat", "--model", smollm2_dir, stdin=FRANCE + "\n/exit\n", monkeypatch=monkeypatch)
    assert out == "The capital of France is Paris.\n"


def test_greedy_prompts_equal_transformers(smollm2_dir, hf_model):
    from lora_ref.modeling.generate import generate, stop_token_ids
    from lora_ref.modeling.llama import Llama

    tok = load_tokenizer(smollm2_dir)
    model = Llama.from_pretrained(smollm2_dir)
    stops = stop_token_ids(smollm2_dir, tok)
    cases = [
        tok.encode("The three primary colors are", add_special_tokens=True),
        tok.apply_chat_template([{"role": "system", "content": "You are a poet."},
                                 {"role": "user", "content": "Describe the sea in a few words."}], tokenize=True),
    ]
    for ids in cases:
        ours = generate(model, ids, 30, stop_ids=stops)
        assert ours == _hf_greedy(hf_model, ids, 30)
        assert len(ours) >= 10


def _torch_nll(model, ids, seq: int) -> tuple[float, int]:
    """The eval definition in torch: consecutive windows of ``seq`` (last one kept if >= 2 tokens), mean NLL."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for i in range(0, len(ids), seq):
        w = torch.tensor([list(map(int, ids[i:i + seq]))])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(w).logits.double()
        total += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return total / count, count


def test_eval_loss_equals_torch(smollm2_dir, hf_model, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(EVAL_TEXT, encoding="utf-8")
    ids = load_tokenizer(smollm2_dir).encode(EVAL_TEXT)
    assert ids.size % 64 >= 2  # a short last window that counts
    doc = json.loads(_run(capsys, "eval", "--model", smollm2_dir, "--data", data, "--seq", 64, "--json"))
    loss, count = _torch_nll(hf_model, ids, 64)
    assert doc["tokens"] == count == ids.size - doc["windows"] and doc["text_tokens"] == ids.size
    assert abs(doc["loss"] - loss) < 1e-4
    assert doc["perplexity"] == pytest.approx(np.exp(doc["loss"]), rel=1e-12)
    assert 1.0 < doc["loss"] < 5.0  # an English text under a trained model


def test_eval_with_adapter_equals_peft(tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.modeling.llama import Llama, LlamaConfig

    config = LlamaConfig(**tiny_llama_config(vocab_size=256, hidden_size=32, intermediate_size=64))
    model = Llama(config, rng=np.random.default_rng(0))
    model.save_pretrained(tmp_path / "base")
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), rng=np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data[...] = rng.normal(0, 1.0, p.shape)  # a non-zero update
    save_adapter(model, tmp_path / "adapter")
    text = "def add(a, b):\n    return a + b  # ünïcode bytes too\n" * 3
    (tmp_path / "code.py.txt").write_text(text, encoding="utf-8")
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32),
                                   str(tmp_path / "adapter")).eval()
    with_adapter = json.loads(_run(capsys, "eval", "--model", tmp_path / "base", "--adapter", tmp_path / "adapter",
                                   "--data", tmp_path / "code.py.txt", "--seq", 48, "--json"))
    assert abs(with_adapter["loss"] - _torch_nll(hf, ids, 48)[0]) < 1e-4
    with hf.disable_adapter():
        plain = _torch_nll(hf, ids, 48)[0]
    without = json.loads(_run(capsys, "eval", "--model", tmp_path / "base", "--data", tmp_path / "code.py.txt",
                              "--seq", 48, "--json"))
    assert abs(without["loss"] - plain) < 1e-4 and abs(with_adapter["loss"] - plain) > 1e-2
