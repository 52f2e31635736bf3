"""GGUF import: lora_ref's dequantizers against gguf-py's, the q/k permutation, errors, a tiny synthetic model."""

import json

import gguf
import numpy as np
import pytest

from lora_ref.files import gguf as G
from lora_ref.files.safetensors import read_safetensors_raw
from lora_ref.testing.tiny_gguf import TINY_CHAT_TEMPLATE, write_tiny_llama_gguf

# gguf-py's own decoders warn on inf * 0 (damaged scales in the random blocks); lora_ref's stay quiet
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:gguf")

QT = gguf.GGMLQuantizationType
BLOCK_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}

F16_SPECIAL = {  # float16 bit patterns for scales and mins
    "zero": 0x0000, "neg_zero": 0x8000, "one": 0x3C00, "neg_half": 0xB800, "smallest_subnormal": 0x0001,
    "largest_subnormal": 0x03FF, "smallest_normal": 0x0400, "max": 0x7BFF, "neg_max": 0xFBFF, "inf": 0x7C00,
    "neg_inf": 0xFC00, "nan": 0x7E00,
}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_block_types_bit_exact_with_gguf_on_random_bytes(name):
    """Every byte random: scales and mins cover all float16 patterns (subnormal, inf, NaN, negative)."""
    rng = np.random.default_rng(0)
    per, nbytes = BLOCK_TYPES[name]
    rows, blocks_per_row = 64, 8
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * nbytes), dtype=np.uint8)
    ours = G.dequantize(raw, int(QT[name]), (rows, blocks_per_row * per))
    theirs = gguf.quants.dequantize(raw, QT[name])
    _bits_equal(ours, theirs)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("scale", sorted(F16_SPECIAL))
def test_block_types_edge_scales(name, scale):
    rng = np.random.default_rng(1)
    per, nbytes = BLOCK_TYPES[name]
    raw = rng.integers(0, 256, size=(len(F16_SPECIAL), nbytes), dtype=np.uint8)
    raw[:, 0:2] = np.array([F16_SPECIAL[scale]], dtype="<u2").view(np.uint8)
    if name == "Q4_1":  # the min, every special value against this scale
        raw[:, 2:4] = np.array(list(F16_SPECIAL.values()), dtype="<u2").view(np.uint8).reshape(-1, 2)
    raw[0, 2 if name != "Q4_1" else 4:] = 0  # all-zero codes
    raw[1, 2 if name != "Q4_1" else 4:] = 0xFF  # all-ones codes (15 / -1)
    ours = G.dequantize(raw, int(QT[name]), (raw.shape[0], per))
    _bits_equal(ours, gguf.quants.dequantize(raw, QT[name]))


def test_float_types_bit_exact_with_gguf():
    rng = np.random.default_rng(2)
    h = rng.integers(0, 1 << 16, size=(16, 32), dtype=np.uint16).view(np.float16)  # every kind of float16
    _bits_equal(G.dequantize(h, int(QT.F16), h.shape), gguf.quants.dequantize(h, QT.F16))
    f = rng.standard_normal((8, 5)).astype(np.float32)
    _bits_equal(G.dequantize(f.tobytes(), int(QT.F32), f.shape), f)


def test_known_block_values_and_nibble_order():
    """Hand-computed: byte j holds value j (low nibble) and value j + 16 (high nibble)."""
    half = np.array([0.5], dtype="<f2").view(np.uint8)
    q = np.zeros(16, dtype=np.uint8)
    q[0], q[1], q[15] = 0x1F, 0x80, 0x3C
    q4_0 = np.concatenate([half, q])
    v = G.dequantize(q4_0.tobytes(), int(QT.Q4_0), (32,))
    assert v[0] == (15 - 8) * 0.5 and v[16] == (1 - 8) * 0.5
    assert v[1] == -4.0 and v[17] == 0.0 and v[15] == 2.0 and v[31] == -2.5 and v[2] == -4.0
    q4_1 = np.concatenate([half, np.array([-1.0], dtype="<f2").view(np.uint8), q])
    v = G.dequantize(q4_1, int(QT.Q4_1), (1, 32))[0]
    assert v[0] == 15 * 0.5 - 1 and v[16] == 0.5 - 1 and v[17] == 8 * 0.5 - 1 and v[2] == -1.0
    codes = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    q8 = np.concatenate([np.array([0.25], dtype="<f2").view(np.uint8), codes])
    np.testing.assert_array_equal(G.dequantize(q8, int(QT.Q8_0), (32,)), np.arange(-16, 16) * 0.25)


def test_dequantize_refuses_wrong_sizes_and_types():
    with pytest.raises(ValueError, match="needs 40 bytes, got 39"):
        G.dequantize(bytes(39), int(QT.Q4_1), (64,))
    with pytest.raises(ValueError, match="multiple of 32"):
        G.dequantize(bytes(20), int(QT.Q4_1), (2, 16))
    with pytest.raises(ValueError, match="Q4_K.*supported: F32, F16, Q4_0, Q4_1, Q8_0"):
        G.dequantize(bytes(144), int(QT.Q4_K), (256,))


def test_permutation_matches_llama_cpp_and_is_inverted():
    # one head of 4 rows: llama.cpp stores HF rows (0, 2, 1, 3) (pairs of halves interleaved)
    w = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(G.permute_qk(w, 1), w[[0, 2, 1, 3]])
    rng = np.random.default_rng(3)
    for n_head, head_dim in [(9, 64), (3, 64), (2, 8), (4, 2)]:
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, n_head), n_head), w)
        np.testing.assert_array_equal(G.permute_qk(G.unpermute_qk(w, n_head), n_head), w)
    # the formula transformers' GGUF loader uses (LlamaTensorProcessor._reverse_permute_weights)
    w = rng.standard_normal((3 * 64, 7)).astype(np.float32)
    ref = w.reshape(3, 32, 2, 7).swapaxes(2, 1).reshape(w.shape)
    np.testing.assert_array_equal(G.unpermute_qk(w, 3), ref)
    with pytest.raises(ValueError, match="permutation"):
        G.unpermute_qk(np.zeros((6, 2)), 2)


def test_names():
    assert G.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert G.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert G.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert G.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        G.hf_name("rope_freqs.weight")


@pytest.mark.parametrize("linear,embed,norm,tied", [("Q4_1", "Q8_0", "F32", True), ("Q4_0", "F16", "F32", False),
                                                    ("Q8_0", "Q4_0", "F16", True), ("F16", "F32", "F32", False)])
def test_tiny_model_import(tmp_path, linear, embed, norm, tied):
    rng = np.random.default_rng(4)
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama_gguf(path, rng, linear_type=linear, embed_type=embed, norm_type=norm, tied=tied,
                                     layers=2)
    out = G.import_gguf(path, tmp_path / "hf")
    got, meta = read_safetensors_raw(out / "model.safetensors")
    assert meta == {"format": "pt"}
    assert sorted(got) == sorted(expected)
    for k in expected:
        _bits_equal(got[k], expected[k])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tied
    heads = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    assert heads == (64, 4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["vocab_size"] == 3 + 256 + 4 and cfg["num_hidden_layers"] == 2 and cfg["intermediate_size"] == 96
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TINY_CHAT_TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["add_bos_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", False)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                       "pad_token_id": 2}


def test_tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_llama_gguf(tmp_path / "t.gguf", np.random.default_rng(5))
    out = G.import_gguf(tmp_path / "t.gguf", tmp_path / "hf")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # tokens: 0-2 control, 3 + byte index for single characters (byte-alphabet order), merges appended after
    enc = tok.encode("<|im_start|>the the", add_special_tokens=False)
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġthe"]
    assert enc.ids == [1, 3 + ord("t"), 3 + 256 + 1, 3 + 256 + 2]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the the"
    assert tok.decode(enc.ids) == "the the"
    assert tok.encode("é", add_special_tokens=False).ids == [3 + 0xC3, 3 + 0xA9]  # UTF-8 bytes


def test_the_llama_module_loads_the_tiny_import(tmp_path):
    from lora_ref.modeling.llama import Llama

    write_tiny_llama_gguf(tmp_path / "t.gguf", np.random.default_rng(6), tied=False)
    model = Llama.from_pretrained(G.import_gguf(tmp_path / "t.gguf", tmp_path / "hf"))
    assert model.config.num_key_value_heads == 2


# ---- bad input: one-line ValueError naming the problem, nothing written --------------------------------------


def _refused(tmp_path, path, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        G.import_gguf(path, out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_wrong_architecture(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", np.random.default_rng(7), arch="gpt2")
    _refused(tmp_path, tmp_path / "m.gguf", "architecture 'gpt2' is not supported")


@pytest.mark.parametrize("where,qtype", [("linear", "Q5_0"), ("embed", "Q5_1"), ("norm", "BF16")])
def test_unsupported_tensor_type(tmp_path, where, qtype):
    kw = {"linear": {"linear_type": qtype}, "embed": {"embed_type": qtype}, "norm": {"norm_type": qtype}}[where]
    write_tiny_llama_gguf(tmp_path / "m.gguf", np.random.default_rng(8), **kw)
    _refused(tmp_path, tmp_path / "m.gguf", f"tensor type {qtype}, which lora_ref cannot import")


def test_unknown_tensor(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", np.random.default_rng(9), extra_tensor=("rope_freqs.weight", "F32"))
    _refused(tmp_path, tmp_path / "m.gguf", "'rope_freqs.weight' is not part of a Llama model")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01, 100])
def test_truncated_file(tmp_path, keep):
    write_tiny_llama_gguf(tmp_path / "m.gguf", np.random.default_rng(10))
    data = (tmp_path / "m.gguf").read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    (tmp_path / "t.gguf").write_bytes(data[:n])
    _refused(tmp_path, tmp_path / "t.gguf", "truncated")


def test_not_gguf_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    _refused(tmp_path, tmp_path / "x.gguf", "not a GGUF file")
    _refused(tmp_path, tmp_path / "missing.gguf", "GGUF file not found")


def test_non_empty_output_is_refused_before_reading(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", np.random.default_rng(11))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        G.import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
