"""What ``lora-ref finetune --data`` writes loads in PEFT / transformers with lora_ref's logits, and its chat loss
mask equals transformers' assistant-token mask."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel

from lora_ref.adapters.peft_files import load_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.testing.tiny_models import write_tiny_chat_model
from lora_ref.training.datasets import chat_example

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_one_thread")]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "you are a helpful assistant."},
     {"role": "user", "content": "What is the capital of Italy?"},
     {"role": "assistant", "content": "The capital of Italy is Rome."},
     {"role": "user", "content": "And France?"},
     {"role": "assistant", "content": "Paris."}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", rng=np.random.default_rng(1))


@pytest.fixture
def chat_file(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS), encoding="utf-8")
    return p


def finetune(*argv):
    code = main(["finetune", *map(str, argv)])
    assert code == 0


def probe_ids(folder) -> np.ndarray:
    tok = load_tokenizer(folder)
    return tok.apply_chat_template(CHATS[1], add_generation_prompt=False, tokenize=True)[None, :]  # (1, T)


def ours(folder, ids, adapter=None) -> np.ndarray:
    model = Llama.from_pretrained(folder)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    with no_grad():
        return model(ids).data


def theirs(folder, ids, adapter=None) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("method,targets", [("lora", "all-linear"), ("lora", "q_proj=4,v_proj,o_proj=2"),
                                            ("qlora", "q_proj,v_proj,gate_proj")])
def test_tiny_adapter_loads_in_peft_with_equal_logits(tiny, chat_file, tmp_path, method, targets):
    out = tmp_path / "adapter"
    finetune("--model", tiny, "--data", chat_file, "--method", method, "--targets", targets, "--steps", 6,
             "--batch", 2, "--lr", "1e-2", "--out", out)
    ids = probe_ids(tiny)
    a, b = ours(tiny, ids, out), theirs(tiny, ids, out)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - ours(tiny, ids)).max() > 1e-3  # the trained adapter changes the logits


def test_tiny_full_finetune_folder_loads_in_transformers(tiny, chat_file, tmp_path):
    out = tmp_path / "full"
    finetune("--model", tiny, "--data", chat_file, "--method", "full", "--steps", 4, "--batch", 2, "--lr", "1e-3",
             "--out", out)
    ids = probe_ids(out)
    a, b = ours(out, ids), theirs(out, ids)
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a - ours(tiny, ids)).max() > 1e-3
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris."
    assert hf_tok(text, add_special_tokens=False).input_ids == load_tokenizer(tiny).encode(text).tolist()
    assert hf_tok.apply_chat_template(CHATS[1], tokenize=False) == load_tokenizer(tiny).apply_chat_template(
        CHATS[1], add_generation_prompt=False)


def test_real_model_adapter_loads_in_peft_with_equal_logits(smollm2_dir, chat_file, tmp_path):
    out = tmp_path / "adapter"
    finetune("--model", smollm2_dir, "--data", chat_file, "--method", "lora", "--targets", "q_proj,v_proj",
             "--steps", 2, "--batch", 1, "--lr", "3e-3", "--out", out)
    ids = probe_ids(smollm2_dir)
    a, b = ours(smollm2_dir, ids, out), theirs(smollm2_dir, ids, out)
    assert np.abs(a - b).max() < 2e-4
    assert np.abs(a - ours(smollm2_dir, ids)).max() > 1e-2


# ChatML with transformers' {% generation %} markers around what an assistant turn should be trained on: the
# content and <|im_end|>, not the newline after it
GENERATION_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_chat_mask_equals_transformers_assistant_mask(which, tiny, smollm2_dir, tmp_path):
    src = tiny if which == "tiny" else smollm2_dir
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(src / name, folder / name)
    (folder / "chat_template.jinja").write_text(GENERATION_CHATML, encoding="utf-8")
    tok = load_tokenizer(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CHATS:
        hf = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ex = chat_example(messages, tok)
        n = len(ex)
        assert ex.ids.tolist() == hf["input_ids"][:n]
        assert ex.mask.tolist() == [bool(v) for v in hf["assistant_masks"][:n]]
        assert not any(hf["assistant_masks"][n:])  # what chat_example drops is untrained in transformers too
