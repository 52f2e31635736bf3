"""lora_ref.analysis.qlora_init: LoftQ and QPiSSA against QLoRA's B = 0 start, errors and cached runs.

The real model runs in chapter 7 of the book; here the same code runs on tiny random Llamas, and every error the
study reports is recomputed independently: with bitsandbytes-exact NF4 (``lora_ref.quant``) and NumPy's SVD, from
the float weight, without the adapter modules.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_ref.analysis import qlora_init as QI
from lora_ref.analysis import real_llm as R
from lora_ref.modeling.llama import Llama
from lora_ref.quant import dequantize_4bit, quantize_4bit

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_llama(seed=0, layers=2) -> Llama:
    return Llama({"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "initializer_range": 0.05}, rng=np.random.default_rng(seed))


def nf4(W):
    """QUANT's quantizer (NF4, blocksize 64, no double quantization, CUDA rounding), dequantized, float64."""
    return dequantize_4bit(*quantize_4bit(W, 64, "nf4", False, "cuda")).astype(np.float64).reshape(W.shape)


def fro(x):
    return float(np.linalg.norm(np.asarray(x, np.float64)))


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_qlora_start_leaves_the_whole_quantization_error(base):
    model, errors = QI.prepare(base, "qlora", r=4, rng=np.random.default_rng(1))
    assert len(errors) == 14  # 7 matrices × 2 blocks
    for name, e in errors.items():
        W = base.get_submodule(name).weight.data
        assert e["qlora_error"] == pytest.approx(fro(W - nf4(W)), rel=1e-6)
        assert e["init_error"] == pytest.approx(e["qlora_error"], rel=1e-6)  # B = 0
        assert e["weight_norm"] == pytest.approx(fro(W), rel=1e-6)
    assert base.get_submodule("model.layers.0.self_attn.q_proj").weight.data.dtype == np.float32  # base untouched


def test_loftq_one_iteration_is_the_truncated_svd_of_the_error(base):
    r = 4
    _, errors = QI.prepare(base, "loftq", r=r, num_iter=1)
    for name, e in errors.items():
        W = base.get_submodule(name).weight.data
        E = W.astype(np.float64) - nf4(W)
        sv = np.linalg.svd(E, compute_uv=False)
        assert e["qlora_error"] == pytest.approx(fro(E), rel=1e-6)
        assert e["init_error"] == pytest.approx(np.sqrt(np.sum(sv[r:] ** 2)), rel=1e-4)  # Eckart–Young
        assert e["init_error"] < e["qlora_error"]


def test_qpissa_error_is_the_residual_quantization_error(base):
    r = 4
    _, errors = QI.prepare(base, "qpissa", r=r)
    for name, e in errors.items():
        W = base.get_submodule(name).weight.data.astype(np.float64)
        U, S, Vh = np.linalg.svd(W, full_matrices=False)
        residual = (W - (U[:, :r] * S[:r]) @ Vh[:r]).astype(np.float32)  # what QPiSSA quantizes
        assert e["init_error"] == pytest.approx(fro(residual - nf4(residual)), rel=2e-3)
        assert e["qlora_error"] == pytest.approx(fro(W - nf4(W.astype(np.float32))), rel=1e-6)


def test_prepare_rejects_bad_input(base):
    with pytest.raises(ValueError, match="init must be one of"):
        QI.prepare(base, "pissa")
    with pytest.raises(ValueError, match="rng"):
        QI.prepare(base, "qlora")


def test_truncated_keeps_the_first_blocks(base):
    assert QI.truncated(base, None) is base
    short = QI.truncated(base, 1)
    assert len(short.model.layers) == 1 and short.config.num_hidden_layers == 1 and len(base.model.layers) == 2
    assert np.array_equal(short.get_submodule("model.layers.0.mlp.up_proj").weight.data,
                          base.get_submodule("model.layers.0.mlp.up_proj").weight.data)
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="layers"):
            QI.truncated(base, bad)


# ------------------------------------------------------------------------------------------------ cached runs

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random chat Llama with a byte-level BPE tokenizer (trained here) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-chat-llama-init")
    place = R.invent_facts(np.random.default_rng(0))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"{f.question} {f.paraphrase} {f.answer}." for f in place.facts] + [R.general_text()],
                            trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    Llama({"vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
           "initializer_range": 0.2, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
          rng=np.random.default_rng(0)).save_pretrained(folder / "model")
    for f in (folder / "model").iterdir():
        f.rename(folder / f.name)
    (folder / "model").rmdir()
    return folder


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_init_runs_are_measured_and_cached(tiny_folder, cache_dir, monkeypatch):
    kw = dict(r=4, steps=3, batch=2, n_facts=2, lr=1e-2, folder=tiny_folder, progress=False)
    runs = {init: QI.init_run(init, **kw) for init in QI.INITS}
    base, tok = R.load_base(tiny_folder)
    for init, run in runs.items():
        assert run.folder.is_relative_to(cache_dir)
        assert len(run.train_loss) == 3 and all(np.isfinite(run.train_loss))
        assert run.float_general_loss == pytest.approx(R.general_loss(base, tok), rel=1e-6)
        assert run.total("init_error") <= run.total("qlora_error") * (1 + 1e-9)
        assert run.recovered == pytest.approx(1 - run.total("init_error") ** 2 / run.total("qlora_error") ** 2)
    assert runs["qlora"].recovered == pytest.approx(0.0, abs=1e-9)
    assert runs["loftq"].recovered > 0 and runs["qpissa"].recovered > 0
    # the same seed and batches: the three QLoRA-quantized starts quantize W alike
    assert runs["loftq"].total("qlora_error") == pytest.approx(runs["qlora"].total("qlora_error"), rel=1e-6)
    # the start of the B = 0 run is the NF4 base's general loss, measured independently
    from lora_ref.adapters.qlora import quantize_model

    q = quantize_model(Llama.from_pretrained(tiny_folder), 64, False, "nf4")
    assert runs["qlora"].general_loss_start == pytest.approx(R.general_loss(q, tok), rel=1e-5)

    def no_training(*a, **k):
        raise AssertionError("trained again although the run is cached")

    monkeypatch.setattr(R, "answer_train_step", no_training)
    again = QI.init_run("loftq", **kw)
    assert again.folder == runs["loftq"].folder and again.train_loss == runs["loftq"].train_loss


def test_init_run_rejects_bad_settings(tiny_folder, cache_dir):
    with pytest.raises(ValueError, match="init must be one of"):
        QI.init_run("gaussian", folder=tiny_folder)
    with pytest.raises(ValueError, match="num_iter"):
        QI.init_run("loftq", num_iter=0, folder=tiny_folder)
    with pytest.raises(ValueError, match="steps"):
        QI.init_run("loftq", steps=0, folder=tiny_folder)
