"""Memory-lean checkpoint I/O: loading peaks at the model's own size, ``merge`` and ``quantize`` stream tensor by
tensor (sharded inputs and outputs included), and the streamed files are byte for byte the whole-model ones.

Peak memory is measured with :mod:`tracemalloc`, which NumPy reports its array allocations to, on a synthetic
sharded float32 checkpoint of 160 MiB (random weights written once per module): 8 layers, hidden 512, MLP 2048,
vocabulary 8192, so the largest linear weight is 4 MiB, the largest tensor (embedding, lm_head) 16 MiB, and the
model ten times the largest tensor. Each bound below is derived from the arrays the code holds at once, in units of
the largest tensors, plus a fixed slack for Python objects; none is anywhere near the model's size.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from lora_ref.files.safetensors import (
    COPY_CHUNK,
    CheckpointReader,
    SafetensorsFile,
    SafetensorsWriter,
    read_safetensors_header,
    read_safetensors_raw,
    write_safetensors,
)
from lora_ref.modeling.llama import Llama, LlamaConfig, checkpoint_tensor_names
from lora_ref.quant import serialize as S

MiB = 1 << 20
SLACK = 8 * MiB  # Python objects, headers, the adapters' small arrays, NumPy's small temporaries
CFG = dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=128, tie_word_embeddings=False)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def _shard(name: str) -> str:
    if not name.startswith("model.layers."):
        return "model-00001-of-00003.safetensors"
    return "model-00002-of-00003.safetensors" if int(name.split(".")[2]) < 4 else "model-00003-of-00003.safetensors"


def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out = {}
    for n in checkpoint_tensor_names(cfg):
        leaf = n.rsplit(".", 2)[-2]
        out[n] = {"embed_tokens": (V, D), "lm_head": (V, D), "gate_proj": (F, D), "up_proj": (F, D),
                  "down_proj": (D, F)}.get(leaf, (D, D) if leaf.endswith("_proj") else (D,))
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A sharded float32 checkpoint (three shards, an index), its side files, and an all-linear LoRA adapter."""
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.modeling.nn import placeholders

    root = tmp_path_factory.mktemp("stream")
    base = root / "base"
    base.mkdir()
    cfg = LlamaConfig(**CFG)
    (base / "config.json").write_text(json.dumps(cfg.to_dict()))
    for f in SIDE_FILES:
        (base / f).write_text(json.dumps({"name": f}))
    rng = np.random.default_rng(0)
    shapes = _shapes(cfg)
    for fname in sorted({_shard(n) for n in shapes}):
        part = {n: (rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)) for n, s in shapes.items()
                if _shard(n) == fname}
        write_safetensors(base / fname, part)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 4 * sum(int(np.prod(s)) for s in shapes.values())},
         "weight_map": {n: _shard(n) for n in shapes}}))
    with placeholders():  # the adapter needs only the shapes
        skeleton = Llama(cfg)
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    save_adapter(inject_lora(skeleton, lcfg, rng=rng), root / "adapter")
    sizes = {n: 4 * int(np.prod(s)) for n, s in shapes.items()}
    linear = [n for n in shapes if n.endswith("_proj.weight")]
    return {"root": root, "base": base, "adapter": root / "adapter", "cfg": cfg, "total": sum(sizes.values()),
            "largest": max(sizes.values()), "largest_linear": max(sizes[n] for n in linear)}


def traced_peak(fn):
    """(result, peak bytes traced while ``fn`` ran, above what was allocated before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return result, peak


def test_synthetic_checkpoint_is_what_the_bounds_assume(synthetic):
    assert 160 * MiB < synthetic["total"] < 161 * MiB  # 160 MiB of matrices and 34 KiB of norms
    assert synthetic["largest"] == 16 * MiB and synthetic["largest_linear"] == 4 * MiB


# ---------------------------------------------------------------------------------------------------- the writer
def test_streaming_writer_writes_write_safetensors_bytes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.codes": rng.integers(0, 256, 7).astype(np.uint8),
        "c.bf16": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16),
        "d.f16": rng.standard_normal(6).astype(np.float16),
        "e.empty": np.zeros((0, 3), np.float32),
        "f.i64": np.arange(5, dtype=np.int64),
    }
    write_safetensors(tmp_path / "whole.safetensors", tensors, {"format": "pt", "k": "v"})
    for order in (sorted(tensors), sorted(tensors, reverse=True), ["d.f16", "a.codes", "f.i64", "e.empty", "c.bf16",
                                                                  "b.weight"]):
        path = tmp_path / f"stream-{order[0]}.safetensors"
        with SafetensorsWriter(path, {"format": "pt", "k": "v"}) as w:
            for k in order:
                w.add(k, tensors[k])
        assert path.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    # header-only reading, one tensor at a time, dtype conversion into a given array
    entries, meta, start = read_safetensors_header(tmp_path / "whole.safetensors")
    assert meta == {"format": "pt", "k": "v"} and set(entries) == set(tensors)
    with SafetensorsFile(tmp_path / "whole.safetensors") as f:
        assert f.shape("c.bf16") == (2, 4) and f.dtype("c.bf16") == np.dtype(ml_dtypes.bfloat16)
        out = np.empty((2, 4), np.float32)
        assert f.read("c.bf16", out=out) is out
        np.testing.assert_array_equal(out, tensors["c.bf16"].astype(np.float32))
        assert np.array_equal(f.read("a.codes"), tensors["a.codes"])


def test_an_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "x.safetensors") as w:
            w.add("a", np.ones(4, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(tmp_path / "y.safetensors")
    w.add("a", np.ones(4, np.float32))
    with pytest.raises(ValueError, match="'a' was already added"):
        w.add("a", np.ones(4, np.float32))
    with pytest.raises(ValueError, match="dtype complex64 cannot be written"):
        w.add("c", np.ones(2, np.complex64))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_reader_names_damaged_files(tmp_path):
    write_safetensors(tmp_path / "ok.safetensors", {"w": np.arange(64, dtype=np.float32)})
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="tensor 'w' does not fit its byte range.*cut.safetensors"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(struct.pack("<Q", 10 ** 6) + raw[8:])
    with pytest.raises(ValueError, match="header length 1000000 exceeds the file size"):
        read_safetensors_raw(tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="tensor 'nope' not found"):
        SafetensorsFile(tmp_path / "ok.safetensors").read("nope")


# ---------------------------------------------------------------------------------------------------- loading
def test_loading_peaks_at_the_models_own_size(synthetic):
    model, peak = traced_peak(lambda: Llama.from_pretrained(synthetic["base"]))
    assert peak <= 1.3 * synthetic["total"], (peak / MiB, synthetic["total"] / MiB)
    # the parameters are the file's tensors (read one at a time from three shards)
    with CheckpointReader(synthetic["base"]) as reader:
        assert reader.sharded and len(reader.files) == 3
        params = dict(model.named_parameters())
        for name in reader.names():
            assert np.array_equal(params[name].data, reader.read(name)), name


def test_loading_bfloat16_converts_one_tensor_at_a_time(tmp_path):
    """A bfloat16 checkpoint becomes a float32 model: the model (2× the file) plus one tensor's temporary."""
    cfg = LlamaConfig(**{**CFG, "num_hidden_layers": 2})
    shapes = _shapes(cfg)
    rng = np.random.default_rng(2)
    tensors = {n: rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16) for n, s in shapes.items()}
    d = tmp_path / "bf16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_safetensors(d / "model.safetensors", tensors)
    del tensors
    f32 = 4 * sum(int(np.prod(s)) for s in shapes.values())
    model, peak = traced_peak(lambda: Llama.from_pretrained(d))
    assert peak <= f32 + 2 * 8192 * 512 + SLACK  # + the largest tensor as read, in bfloat16
    assert model.lm_head.weight.dtype == np.float32


# ---------------------------------------------------------------------------------------------------- merge
def test_merge_streams_and_writes_the_whole_model_bytes(synthetic, tmp_path):
    from lora_ref.adapters.lora import merge_and_unload
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.commands.merge import merge_checkpoint

    out = tmp_path / "merged"
    doc, peak = traced_peak(lambda: merge_checkpoint(synthetic["base"], [synthetic["adapter"]], out))
    # per adapted weight: the weight read (1), its float32 copy in the merge (1), ΔW = B·A and ΔW·s (2), then
    # W + ΔW replacing B·A, and the NaN check's boolean mask (1/4): at most 4.25 of the largest linear weight.
    # Any other tensor: read (1) and its mask (1/4). Closing a file: one copy buffer.
    bound = max(4.25 * synthetic["largest_linear"], 1.25 * synthetic["largest"], COPY_CHUNK) + SLACK
    assert peak <= bound, (peak / MiB, bound / MiB)
    assert bound < synthetic["total"] / 4
    assert doc["merged_layers"] == 8 * 7 and doc["shards"] == 3

    # the same shards, the same map, the side files
    base_index = json.loads((synthetic["base"] / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == synthetic["total"]
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (synthetic["base"] / f).read_bytes()

    # byte for byte the non-streaming path: the whole model loaded, merged, each shard written at once
    model = merge_and_unload(load_adapter(Llama.from_pretrained(synthetic["base"]), synthetic["adapter"]))
    params = dict(model.named_parameters())
    for fname in sorted(set(base_index["weight_map"].values())):
        whole = tmp_path / f"whole-{fname}"
        write_safetensors(whole, {n: params[n].data for n, f in base_index["weight_map"].items() if f == fname})
        assert (out / fname).read_bytes() == whole.read_bytes(), fname


def test_merge_of_a_single_file_base_is_one_file(synthetic, tmp_path):
    """A base in one model.safetensors gives one model.safetensors (bfloat16 output, rounded once)."""
    from lora_ref.adapters.lora import merge_and_unload
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.commands.merge import merge_checkpoint

    small = tmp_path / "small"
    small.mkdir()
    cfg = LlamaConfig(**{**CFG, "num_hidden_layers": 1, "vocab_size": 256, "hidden_size": 64,
                         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4})
    Llama(cfg, rng=np.random.default_rng(3)).save_pretrained(small)
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.peft_files import save_adapter

    save_adapter(inject_lora(Llama.from_pretrained(small), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                                      init_lora_weights=False),
                             rng=np.random.default_rng(4)), tmp_path / "ad")
    merge_checkpoint(small, [tmp_path / "ad"], tmp_path / "m", dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    model = merge_and_unload(load_adapter(Llama.from_pretrained(small), tmp_path / "ad"))
    expected = {k: v.astype(ml_dtypes.bfloat16) for k, v in model.state_dict().items()}
    write_safetensors(tmp_path / "whole.safetensors", expected)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------- quantize
def test_quantize_streams_and_writes_the_whole_model_bytes(synthetic, tmp_path):
    from lora_ref.commands.quantize import ERROR_CHUNK, TARGET_PATTERN, quantize_checkpoint
    from lora_ref.quant.blockwise import quantize_4bit

    out = tmp_path / "q"
    report, peak = traced_peak(lambda: quantize_checkpoint(synthetic["base"], out, double_quant=True))
    # per quantized weight: the weight (1), then either the NumPy quantizer's temporaries (scaled values, the
    # nearest-code search, codes: about 4) or the dequantized weight with the dequantizer's temporaries (about 4.5),
    # plus the float64 error blocks (3 × ERROR_CHUNK × 8 bytes): under 6 of the largest linear weight + 6 MiB.
    # Any other tensor is read (1) and written. Closing the file: one copy buffer.
    bound = max(6 * synthetic["largest_linear"] + 3 * 8 * ERROR_CHUNK, synthetic["largest"], COPY_CHUNK) + SLACK
    assert peak <= bound, (peak / MiB, bound / MiB)
    assert bound < synthetic["total"] / 4
    assert report["total"]["tensors"] == 8 * 7
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *SIDE_FILES])

    # byte for byte the non-streaming path: every tensor in memory, one write_safetensors (quantized by the Numba
    # twin of the NumPy steps, bit-identical to them and faster)
    tensors = {}
    for fname in sorted({_shard(n) for n in _shapes(synthetic["cfg"])}):
        tensors.update(read_safetensors_raw(synthetic["base"] / fname)[0])
    expected = {}
    for name, w in tensors.items():
        if TARGET_PATTERN.search(name):
            expected.update(S.state_to_tensors(name, *quantize_4bit(w, double_quant=True, impl="numba")))
        else:
            expected[name] = w
    write_safetensors(tmp_path / "whole.safetensors", expected, {"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
