"""Import a Llama GGUF file (llama.cpp's format) as a Hugging Face checkpoint folder.

A GGUF file is one container for everything a llama.cpp model needs: key/value metadata (architecture sizes, the
tokenizer's vocabulary and merges, the chat template) and the tensors, each stored in one of ggml's types — plain
float32/float16 or a *block quantization* such as Q4_1. Reading the container itself (header, key/value table,
tensor table, alignment) is the job of the format's own Python reader, ``gguf.GGUFReader`` (gguf-py, maintained
in the llama.cpp repository); lora_ref does not teach it. What lora_ref does write from first principles:

1. **Dequantization** (:func:`dequantize_q4_0`, :func:`dequantize_q4_1`, :func:`dequantize_q8_0`, and the trivial
   F32/F16 cases): a few lines of NumPy per type, with the block layout in each docstring. The layouts are
   ggml's ``block_q4_0``, ``block_q4_1`` and ``block_q8_0`` in ``ggml/src/ggml-common.h``; the reference
   decoders are ``dequantize_row_q4_0`` etc. in ``ggml/src/ggml-quants.c``. Results are bit-for-bit those of
   ``gguf.quants.dequantize`` (tested on random blocks with every special scale, and on every tensor of a real
   model). Why bit-exact is easy here: every product ``scale * code`` of a float16 scale (11 significant bits)
   and a 4- or 8-bit code fits in float32's 24 bits, so it is exact whatever order it is computed in; only Q4_1's
   ``+ min`` rounds, once, as in ggml.
2. **Renaming and reshaping** to transformers' Llama names (:data:`GGUF_TO_HF`). GGUF lists a tensor's
   dimensions fastest first (``ne[0]`` = the row length), so a ``[in, out]`` GGUF shape is the ``(out, in)``
   NumPy/PyTorch shape of ``nn.Linear.weight``.
3. **Undoing llama.cpp's row permutation of ``attn_q`` and ``attn_k``** (:func:`unpermute_qk`): llama.cpp applies
   rotary embeddings to *adjacent* pairs ``(x0, x1), (x2, x3), …`` while transformers' ``rotate_half`` pairs the
   two halves of each head ``(x0, x_{d/2}), …``; ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) therefore
   reorders the rows of q and k when it writes a GGUF. We apply the inverse.
4. **config.json, generation_config.json, tokenizer.json, tokenizer_config.json** from the metadata, so the
   folder loads in transformers and in :mod:`lora_ref.modeling.llama` like any HF checkpoint. The tokenizer is built with
   the ``tokenizers`` library the way transformers' own GGUF loader builds it
   (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so token ids agree with
   ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``.

The result is bit-for-bit the float32 state dict that ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...,
torch_dtype=torch.float32)`` produces (tested on SmolLM2-135M-Instruct). Remember what these weights are: the
*dequantized* GGUF release (for SmolLM2, Q4_1 linear weights and a Q8_0 embedding), not the original bf16
weights; quantization error measured against them starts from already-quantized values.

Only the ``llama`` architecture (Llama, SmolLM, Mistral-style GQA without biases) and the tensor types F32, F16,
Q4_0, Q4_1 and Q8_0 are imported; anything else is refused with a one-line ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "GGML_TYPES", "GGUF_TO_HF", "dequantize", "dequantize_f32", "dequantize_f16", "dequantize_q4_0",
    "dequantize_q4_1", "dequantize_q8_0", "unpermute_qk", "permute_qk", "read_gguf", "hf_name",
    "gguf_config", "build_tokenizer", "import_gguf",
]

# ---------------------------------------------------------------------------------------------------------------
# Dequantization, one function per type.  Each takes the raw bytes of N blocks as a uint8 array of shape
# (N, bytes_per_block) and returns float32 values of shape (N, values_per_block).
# ---------------------------------------------------------------------------------------------------------------


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bytes ``start:start+2`` of every block read as one little-endian float16, widened to float32, shape (N, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes per block -> 32 codes 0..15, in ggml's order.

    ggml packs the *first half* of the block into the low nibbles and the *second half* into the high nibbles:
    byte ``j`` holds code ``j`` in bits 0-3 and code ``j + 16`` in bits 4-7 (not codes 2j and 2j+1).
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: no blocks, 4 bytes per value, little-endian IEEE float32. Returned as is (a copy)."""
    return np.ascontiguousarray(blocks).view("<f4").astype(np.float32)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: no blocks, 2 bytes per value, little-endian IEEE float16, widened exactly to float32."""
    return np.ascontiguousarray(blocks).view("<f2").astype(np.float32)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 values in 34 bytes, ``x = d * q``.

    Layout of one block (``block_q8_0``)::

        bytes 0-1   d       float16 scale (absmax / 127 when llama.cpp quantized it)
        bytes 2-33  q[32]   int8 codes, in order

    8.5 bits per value. The product of an int8 and a float16 is exact in float32.
    """
    d = _f16_field(blocks, 0)
    q = np.ascontiguousarray(blocks[:, 2:34]).view(np.int8).astype(np.float32)
    return q * d


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 values in 18 bytes, ``x = d * (q - 8)``, a symmetric 4-bit code.

    Layout of one block (``block_q4_0``)::

        bytes 0-1   d       float16 scale (llama.cpp writes max / -8, where max is the value of largest |x|,
                            so d is often negative)
        bytes 2-17  qs[16]  codes 0..15; byte j: low nibble = value j, high nibble = value j + 16

    4.5 bits per value. ``q - 8`` runs from -8 to 7; its product with d is exact in float32.
    """
    d = _f16_field(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 values in 20 bytes, ``x = d * q + m``, an asymmetric 4-bit code (scale and offset).

    Layout of one block (``block_q4_1``)::

        bytes 0-1   d       float16 scale ((max - min) / 15 when llama.cpp quantized it)
        bytes 2-3   m       float16 offset (the block's min)
        bytes 4-19  qs[16]  codes 0..15; byte j: low nibble = value j, high nibble = value j + 16

    5 bits per value. ``d * q`` is exact in float32; adding ``m`` rounds once (float32, round to nearest even),
    exactly as ggml's ``dequantize_row_q4_1`` and gguf-py do — no fused multiply-add.
    """
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).astype(np.float32)
    return d * q + m


# ggml type id (``enum ggml_type`` in ggml.h) -> (name, values per block, bytes per block, decoder)
GGML_TYPES: dict[int, tuple[str, int, int, Callable[[np.ndarray], np.ndarray]]] = {
    0: ("F32", 1, 4, dequantize_f32),
    1: ("F16", 1, 2, dequantize_f16),
    2: ("Q4_0", 32, 18, dequantize_q4_0),
    3: ("Q4_1", 32, 20, dequantize_q4_1),
    8: ("Q8_0", 32, 34, dequantize_q8_0),
}


def _type_name(ggml_type: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(ggml_type)).name
    except (ImportError, ValueError):
        return f"type {int(ggml_type)}"


def _check_type(ggml_type: int, what: str = "tensor") -> tuple[str, int, int, Callable]:
    entry = GGML_TYPES.get(int(ggml_type))
    if entry is None:
        supported = ", ".join(v[0] for v in GGML_TYPES.values())
        raise ValueError(f"{what} has GGUF tensor type {_type_name(ggml_type)}, which lora_ref cannot import "
                         f"(supported: {supported})")
    return entry


def dequantize(raw, ggml_type: int, shape) -> np.ndarray:
    """Decode the raw bytes of one tensor of ggml type ``ggml_type`` into float32 of NumPy ``shape``.

    ``raw`` is ``bytes``, a ``memoryview`` or any NumPy array (its bytes are used as they are in memory, e.g. the
    ``uint8`` or ``float32`` memmap that ``gguf.GGUFReader`` gives). ``shape`` is slowest-dimension first (the
    reverse of the GGUF listing); for a block type the last dimension must be a multiple of the block length,
    as ggml requires. Returns a new C-contiguous float32 array.
    """
    name, per_block, block_bytes, decode = _check_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if per_block > 1 and shape and shape[-1] % per_block:
        raise ValueError(f"{name} rows must be a multiple of {per_block} values, got shape {shape}")
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = n // per_block * block_bytes
    if data.size != expected:
        raise ValueError(f"{name} tensor of shape {shape} needs {expected} bytes, got {data.size}")
    with np.errstate(invalid="ignore", over="ignore"):  # an inf scale times a zero code is NaN, as in ggml
        return decode(data.reshape(-1, block_bytes)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Names and the q/k permutation
# ---------------------------------------------------------------------------------------------------------------

# GGUF tensor name (llama.cpp's ``gguf-py/gguf/tensor_mapping.py``) -> transformers' LlamaForCausalLM name.
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ``ValueError`` for unknown names."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, rest = m.groups()
        if rest in GGUF_TO_HF and "." not in rest[:-len(".weight")]:
            return f"model.layers.{int(layer)}.{GGUF_TO_HF[rest]}"
    elif gguf_name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        return GGUF_TO_HF[gguf_name]
    raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a Llama model that lora_ref can import")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (``convert_hf_to_gguf.py``, ``LlamaModel.permute``), for tests.

    Within each head of ``head_dim = out / n_head`` rows, row ``i`` of the first half and row ``i`` of the second
    half become neighbours: HF rows ``[0, d/2, 1, d/2 + 1, …]`` in that order.
    """
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: GGUF's interleaved rows back to transformers' half-split order.

    ``n_head`` is the number of heads the matrix holds: ``num_attention_heads`` for q, ``num_key_value_heads``
    for k. View the rows as (head, pair index i, which of the pair, …) and swap the last two row axes, so each
    head lists all first elements of its pairs, then all second elements.
    """
    out = w.shape[0]
    if n_head <= 0 or out % (2 * n_head):
        raise ValueError(f"cannot undo the q/k permutation: {out} rows are not 2 * {n_head} heads * head_dim/2")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# The container (read with gguf-py) and the metadata
# ---------------------------------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike):
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped: tensor data is read only when used).

    Any failure to parse — not a GGUF file, a truncated file, a damaged table — becomes one ``ValueError``
    naming the file. Tensors whose bytes run past the end of the file are caught here too.
    """
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"GGUF file not found: {p}" if not p.exists() else f"not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"not a GGUF file (it does not start with the bytes 'GGUF'): {p}")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, struct errors on damage
        raise ValueError(f"cannot read GGUF file {p} (truncated or damaged?): {' '.join(str(e).split())}") from None
    if getattr(reader, "byte_order", "I") == "S":
        raise ValueError(f"big-endian GGUF files are not supported: {p}")
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise ValueError(f"GGUF file is truncated: tensor {t.name!r} runs past the end of {p}")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32_decimal(x: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores 1e-5 as float32 9.99999974e-06."""
    return float(str(np.float32(x)))


def gguf_config(reader) -> dict:
    """The transformers ``LlamaForCausalLM`` config.json dict described by the GGUF metadata.

    Keys as llama.cpp writes them (``gguf-py/gguf/constants.py``: ``{arch}.block_count`` etc.). Floats stored as
    float32 in GGUF (rms eps, rope theta) are written as the shortest decimal with the same float32 value
    (1e-05, not 9.999999747378752e-06): the value the original config held, and the same number in float32.
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; lora_ref imports 'llama' models only")
    a = "llama."
    need = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length"]
    missing = [a + k for k in need if _field(reader, a + k) is None]
    if missing:
        raise ValueError(f"GGUF metadata is missing {', '.join(missing)}")
    n_head = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
    d = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "attention.key_length", _field(reader, a + "rope.dimension_count", d // n_head)))
    if _field(reader, a + "rope.scaling.type") not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {_field(reader, a + 'rope.scaling.type')!r} is not supported")
    if _field(reader, a + "expert_count") not in (None, 0):
        raise ValueError("GGUF llama model with experts (mixture of experts) is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ValueError("GGUF metadata gives no vocabulary size (no llama.vocab_size, no tokenizer.ggml.tokens)")
    tied = all(t.name != "output.weight" for t in reader.tensors)

    def tok_id(key):
        v = _field(reader, f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, a + "context_length")),
        "rms_norm_eps": _f32_decimal(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _f32_decimal(_field(reader, a + "rope.freq_base", 10000.0))},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": tok_id("bos_token_id"),
        "eos_token_id": tok_id("eos_token_id"),
        "pad_token_id": tok_id("padding_token_id"),
        "dtype": "float32",
    }
    return config


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
"""Three of llama.cpp's token types (``enum llama_token_type``: 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte), stored per token in ``tokenizer.ggml.token_type``; the others are read as normal tokens."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode`` in openai/gpt-2 ``encoder.py``).

    Byte-level BPE works on bytes, but vocabularies are stored as text, so every byte gets a visible stand-in:
    the 188 printable Latin-1 bytes stand for themselves, the other 68 (controls, space, …) are moved to
    code points 256, 257, … in byte order. A space is therefore spelled ``Ġ`` (U+0120).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` for a GGUF whose ``tokenizer.ggml.model`` is ``gpt2`` (byte-level BPE).

    Built as transformers' GGUF loader builds it (``byte_level_tokenizer`` + ``add_gguf_special_tokens`` in
    ``transformers/integrations/gguf/gguf_tokenizer_mapping.py``, on top of ``GPT2Tokenizer``):

    - model: BPE over the file's tokens (ids = positions) and merges (``"a b"`` strings, best first), no unknown
      token, no subword prefix/suffix. A token with a character outside the byte alphabet is respelled
      byte by byte, so the vocabulary is in the alphabet the BPE model works in.
    - pre-tokenizer: GPT-2's ``ByteLevel`` (its regex splits words, numbers, punctuation and whitespace runs,
      then maps bytes to the alphabet), no prefix space. For pre-tokenizer names that transformers maps to a
      regex of their own (llama3, qwen2, …) it uses that ``Split``; SmolLM's ``smollm`` is not among them, so the
      plain GPT-2 regex applies. (llama.cpp's ``smollm`` pre-tokenizer and SmolLM's original ``tokenizer.json``
      also split digits one by one; GPT-2's regex keeps a run of digits together, but SmolLM2's vocabulary has
      only the ten single digits and no merge that joins a digit to anything, so the ids come out the same.)
    - decoder: ``ByteLevel`` (alphabet back to bytes, then UTF-8).
    - post-processor: ``bos`` before / ``eos`` after a sequence if ``tokenizer.ggml.add_bos_token`` /
      ``add_eos_token`` say so (SmolLM2: neither).
    - added tokens: every CONTROL token (type 3) spelled in the byte alphabet becomes a special token (matched
      whole in text, skipped by ``decode(skip_special_tokens=True)``); every USER_DEFINED one (type 4) a normal
      added token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer type {kind!r} is not supported; lora_ref imports byte-level BPE ('gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in (None, "default", "gpt2", "smollm"):
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: gpt2, smollm)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())

    def respell(tok: str) -> str:
        return tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    def token_id(key):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None and not 0 <= int(v) < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{key} = {int(v)} is outside the vocabulary of {len(tokens)}")
        return None if v is None else int(v)

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and bos_id is None or add_eos and eos_id is None:
        raise ValueError("GGUF metadata asks to add a bos/eos token but names no bos/eos token id")
    bos = respell(tokens[bos_id]) if add_bos else None
    eos = respell(tokens[eos_id]) if add_eos else None
    single = ([bos] if add_bos else []) + ["$A:0"] + ([eos] if add_eos else [])
    pair = single + [s if s != "$A:0" else "$B:1" for s in single]
    special = {}
    if add_bos:
        special[bos] = bos_id
    if add_eos:
        special[eos] = eos_id
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if int(ty) == TOKEN_CONTROL and set(t) <= spelled]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if int(ty) == TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok


def _tokenizer_files(reader, config: dict) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents."""
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(key):
        v = _field(reader, f"tokenizer.ggml.{key}")
        return None if v is None else tokens[int(v)]

    special = {k: token(v) for k, v in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                         ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    special = {k: v for k, v in special.items() if v is not None}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {"tokenizer_config.json": tok_config, "special_tokens_map.json": special, "generation_config.json": gen}


# ---------------------------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------------------------


def _check_tensors(reader, config: dict) -> None:
    """Refuse before anything is written: unknown names, unsupported types, shapes that do not fit the config."""
    L, d, ff = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    hd, nh, nkv, V = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"], \
        config["vocab_size"]
    expect = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        expect.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (nh * hd, d), p + "self_attn.k_proj.weight": (nkv * hd, d),
                       p + "self_attn.v_proj.weight": (nkv * hd, d), p + "self_attn.o_proj.weight": (d, nh * hd),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                       p + "mlp.down_proj.weight": (d, ff)})
    seen = set()
    for t in reader.tensors:
        name = hf_name(t.name)
        _check_type(t.tensor_type, f"tensor {t.name!r}")
        shape = tuple(reversed([int(s) for s in t.shape]))
        if name not in expect:
            raise ValueError(f"GGUF tensor {t.name!r} does not fit a {L}-layer model")
        if shape != expect[name]:
            raise ValueError(f"GGUF tensor {t.name!r} has shape {shape}, expected {expect[name]} from the metadata")
        seen.add(name)
    missing = sorted(set(expect) - seen - {"lm_head.weight"})
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensor(s) of a Llama model, e.g. {missing[0]}")


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write the HF checkpoint folder of the Llama GGUF file ``path`` into ``out_dir`` (missing or empty).

    Files written: ``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` (float32, transformers' names,
    no ``lm_head.weight`` when the embeddings are tied), ``generation_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json`` (with the ``chat_template`` when the file has one) and ``special_tokens_map.json``.
    Everything is checked (architecture, tensor names, types, shapes, tokenizer) before the first tensor is
    decoded, and the folder appears only when complete (:func:`lora_ref.files.outputs.output_dir`).

    ``progress(done, total, gguf_name)`` is called after each tensor. Memory: the file is memory-mapped and
    tensors are decoded one at a time, so the peak is about the float32 model plus what the safetensors writer
    needs to lay it out, never a second copy of the quantized file. Returns the folder's path.
    """
    from lora_ref.files.outputs import check_out_dir, output_dir, write_json
    from lora_ref.files.safetensors import write_safetensors

    check_out_dir(out_dir)
    reader = read_gguf(path)
    config = gguf_config(reader)
    _check_tensors(reader, config)
    tokenizer = build_tokenizer(reader)
    extra = _tokenizer_files(reader, config)
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        shape = tuple(reversed([int(s) for s in t.shape]))
        w = dequantize(t.data, int(t.tensor_type), shape)
        if t.name.endswith(".attn_q.weight"):
            w = np.ascontiguousarray(unpermute_qk(w, nh))
        elif t.name.endswith(".attn_k.weight"):
            w = np.ascontiguousarray(unpermute_qk(w, nkv))
        tensors[hf_name(t.name)] = w
        if progress is not None:
            progress(i + 1, total, t.name)
    with output_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        del tensors
        write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, obj in extra.items():
            write_json(tmp / name, obj)
    return Path(out_dir)


def describe(path: str | os.PathLike) -> dict:
    """A short summary of a GGUF file (architecture, name, tensor types) for messages and ``--json`` output."""
    reader = read_gguf(path)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[_type_name(t.tensor_type)] = counts.get(_type_name(t.tensor_type), 0) + 1
    return {"architecture": _field(reader, "general.architecture"), "name": _field(reader, "general.name"),
            "tensors": len(reader.tensors), "tensor_types": counts}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(describe(sys.argv[1]), indent=2))
