"""Small synthetic Llama GGUF files for tests, written with gguf-py's ``GGUFWriter`` (the format's own writer).

:func:`write_tiny_llama_gguf` writes a complete, loadable model of a few thousand parameters: llama metadata, a
byte-level BPE tokenizer (3 control tokens, the 256 byte-alphabet characters, a few merges), a chat template and
one tensor per Llama weight, quantized with ``gguf.quants.quantize`` into the ggml type asked for. The q/k
weights are stored with llama.cpp's row permutation (``convert_hf_to_gguf.py``, ``LlamaModel.permute``), written
out here independently of :mod:`lora_ref.files.gguf`, so an importer that forgets to undo it fails.

It returns the float32 weights a correct importer must produce, in transformers' names and order: each
``gguf.quants.dequantize(gguf.quants.quantize(w))`` of the *unpermuted* weight (rows are quantized
independently, so permuting rows commutes with quantization).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["write_tiny_llama_gguf", "TINY_CHAT_TEMPLATE"]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_chars() -> list[str]:
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py: weights.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(shape)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: str | os.PathLike, rng: np.random.Generator, *, arch: str = "llama",
                          linear_type: str = "Q4_1", embed_type: str = "Q8_0", norm_type: str = "F32",
                          tied: bool = True, layers: int = 1, hidden: int = 64, n_head: int = 4, n_kv: int = 2,
                          ffn: int = 96, extra_tensor: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF to ``path``; return the float32 weights an exact importer yields (HF names).

    ``linear_type``/``embed_type``/``norm_type`` are ggml type names (F32, F16, Q4_0, Q4_1, Q8_0, or any other
    type gguf-py can quantize, to test refusals). ``arch`` is written as ``general.architecture`` (metadata keys
    keep the ``llama.`` prefix only for ``llama``). ``extra_tensor=(name, type)`` adds one more tensor.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    chars = _byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars + [m.replace(" ", "") for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab = len(tokens)
    head_dim = hidden // n_head

    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    w.add_uint32(a + "block_count", layers)
    w.add_uint32(a + "context_length", 256)
    w.add_uint32(a + "embedding_length", hidden)
    w.add_uint32(a + "feed_forward_length", ffn)
    w.add_uint32(a + "attention.head_count", n_head)
    w.add_uint32(a + "attention.head_count_kv", n_kv)
    w.add_float32(a + "rope.freq_base", 10000.0)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(a + "vocab_size", vocab)
    w.add_uint32(a + "rope.dimension_count", head_dim)
    w.add_string("general.name", "tiny test llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", TINY_CHAT_TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, value: np.ndarray, type_name: str, permute_heads: int = 0):
        qtype = T[type_name]
        value = value.astype(np.float32)
        stored = _llama_cpp_permute(value, permute_heads) if permute_heads else value
        if qtype == T.F32:
            w.add_tensor(gguf_name, stored)
            expected[hf_name] = value.copy()
        elif qtype == T.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = value.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=qtype)
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).reshape(value.shape)

    def randn(*shape, scale=0.05):
        return rng.standard_normal(shape) * scale

    add("token_embd.weight", "model.embed_tokens.weight", randn(vocab, hidden, scale=1.0), embed_type)
    for i in range(layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", h + "input_layernorm.weight", 1 + randn(hidden), norm_type)
        add(b + "attn_q.weight", h + "self_attn.q_proj.weight", randn(n_head * head_dim, hidden), linear_type,
            n_head)
        add(b + "attn_k.weight", h + "self_attn.k_proj.weight", randn(n_kv * head_dim, hidden), linear_type, n_kv)
        add(b + "attn_v.weight", h + "self_attn.v_proj.weight", randn(n_kv * head_dim, hidden), linear_type)
        add(b + "attn_output.weight", h + "self_attn.o_proj.weight", randn(hidden, n_head * head_dim), linear_type)
        add(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + randn(hidden), norm_type)
        add(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", randn(ffn, hidden), linear_type)
        add(b + "ffn_up.weight", h + "mlp.up_proj.weight", randn(ffn, hidden), linear_type)
        add(b + "ffn_down.weight", h + "mlp.down_proj.weight", randn(hidden, ffn), linear_type)
    add("output_norm.weight", "model.norm.weight", 1 + randn(hidden), norm_type)
    if not tied:
        add("output.weight", "lm_head.weight", randn(vocab, hidden), linear_type)
    if extra_tensor is not None:
        add(extra_tensor[0], extra_tensor[0], randn(4, 32), extra_tensor[1])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
