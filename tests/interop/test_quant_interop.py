"""Live comparisons with bitsandbytes 0.50.2 on the CPU, on fresh random tensors of odd shapes.

``rounding="cpu"`` must reproduce bitsandbytes' CPU ``quantize_4bit`` (packed codes, scales), its 8-bit
``quantize_blockwise`` (the lookup-table quantizer of csrc/cpu_ops.cpp) and ``dequantize_4bit``; states must cross
between the two libraries through bitsandbytes' serialized form.

One bitsandbytes-side effect is handled explicitly, not hidden:
bitsandbytes' C++ CPU dequantization is compared only for shapes whose last dimension is a multiple of the
blocksize (for some other 2-D shapes, e.g. (64, 96) at blocksize 64, it returns values that do not match its own
codes); every shape is compared against its pure-torch dequantization.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import ml_dtypes
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

from lora_ref.quant import QuantState, dequantize_4bit, quantize_4bit, quantize_blockwise
from lora_ref.quant import serialize as S
from lora_ref.quant.blockwise import unpack_nibbles

pytestmark = pytest.mark.interop

torch.set_num_threads(1)
TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
               np.dtype(ml_dtypes.bfloat16): torch.bfloat16}
DTYPES = list(TORCH_DTYPE)


def to_torch(x: np.ndarray):
    return torch.from_numpy(x.astype(np.float32)).to(TORCH_DTYPE[x.dtype])


def to_numpy(t) -> np.ndarray:
    """A torch tensor as NumPy in the same dtype (bfloat16 through its bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(v) for v in rng.integers(1, 160, size=ndim))
    if int(np.prod(shape)) % 2 == 0 and seed % 2:
        shape = shape[:-1] + (shape[-1] | 1,)  # make some element counts odd
    dtype = DTYPES[seed % 3]
    dist = seed % 4
    if dist == 0:
        x = rng.standard_normal(shape) * 0.02
    elif dist == 1:
        x = rng.uniform(-1, 1, shape)
    elif dist == 2:
        x = rng.standard_t(3, shape)
    else:
        x = rng.standard_normal(shape)
        flat = x.reshape(-1)
        flat[: min(flat.size, 130)] = 0  # zero blocks, and a zero tail when the tensor is small
    blocksize = int(rng.choice([32, 64, 128, 256, 1024, 4096]))
    quant_type = ("nf4", "fp4")[(seed // 3) % 2]
    return x.astype(dtype), blocksize, quant_type


def bnb_state_to_ours(st) -> QuantState:
    """Through bitsandbytes' own serialized form (QuantState.as_dict(packed=True)) into ours."""
    d = {f"w.{k}": to_numpy(v) for k, v in st.as_dict(packed=True).items()}
    d["w"] = np.zeros((int(np.prod(st.shape)) + 1) // 2, np.uint8)
    _, state = S.state_from_tensors(d, "w")
    return state


@pytest.mark.parametrize("seed", range(24))
def test_quantize_4bit_matches_bitsandbytes_cpu(seed):
    x, blocksize, quant_type = random_case(seed)
    pk, st = F.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type=quant_type)
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, rounding="cpu")
    assert np.array_equal(packed, pk.numpy().reshape(-1))
    assert np.array_equal(state.absmax.view(np.uint32), st.absmax.numpy().view(np.uint32))

    ours = dequantize_4bit(packed, state)
    ref = _dequantize_4bit_compute(pk.reshape(-1), st.absmax, _get_4bit_code(quant_type, pk.device), blocksize,
                                   x.shape, TORCH_DTYPE[x.dtype])
    ours32, ref32 = ours.astype(np.float32), to_numpy(ref).astype(np.float32)
    assert np.array_equal(ours32, ref32)  # FP4 code 8: -0.0 here, +0.0 in bitsandbytes' pure-torch path
    if quant_type == "nf4":
        assert np.array_equal(ours32.view(np.uint32), ref32.view(np.uint32))
    if x.ndim == 1 or x.shape[-1] % blocksize == 0:
        cpp = to_numpy(F.dequantize_4bit(pk, st)).astype(np.float32).reshape(x.shape)
        assert np.array_equal(ours32, cpp)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blocks_holding_nan_encode_as_bitsandbytes_cpu(quant_type):
    """quantize_4bit refuses NaN, but its steps take it: the encoder twins (readable and compiled) must give a block
    that holds a NaN the codes bitsandbytes' CPU path gives it (its absmax is NaN, torch.bucketize ranks every value
    of the block last), in a full block and in the partial tail, and leave the clean blocks alone."""
    from lora_ref.quant import kernels, steps

    rng = np.random.default_rng(11)
    x = rng.standard_normal(64 * 3 + 40).astype(np.float32)
    x[70] = np.nan
    x[64 * 3 + 5] = np.nan
    pk, st = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=64, quant_type=quant_type)
    absmax = steps.absmax_blocks(x, 64)
    assert np.array_equal(np.isnan(absmax), np.isnan(st.absmax.numpy()))
    for twin in (steps, kernels):
        codes = twin.encode_4bit(x, absmax, 64, quant_type, "cpu")
        assert np.array_equal(steps.pack_nibbles(codes), pk.numpy().reshape(-1)), twin.__name__


@pytest.mark.parametrize("seed", range(12))
def test_double_quant_matches_bitsandbytes_cpu(seed):
    x, blocksize, quant_type = random_case(100 + seed)
    x = np.concatenate([x.reshape(-1)] * 8)  # several nested blocks
    pk, st = F.quantize_4bit(to_torch(x), blocksize=32, quant_type=quant_type, compress_statistics=True)
    packed, state = quantize_4bit(x, blocksize=32, quant_type=quant_type, double_quant=True, rounding="cpu")
    assert np.array_equal(packed, pk.numpy().reshape(-1))  # the 4-bit codes are exact
    assert np.float32(state.offset) == np.float32(st.offset.item())  # torch's float32 mean, reproduced
    assert np.array_equal(state.absmax, st.absmax.numpy())  # nested codes: the CPU 8-bit lookup table, reproduced
    assert np.array_equal(state.state2.absmax.view(np.uint32), st.state2.absmax.numpy().view(np.uint32))
    ours_dq = dequantize_4bit(packed, state).astype(np.float32)
    # dequantizing bitsandbytes' state (reached through its serialized form) reproduces its output
    ours = dequantize_4bit(pk.numpy().reshape(-1), bnb_state_to_ours(st)).astype(np.float32)
    ref = to_numpy(F.dequantize_4bit(pk, st)).astype(np.float32).reshape(ours.shape)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours_dq, ref)


@pytest.mark.parametrize("seed", range(8))
def test_quantize_blockwise_8bit_lut_matches_bitsandbytes_cpu(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(1, 5000))
    blocksize = int(rng.choice([64, 256, 4096]))
    x = (rng.standard_normal(n) * rng.uniform(1e-4, 3)).astype(np.float32)
    if seed % 3 == 0:
        x[: min(n, 256)] = 0
    q, st = F.quantize_blockwise(torch.from_numpy(x), blocksize=blocksize)
    codes, state = quantize_blockwise(x, blocksize=blocksize, rounding="cpu")
    assert np.array_equal(codes, q.numpy())
    assert np.array_equal(state.absmax.view(np.uint32), st.absmax.numpy().view(np.uint32))
    exact, _ = quantize_blockwise(x, blocksize=blocksize, rounding="cuda")
    assert np.mean(exact == codes) >= 0.99  # the lookup table is an approximation of the nearest code


@pytest.mark.parametrize("seed", range(6))
def test_states_cross_between_the_libraries(seed):
    x, blocksize, quant_type = random_case(200 + seed)
    double_quant = bool(seed % 2)
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                                  rounding="cpu")
    tensors = S.state_to_tensors("w", packed, state)
    from bitsandbytes.functional import QuantState as BnbQuantState

    as_torch = {k[2:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k != "w"}
    bnb_state = BnbQuantState.from_dict(as_torch, torch.device("cpu"))
    theirs = to_numpy(F.dequantize_4bit(torch.from_numpy(tensors["w"]), bnb_state)).astype(np.float32)
    ours = dequantize_4bit(packed, state).astype(np.float32)
    if x.ndim == 1 or x.shape[-1] % blocksize == 0:
        assert np.array_equal(theirs.reshape(ours.shape), ours)
    # bitsandbytes writes back exactly the bytes we wrote (tensors and JSON)
    back = {f"w.{k}": to_numpy(v) for k, v in bnb_state.as_dict(packed=True).items()}
    for k, v in back.items():
        assert np.array_equal(v.view(np.uint8), np.ascontiguousarray(tensors[k]).view(np.uint8)), k


def test_serialized_bytes_equal_bitsandbytes_for_the_same_state():
    x = np.random.default_rng(7).standard_normal((33, 64)).astype(ml_dtypes.bfloat16)
    pk, st = F.quantize_4bit(to_torch(x), blocksize=64, quant_type="nf4")
    packed, state = quantize_4bit(x, blocksize=64, quant_type="nf4", rounding="cpu")
    ours = S.state_to_tensors("w", packed, state)
    theirs = {f"w.{k}": to_numpy(v) for k, v in st.as_dict(packed=True).items()}
    theirs["w"] = pk.numpy()
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
        assert np.array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8)), k
    assert unpack_nibbles(packed, x.size).max() <= 15


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_mean_is_torchs_float32_mean(threads):
    from lora_ref.quant.blockwise import cpu_mean_f32

    rng = np.random.default_rng(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in [1, 7, 8, 9, 63, 64, 1000, 4097, 32768, 33000, 262145, *rng.integers(1, 100000, 12).tolist()]:
            v = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 1) + rng.uniform(0, 0.1)).astype(np.float32)
            assert cpu_mean_f32(v, threads=threads) == torch.from_numpy(v).mean().numpy(), n
    finally:
        torch.set_num_threads(previous)
