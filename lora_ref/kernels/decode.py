"""Compiled one-token decode: every layer of a Llama and its head for one position, in one call per token.

Decoding one token reads every weight matrix once and multiplies it by one vector (a GEMV): two flops per weight
read, far below what the cores can do, so the step is bound by memory bandwidth. Everything else is overhead to
remove: Python dispatch between ~250 small operations per token, temporary arrays, and extra passes over data.

- :func:`layer_step` runs one decoder layer as the readable twin (:mod:`lora_ref.kernels.decode_reference`) says,
  in five parallel loops over output rows: q, k and v rows together; attention over the cached positions (one
  query head per iteration, RoPE applied to the new query and key and the new key/value written into the
  preallocated cache); the o rows with the residual add; gate and up rows together, each pair giving one
  silu(g)·u; the down rows with the residual add. No temporary is larger than one row.
- :func:`decode_step` runs *all* layers and the head in one compiled call, with the layers' weights held in
  Numba typed lists (:func:`weight_list`), so a token costs one Python call however deep the model is.
- Weights are float32 matrices or 4-bit ones (:class:`~lora_ref.kernels.decode_reference.Weight4bit`). A 4-bit row
  is decoded and dotted with the input in one pass over the row (the fused NF4 GEMV): on AVX-512 and AVX2 CPUs
  16 codes at a time through a table held in registers (one ``vpermps`` with AVX-512, ``vpshufb`` on the table's
  four byte planes with AVX2), the decoded weights multiplied by the input and added
  into 32 running sums without leaving the registers (:func:`lora_ref.kernels.jit.lut16_fma16`; it takes each
  group of 32 elements as 16 even then 16 odd ones, so the input vector is reordered once per product instead;
  each row used to go through an L1 buffer; on AVX2 CPUs without AVX-512 :func:`lora_ref.kernels.jit.lut16_block_dot`
  dots each block's unscaled codes with x and scales the partial sums once, x reordered to its order),
  elsewhere through the block's scaled 16-entry table into an L1-resident buffer;
  double-quantized scales are decoded inline (one 8-bit lookup per block of 64 weights), so the bytes read are
  the bytes stored.
- :func:`head_step` (final RMSNorm + logits) reads the head once per token, parallel over vocabulary rows; for a
  tied head that is the embedding matrix, read once.

Sums are float32 and their order differs from the twin (``fastmath`` is limited to reassociation and
contraction, so infinities and NaNs keep their meaning); on the AVX2 block path each block's scale also
multiplies the block's partial sum instead of each weight. ``tests/kernels/test_decode_kernels.py`` holds the two
equal, also with ``NUMBA_DISABLE_JIT=1``. Measured by ``lora-ref bench decode`` (rows ``real_decode_fp32``,
``real_decode_nf4`` and their roofline rows); the decode loop that calls these is
:class:`lora_ref.modeling.decode.Decoder`.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import config, njit, prange, types
from numba.extending import overload

from lora_ref.kernels import decode_reference, switch
from lora_ref.kernels.decode_reference import Weight4bit
from lora_ref.kernels.jit import (
    BLOCK_DOT,
    FAST_MATH,
    HAS_LUT16,
    block_fma,
    prefer_wide_vectors,
    prefetch_codes,
    stack_tile_f32,
    sum32,
)

__all__ = ["layer_step", "head_step", "decode_step", "weight_list", "readonly", "PICK", "pick"]

F32 = np.float32
U64 = np.uint64
"""Inner loops index with unsigned integers: Numba wraps a negative signed index, and that check stops LLVM from
vectorizing the loop (measured: a float32 GEMV over SmolLM2's head at 4.6 GB/s with signed, 7.3 with unsigned)."""
ROWS_PER_CHUNK = 16
"""Output rows per parallel work item (each item decodes a 4-bit row into its own buffer)."""


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a`` (no copy): every weight is passed as one array type, so each kernel compiles once
    whether the weights were loaded from a file (read-only) or computed (writable)."""
    v = a.view()
    v.flags.writeable = False
    return v


def weight_list(items):
    """A Numba typed list of ``items`` (all float32 matrices, or all :class:`Weight4bit`): one argument that
    Numba types in constant time, however many layers it holds. A plain list without the JIT."""
    items = list(items)
    if config.DISABLE_JIT:
        return items
    from numba.typed import List

    out = List()
    for w in items:
        out.append(w)
    return out


# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _rms_norm(x, w, eps, out):
    """out = x · (1/√(mean(x²) + ε)) ⊙ w over one vector."""
    n = x.shape[0]
    s = F32(0.0)
    for i in range(U64(n)):
        s += x[i] * x[i]
    r = F32(1.0) / np.sqrt(s / F32(n) + eps)
    for i in range(n):
        out[i] = (x[i] * r) * w[i]


@njit(cache=True, inline="always")
def _evens_then_odds(x, out, group):
    """out = x with each group of ``group`` elements as its even-indexed then its odd-indexed ones: the order the
    4-bit block decoder reads (:data:`LANE_GROUP`)."""
    half = group // 2
    for g in range(x.shape[0] // group):
        for j in range(half):
            out[group * g + j] = x[group * g + 2 * j]
            out[group * g + half + j] = x[group * g + 2 * j + 1]


LANE_GROUP = 8 if BLOCK_DOT else 32
"""x is read in groups of 32 as 16 even then 16 odd elements by :func:`lora_ref.kernels.jit.lut16_fma16` (split
order), in groups of 8 as 4 even then 4 odd by :func:`lora_ref.kernels.jit.lut16_block_dot` (``BLOCK_DOT_ORDER``)."""


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _dot_f32(w, r, x):
    """Σ_k w[r, k] · x[k] as one running sum, which ``reassoc`` lets LLVM's vectorizer split into several vector
    accumulators itself. A form with four interleaved sums (so that consecutive multiply-adds do not wait for each
    other) was slower on both CPUs measured, 2 threads:

    - AMD Zen 3 (AVX2; best of 10-30 calls): LLVM's AVX2 code de-interleaved the four strided sums with permutes
      and blends and spilled to the stack; :func:`head_step` over SmolLM2's tied head (49,152 × 576, 113 MB)
      10.0 ms with four sums, 4.4 ms with one (11.3 → 25.7 GB/s; OpenBLAS's sgemv 4.2-4.8 ms); the bare row loop
      without the RMSNorm, 20.5 → 34.9 GB/s on that matrix and 10.1 → 23.8 GB/s on a 576 × 1536 one.
    - Intel Xeon with AVX-512 (where the four sums had been kept; best of 16 calls over 8 copies of that head,
      read from memory): the bare row loop, either form inlined into the same parallel loop, 5.1-6.0 ms with four
      sums, 3.8-4.2 ms with one (NumPy's sgemv 3.9-4.0 ms); the float32 decode step of SmolLM2 with
      :func:`_dot_rows` inlined (median of 64 steps, best of 5 runs, two alternations) 31.4-32.2 ms with four sums
      against 25.3-25.9 ms with one."""
    row = w[r]
    acc = F32(0.0)
    for k in range(U64(row.shape[0])):
        acc += row[k] * x[k]
    return acc


@njit(cache=True, inline="always")
def _decode_block_table(w, byte0, half, s, buf, out0):
    """The ``half`` bytes of one block (from ``byte0``) scaled by s into buf[out0:] in element order, through the
    block's scaled 16-entry table (CPUs without AVX-512 or AVX2)."""
    table = np.empty(16, np.float32)
    for c in range(16):
        table[c] = w.code[c] * s
    for j in range(half):
        byte = np.int64(w.packed[byte0 + j])
        buf[out0 + 2 * j] = table[byte >> 4]
        buf[out0 + 2 * j + 1] = table[byte & 15]


@njit(cache=True, inline="always")
def _add_block_permute(w, byte0, half, s, buf, out0, xs, acc):
    """The block's weights times xs (in :data:`LANE_GROUP` order) added into the 32 running sums ``acc``: decoded
    in registers (:func:`lora_ref.kernels.jit.lut16_fma16`), never written to ``buf``. On AVX2 CPUs without
    AVX-512 the block's unscaled codes are dotted with xs and the partial sums scaled once
    (:func:`lora_ref.kernels.jit.lut16_block_dot`, xs in its order). Both through
    :func:`lora_ref.kernels.jit.block_fma`, which first prefetches the codes ahead."""
    block_fma(w.packed, byte0, half, w.code, s, xs, out0, acc)


@njit(cache=True, inline="always")
def _add_block_table(w, byte0, half, s, buf, out0, xs, acc):
    """The block decoded into ``buf`` (its dot product with x follows in :func:`_aligned_total_table`), its codes
    prefetched ahead first."""
    prefetch_codes(w.packed, byte0, half)
    _decode_block_table(w, byte0, half, s, buf, out0)


@njit(cache=True, inline="always")
def _aligned_total_permute(buf, xs, K, acc):
    """The row's dot product: the 32 running sums added up."""
    return sum32(acc)


@njit(cache=True, inline="always")
def _aligned_total_table(buf, xs, K, acc):
    """The row's dot product: the decoded row in ``buf`` times x."""
    tot = F32(0.0)
    for k in range(U64(K)):
        tot += buf[k] * xs[k]
    return tot


_add_block = _add_block_permute if HAS_LUT16 else _add_block_table
_aligned_total = _aligned_total_permute if HAS_LUT16 else _aligned_total_table
_acc32 = stack_tile_f32(1, 32)
SPLIT_ORDER = HAS_LUT16
"""Whether aligned 4-bit rows read their input vector reordered (:func:`_evens_then_odds`, :data:`LANE_GROUP`)."""


@njit(cache=True, inline="always")
def _scale(w, blk):
    """The float32 scale of block ``blk`` of a 4-bit weight (double-quantized scales decoded in bitsandbytes' order)."""
    if w.nested:
        return w.code2[w.qabsmax[blk]] * w.absmax2[blk // w.blocksize2] + F32(w.offset)
    return w.absmax[blk]


@njit(cache=True, inline="always")
def _decode_row_any(w, r, buf):
    """Row r of any 4-bit weight into buf in element order, element by element (odd sizes, partial blocks)."""
    start = r * w.k
    for p in range(w.k):
        i = start + p
        byte = np.int64(w.packed[i >> 1])
        c = (byte >> 4) if (i & 1) == 0 else (byte & 15)
        buf[p] = w.code[c] * _scale(w, i // w.blocksize)


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _dot_rows_f32(w, r0, r1, x, dst):
    """dst[i] = row r0 + i of a float32 W dotted with x."""
    for r in range(r0, r1):
        dst[r - r0] = _dot_f32(w, r, x)


@njit(cache=True, inline="always")
def _aligned_rows(w, r0, r1, half, nested, buf, xs, acc, dst):
    """dst[i] = row r0 + i dotted with x for rows on block boundaries (``half`` bytes per block): every block into
    the running sums ``acc`` or ``buf`` (:data:`_add_block`), then the row's total (:data:`_aligned_total`).
    ``half`` and ``nested`` (``w.nested``) are literals at the call sites, so the block loop holds neither branch;
    the nested scales' index (block j2 of the second level, rem blocks into it) is found with one division per
    call and then advanced block by block across the rows. Before, each row paid two integer divisions (SmolLM2's
    rows have only 9 or 24 blocks of 64) and each block a test of ``nested`` and signed-index fix-ups: the NF4
    decode step of SmolLM2-135M (Intel Xeon with AVX-512, 2 threads, median of 64 steps, best of 5, three
    alternating processes each) 10.8-12.7 ms before, 9.6-10.3 ms after."""
    nb, kbytes = U64(w.k // w.blocksize), U64(w.k // 2)
    bs2 = U64(w.blocksize2) if nested else U64(1)
    offset = F32(w.offset)
    blk = U64(r0) * nb                                                 # the first block of row r
    j2 = blk // bs2
    rem = blk - j2 * bs2
    for r in range(r0, r1):
        for lane in range(32):
            acc[lane] = F32(0.0)
        byte0 = U64(r) * kbytes
        for b in range(nb):
            if nested:
                s = w.code2[w.qabsmax[blk + b]] * w.absmax2[j2] + offset
                rem += U64(1)
                if rem == bs2:
                    rem = U64(0)
                    j2 += U64(1)
            else:
                s = w.absmax[blk + b]
            _add_block(w, byte0 + b * U64(half), U64(half), s, buf, U64(2 * half) * b, xs, acc)
        dst[r - r0] = _aligned_total(buf, xs, w.k, acc)
        blk += nb


@njit(cache=True, fastmath=FAST_MATH)
def _dot_rows_4bit(w, r0, r1, x, xs, buf, dst):
    """dst[i] = row r0 + i of a 4-bit W dotted with x. Rows on block boundaries take the block decoder (with
    ``xs``, x in its order, :func:`_aligned_rows`): on AVX-512 and AVX2 CPUs each block goes straight into 32
    running sums (:func:`_add_block_permute`: its weights, or on AVX2 without AVX-512 its unscaled codes times x,
    scaled once), elsewhere the row is decoded into ``buf`` (L1) and summed against x. Other rows decode element
    by element into ``buf``, then one vectorized sum."""
    prefer_wide_vectors()
    acc = _acc32()[0]                                                  # (32,) running sums, on the stack
    K, bs = w.k, w.blocksize
    if K % bs == 0 and bs % 32 == 0:
        if bs == 64:        # QLoRA's blocksize as a literal: each block straight-line code (block_fma)
            if w.nested:
                _aligned_rows(w, r0, r1, 32, True, buf, xs, acc, dst)
            else:
                _aligned_rows(w, r0, r1, 32, False, buf, xs, acc, dst)
        elif w.nested:
            _aligned_rows(w, r0, r1, bs // 2, True, buf, xs, acc, dst)
        else:
            _aligned_rows(w, r0, r1, bs // 2, False, buf, xs, acc, dst)
        return
    for r in range(r0, r1):
        _decode_row_any(w, r, buf)
        tot = F32(0.0)
        for k in range(U64(K)):
            tot += buf[k] * x[k]
        dst[r - r0] = tot


def _dot_rows(w, r0, r1, x, xs, buf, dst):
    """dst[i] = row r0 + i of W (float32 matrix or :class:`Weight4bit`) dotted with x, rows r0 … r1 − 1: one call
    per chunk of rows. The compiled version is chosen by the weight's Numba type, and inlined into the calling
    loop, as :func:`_dot_rows_f32` is into it: called across a function boundary, the float32 rows ran about a
    quarter slower on an Intel Xeon with AVX-512, with one running sum in both cases (SmolLM2's head: a parallel
    loop calling :func:`_dot_rows_f32` 5.1 ms when it was a separate function, 3.8 ms inlined; :func:`head_step`
    5.4 ms with this overload not inlined, 4.6 ms inlined)."""
    if isinstance(w, Weight4bit):
        _dot_rows_4bit(w, r0, r1, x, xs, buf, dst)
    else:
        _dot_rows_f32(w, r0, r1, x, dst)


def _dot_rows_typed(w, r0, r1, x, xs, buf, dst):
    if isinstance(w, types.BaseTuple):
        return lambda w, r0, r1, x, xs, buf, dst: _dot_rows_4bit(w, r0, r1, x, xs, buf, dst)
    return lambda w, r0, r1, x, xs, buf, dst: _dot_rows_f32(w, r0, r1, x, dst)


overload(_dot_rows, inline="always")(_dot_rows_typed)


def _prepare(x, xs):
    """xs = x in the aligned 4-bit decoder's order (a copy when that order is element order)."""
    if SPLIT_ORDER and x.shape[0] % 32 == 0:
        _evens_then_odds(x, xs, LANE_GROUP)
    else:
        xs[:] = x


def _prepare_typed(x, xs):
    if SPLIT_ORDER:
        def impl(x, xs):
            if x.shape[0] % 32 == 0:
                _evens_then_odds(x, xs, LANE_GROUP)
            else:
                xs[:] = x
        return impl

    def copy(x, xs):
        for i in range(x.shape[0]):
            xs[i] = x[i]
    return copy


overload(_prepare)(_prepare_typed)


def _rows(w):
    """Output rows of W (float32 matrix or :class:`Weight4bit`)."""
    return w.n if isinstance(w, Weight4bit) else w.shape[0]


def _rows_typed(w):
    if isinstance(w, types.BaseTuple):
        return lambda w: w.n
    return lambda w: w.shape[0]


overload(_rows)(_rows_typed)


@njit(cache=True, inline="always")
def _chunks(n):
    return (n + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _attend_head(qkv, hq, G, NQ, NK, Dh, ck, cv, pos, cos, sin, scale, out):
    """Query head hq at position pos: rotate it, softmax(q · K_{0..pos} · scale) V_{0..pos} into out[hq·Dh:]."""
    half = Dh // 2
    kv = hq // G
    q = np.empty(Dh, np.float32)
    o = hq * Dh
    for i in range(half):
        a, b = qkv[o + i], qkv[o + half + i]
        q[i] = a * cos[i] - b * sin[i]
        q[half + i] = b * cos[half + i] + a * sin[half + i]
    S = pos + 1
    p = np.empty(S, np.float32)
    m = F32(-np.inf)
    for s in range(S):
        d = F32(0.0)
        for i in range(U64(Dh)):
            d += q[i] * ck[kv, s, i]
        d *= scale
        p[s] = d
        m = max(m, d)
    total = F32(0.0)
    for s in range(S):
        e = np.exp(p[s] - m)
        p[s] = e
        total += e
    dst = out[o:o + Dh]
    dst[:] = F32(0.0)
    for s in range(S):
        ws = p[s] / total
        for i in range(U64(Dh)):
            dst[i] += ws * cv[kv, s, i]


@njit(cache=True, inline="always")
def _store_kv(qkv, NQ, NK, Dh, ck, cv, pos, cos, sin):
    """Rotate the new keys and write them and the new values at position pos of the layer's cache."""
    half = Dh // 2
    for h in range(NK // Dh):
        o = NQ + h * Dh
        for i in range(half):
            a, b = qkv[o + i], qkv[o + half + i]
            ck[h, pos, i] = a * cos[i] - b * sin[i]
            ck[h, pos, half + i] = b * cos[half + i] + a * sin[half + i]
        for i in range(Dh):
            cv[h, pos, i] = qkv[NQ + NK + h * Dh + i]


# ---------------------------------------------------------------------------------------------------------------
# one layer, all layers, the head
# ---------------------------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True, fastmath=FAST_MATH)
def _layer(x, n1, n2, wq, wk, wv, wo, wg, wu, wd, ck, cv, pos, cos, sin, eps, scale):
    """One decoder layer in five parallel loops (see the module docstring); x, ck, cv updated in place."""
    D = x.shape[0]
    NQ, NK, F = _rows(wq), _rows(wk), _rows(wg)
    Dh = ck.shape[2]
    K_max = max(D, NQ, F)
    R = ROWS_PER_CHUNK
    h = np.empty(D, np.float32)
    hs = np.empty(D, np.float32)
    _rms_norm(x, n1, eps, h)
    _prepare(h, hs)
    qkv = np.empty(NQ + 2 * NK, np.float32)
    cq, ckv = _chunks(NQ), _chunks(NK)
    for c in prange(cq + 2 * ckv):                                 # q, k and v rows
        prefer_wide_vectors()
        buf = np.empty(K_max, np.float32)
        if c < cq:
            r0 = c * R
            r1 = min(NQ, r0 + R)
            _dot_rows(wq, r0, r1, h, hs, buf, qkv[r0:r1])
        elif c < cq + ckv:
            r0 = (c - cq) * R
            r1 = min(NK, r0 + R)
            _dot_rows(wk, r0, r1, h, hs, buf, qkv[NQ + r0:NQ + r1])
        else:
            r0 = (c - cq - ckv) * R
            r1 = min(NK, r0 + R)
            _dot_rows(wv, r0, r1, h, hs, buf, qkv[NQ + NK + r0:NQ + NK + r1])
    _store_kv(qkv, NQ, NK, Dh, ck, cv, pos, cos, sin)
    attn = np.empty(NQ, np.float32)
    H = NQ // Dh
    G = H // (NK // Dh)
    for hq in prange(H):                                           # one query head per iteration
        _attend_head(qkv, hq, G, NQ, NK, Dh, ck, cv, pos, cos, sin, scale, attn)
    attn_s = np.empty(NQ, np.float32)
    _prepare(attn, attn_s)
    for c in prange(_chunks(D)):                                   # o rows, + residual
        prefer_wide_vectors()
        buf = np.empty(K_max, np.float32)
        part = np.empty(R, np.float32)
        r0 = c * R
        r1 = min(D, r0 + R)
        _dot_rows(wo, r0, r1, attn, attn_s, buf, part)
        for i in range(r1 - r0):
            x[r0 + i] += part[i]
    _rms_norm(x, n2, eps, h)
    _prepare(h, hs)
    act = np.empty(F, np.float32)
    for c in prange(_chunks(F)):                                   # gate and up rows: silu(g) · u
        prefer_wide_vectors()
        buf = np.empty(K_max, np.float32)
        g = np.empty(R, np.float32)
        u = np.empty(R, np.float32)
        r0 = c * R
        r1 = min(F, r0 + R)
        _dot_rows(wg, r0, r1, h, hs, buf, g)
        _dot_rows(wu, r0, r1, h, hs, buf, u)
        for i in range(r1 - r0):
            act[r0 + i] = g[i] / (F32(1.0) + np.exp(-g[i])) * u[i]
    act_s = np.empty(F, np.float32)
    _prepare(act, act_s)
    for c in prange(_chunks(D)):                                   # down rows, + residual
        prefer_wide_vectors()
        buf = np.empty(K_max, np.float32)
        part = np.empty(R, np.float32)
        r0 = c * R
        r1 = min(D, r0 + R)
        _dot_rows(wd, r0, r1, act, act_s, buf, part)
        for i in range(r1 - r0):
            x[r0 + i] += part[i]


@njit(cache=True, parallel=True, fastmath=FAST_MATH)
def _head(x, norm, eps, w, out):
    """out = W · RMSNorm(x), parallel over the V rows of the head."""
    D = x.shape[0]
    h = np.empty(D, np.float32)
    hs = np.empty(D, np.float32)
    _rms_norm(x, norm, eps, h)
    _prepare(h, hs)
    V = _rows(w)
    R = ROWS_PER_CHUNK
    for c in prange(_chunks(V)):
        prefer_wide_vectors()
        buf = np.empty(D, np.float32)
        r0 = c * R
        r1 = min(V, r0 + R)
        _dot_rows(w, r0, r1, h, hs, buf, out[r0:r1])


@njit(cache=True)
def _all_layers(x, norms, weights, cache_k, cache_v, pos, cos, sin, eps, scale, final_norm, head, out):
    """Every layer, then the head: one compiled call per token (``weights`` holds 7 per layer, in order)."""
    for layer in range(norms.shape[0]):
        i = 7 * layer
        _layer(x, norms[layer, 0], norms[layer, 1], weights[i], weights[i + 1], weights[i + 2], weights[i + 3],
               weights[i + 4], weights[i + 5], weights[i + 6], cache_k[layer], cache_v[layer], pos, cos, sin,
               eps, scale)
    _head(x, final_norm, eps, head, out)


# ---------------------------------------------------------------------------------------------------------------
# the twins (same names and signatures as lora_ref.kernels.decode_reference)
# ---------------------------------------------------------------------------------------------------------------


def layer_step(x, norms, weights, cache_k, cache_v, pos, cos, sin, eps, scale) -> None:
    """One decoder layer for the token at position ``pos``, in place (see the twin for the arguments)."""
    _check_kind(weights)
    _layer(x, norms[0], norms[1], *weights, cache_k, cache_v, int(pos), cos, sin, F32(eps), F32(scale))


def head_step(x, norm, eps, weight, out) -> None:
    """``out`` (V,) = W · RMSNorm(x): the logits of one position (see the twin)."""
    _head(x, norm, F32(eps), weight, out)


def _check_kind(weights) -> None:
    kinds = {isinstance(w, Weight4bit) for w in weights}
    if len(weights) != 7 or len(kinds) != 1:
        raise ValueError("a decode layer takes seven weights (q, k, v, o, gate, up, down), all float32 matrices or "
                         "all 4-bit")


def decode_step(x, norms, weights, cache_k, cache_v, pos, cos, sin, eps, scale, final_norm, head, out) -> None:
    """Every layer (:func:`layer_step` with ``norms[l]``, ``weights[7l:7l + 7]``, ``cache_k[l]``, ``cache_v[l]``)
    and then :func:`head_step` into ``out``: one token, one compiled call. ``weights`` from :func:`weight_list`."""
    _all_layers(x, norms, weights, cache_k, cache_v, int(pos), cos, sin, F32(eps), F32(scale), final_norm, head, out)


def _float32_row(x, *args) -> bool:
    """The "auto" rule: the fast-path switch is on and the activations are float32."""
    return switch.applies(x)


PICK = switch.Twins(sys.modules[__name__], {
    "layer_step": switch.Operation(("layer_step",), decode_reference, _float32_row),
    "head_step": switch.Operation(("head_step",), decode_reference, _float32_row),
    "decode_step": switch.Operation(("decode_step",), decode_reference, _float32_row),
})
pick = PICK.pick
"""``pick(operation, x, impl=...)``: this module or :mod:`lora_ref.kernels.decode_reference` for "layer_step",
"head_step" or "decode_step" (see :class:`lora_ref.kernels.switch.Twins`)."""
