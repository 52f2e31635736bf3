"""Hypothesis strategies for property tests of LoRA and 4-bit code: data that exercises the math.

A property test is only as strong as its data. A LoRA adapter straight from its default init has B = 0, so
ΔW = 0 and every merge test passes whatever the merge code does; and hypothesis' own ``arrays`` strategy fills
most of an array with one repeated value, so drawn factors are often rank-deficient and drawn 4-bit blocks often
hold one or two distinct values, which no rounding rule can get wrong. The strategies here avoid both:

- **Independent entries.** Every array comes from one drawn integer seed that feeds ``numpy.random.default_rng``
  (an adapter's seed is split with ``SeedSequence.spawn`` into one stream per array, so W, A and B never share
  entries): no repeated fill value, and hypothesis still shrinks the seed and ``derandomize`` still replays it.
- **Full rank.** Factor entries are ±U(0.1, 1) times a scale: never zero, so B ≠ 0 entry by entry, and A (R, in),
  B (out, R) have full rank min(R, in), min(out, R) with probability 1 (numerically: in ≥ 95% of draws,
  checked by ``tests/testing/test_strategy_guarantees.py``).
- **Real shapes.** Both sides ≥ 2 by default (``min_side=1`` for tests about the degenerate case), and the rank
  R ≤ min(out, in), so ``rank(ΔW) ≤ R`` says something.
- **Scales by orders of magnitude.** W, A and B each get a scale drawn from 10^k, k an integer in [−2, 1]
  (W) or [−1, 1] (factors), and α ranges over [0.25, 64]: a dropped, squared or misplaced scaling changes the
  result by orders of magnitude, not by a few percent.
- **4-bit blocks that exercise the rounding.** :func:`quant_tensors` draws tensors whose non-zero blocks hold
  many distinct values (≥ 3 distinct values in ≥ 95% of blocks of ≥ 8 elements, and half the block's elements
  distinct on average), with all-zero blocks and outliers (a few entries 10–50× the rest) placed on purpose.

Use them to test your own merge code against lora_ref's::

    import numpy as np
    from hypothesis import given
    from lora_ref.testing import adapters

    @given(adapters())
    def test_my_merge(ad):
        assert np.array_equal(my_merge(ad.W, ad.A, ad.B, ad.scaling), ad.merged_weight())

Shapes: W (out, in), A (R, in), B (out, R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from lora_ref.adapters.lora import (
    LoraConfig,
    LoraLinear,
    delta_weight,
    dora_merged_weight,
    dora_weight_norm,
    merged_weight,
    round_to_dtype,
)
from lora_ref.modeling.nn import Linear

__all__ = [
    "LoraAdapter", "shapes", "ranks", "alphas", "scales", "seeds", "weights", "factors", "lora_configs", "adapters",
    "adapter_sets", "quant_tensors", "DTYPES", "QUANT_DTYPES",
]

#: the base dtypes merges are tested in: float32 and bfloat16 (values held in float32 arrays)
DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
#: the input dtypes 4-bit quantization accepts (bitsandbytes: float32, float16, bfloat16)
QUANT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter on one weight: W (out, in), A (R, in), B (out, R), float32 arrays; scaling s.

    ``dtype`` is the storage dtype of W (float32, or bfloat16 with W already rounded to bfloat16 values).
    ``magnitude`` is DoRA's m (out,) or None.
    """

    W: np.ndarray
    A: np.ndarray
    B: np.ndarray
    r: int
    lora_alpha: float
    use_rslora: bool = False
    dtype: np.dtype = np.dtype(np.float32)
    magnitude: np.ndarray | None = None

    @property
    def scaling(self) -> float:
        """α/R, or α/√R with rsLoRA."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    def delta_weight(self) -> np.ndarray:
        """ΔW = (B @ A)·s in float32, the quantity every merge adds."""
        return delta_weight(self.A, self.B, self.scaling)

    def merged_weight(self, safe_merge: bool = False) -> np.ndarray:
        """lora_ref's (and PEFT's) merged weight in this adapter's dtype, as float32 (out, in).

        LoRA: round(W + ΔW), or round(W + round(ΔW)) with ``safe_merge``; DoRA: round((m/n)·(W + ΔW)).
        """
        dW = self.delta_weight()
        if self.use_dora:
            return dora_merged_weight(self.W, dW, self.magnitude, dora_weight_norm(self.W, dW), self.dtype)
        return merged_weight(self.W, dW, self.dtype, safe_merge)

    def to_layer(self) -> LoraLinear:
        """A :class:`lora_ref.adapters.lora.LoraLinear` holding a copy of this adapter (name "default")."""
        out_f, in_f = self.W.shape
        base = Linear(in_f, out_f)
        base.weight.data[...] = self.W
        if self.dtype != np.float32:
            base.weight_dtype = self.dtype
        layer = LoraLinear(base, "default", self.r, self.lora_alpha, use_rslora=self.use_rslora,
                           init_lora_weights=None, use_dora=self.use_dora)
        layer.lora_A["default"].weight.data[...] = self.A
        layer.lora_B["default"].weight.data[...] = self.B
        if self.use_dora:
            layer.lora_magnitude_vector["default"].weight.data[...] = self.magnitude
        return layer


def seeds() -> st.SearchStrategy[int]:
    """A 32-bit seed for ``numpy.random.default_rng``: the one draw behind every array here."""
    return st.integers(0, 2**32 - 1)


def scales(low: int = -2, high: int = 1) -> st.SearchStrategy[float]:
    """A power of ten 10^k, k an integer in [low, high]: magnitudes that differ by orders, not by percent."""
    return st.integers(low, high).map(lambda k: float(10.0 ** k))


def shapes(min_side: int = 2, max_side: int = 12) -> st.SearchStrategy[tuple[int, int]]:
    """(out_features, in_features), each in [min_side, max_side]; both ≥ 2 unless you ask for ``min_side=1``."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def ranks(max_rank: int = 6) -> st.SearchStrategy[int]:
    """A LoRA rank R in [1, max_rank]."""
    return st.integers(1, max_rank)


def alphas() -> st.SearchStrategy[float]:
    """α: small and large, integer and fractional (scalings from ~0.04 to 64)."""
    return st.one_of(st.sampled_from([1, 2, 8, 16, 32, 64]), st.floats(0.25, 64.0, allow_nan=False).map(
        lambda a: float(np.float32(a))))


def _uniform(seed, shape, scale: float) -> np.ndarray:
    """float32 entries U(−scale, scale), independent (from ``default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)


def _away_from_zero(seed, shape, low: float, high: float) -> np.ndarray:
    """float32 entries ±U(low, high) with a random sign, independent: never zero, full rank almost surely."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(low, high, size=shape)
    sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
    out = (sign * mag).astype(np.float32)
    lo = np.float32(low)
    return np.where(np.abs(out) < lo, np.copysign(lo, out), out).astype(np.float32)  # float32 rounding below low


def weights(shape: tuple[int, ...], dtype=np.float32, scale: float = 1.0) -> st.SearchStrategy[np.ndarray]:
    """A float32 array of independent entries U(−scale, scale) (rounded to bfloat16 values if ``dtype`` is
    bfloat16); the whole array comes from one drawn seed."""
    dt = np.dtype(dtype)
    return seeds().map(lambda seed: round_to_dtype(_uniform(seed, shape, scale), dt))


def factors(shape: tuple[int, ...], low: float = 0.1, high: float = 1.0) -> st.SearchStrategy[np.ndarray]:
    """A float32 array of independent entries ±U(low, high): never zero, and a matrix of full rank with
    probability 1 (its entries have a density). One drawn seed per array."""
    return seeds().map(lambda seed: _away_from_zero(seed, shape, low, high))


def lora_configs(target_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), max_rank: int = 6,
                 use_dora: bool | None = False, use_rslora: bool | None = None) -> st.SearchStrategy[LoraConfig]:
    """LoraConfigs with ``init_lora_weights=False`` (B ≠ 0): rank, α, rsLoRA, DoRA and a non-empty target list.

    ``use_dora`` / ``use_rslora``: fixed value, or None to draw both.
    """
    boolean = st.booleans()
    return st.builds(
        lambda r, a, rs, dora, targets: LoraConfig(r=r, lora_alpha=a, use_rslora=rs, use_dora=dora,
                                                   target_modules=sorted(targets), init_lora_weights=False),
        ranks(max_rank), alphas(),
        boolean if use_rslora is None else st.just(use_rslora),
        boolean if use_dora is None else st.just(use_dora),
        st.sets(st.sampled_from(target_names), min_size=1),
    )


@st.composite
def adapters(draw, max_side: int = 12, max_rank: int = 6, dtype=None, use_dora: bool | None = False,
             use_rslora: bool | None = None, shape: tuple[int, int] | None = None,
             min_side: int = 2) -> LoraAdapter:
    """A :class:`LoraAdapter` whose math is exercised.

    Guarantees: out, in ∈ [min_side, max_side] (default min_side 2); R ∈ [1, min(max_rank, out, in)] (with an
    explicit ``shape`` whose smaller side is below ``max_rank``, R ≤ that side too); W has independent entries
    U(−1, 1)·10^k, k ∈ [−2, 1]; A and B have independent entries ±U(0.1, 1)·10^k, k ∈ [−1, 1], drawn separately
    (so ΔW = s·B·A ranges over ~6 orders of magnitude relative to W), never zero, full rank almost surely.
    ``dtype``: float32, bfloat16, or None to draw one of :data:`DTYPES`. ``use_dora``/``use_rslora``: fixed, or
    None to draw. DoRA magnitudes are drawn positive, in [0.5, 2]·‖W + ΔW‖ per row.
    """
    out_f, in_f = shape if shape is not None else draw(shapes(min_side, max_side))
    r = draw(ranks(max(1, min(max_rank, out_f, in_f))))
    dt = np.dtype(draw(st.sampled_from(DTYPES)) if dtype is None else dtype)
    # one seed per adapter, split into independent streams: W, A, B and the DoRA ratios never share entries
    s_W, s_A, s_B, s_m = np.random.SeedSequence(draw(seeds())).spawn(4)
    W = round_to_dtype(_uniform(s_W, (out_f, in_f), draw(scales(-2, 1))), dt)
    A = _away_from_zero(s_A, (r, in_f), 0.1, 1.0) * np.float32(draw(scales(-1, 1)))
    B = _away_from_zero(s_B, (out_f, r), 0.1, 1.0) * np.float32(draw(scales(-1, 1)))
    alpha = draw(alphas())
    rs = draw(st.booleans()) if use_rslora is None else bool(use_rslora)
    dora = draw(st.booleans()) if use_dora is None else bool(use_dora)
    ad = LoraAdapter(W, A, B, r, alpha, rs, dt)
    if dora:
        norm = np.linalg.norm(W + ad.delta_weight(), axis=1)
        ratio = np.random.default_rng(s_m).uniform(0.5, 2.0, out_f).astype(np.float32)
        ad = LoraAdapter(W, A, B, r, alpha, rs, dt, (np.maximum(norm, 1e-3) * ratio).astype(np.float32))
    return ad


@st.composite
def adapter_sets(draw, min_size: int = 2, max_size: int = 3, max_side: int = 10, max_rank: int = 5,
                 same_rank: bool = False, use_rslora: bool | None = None, min_side: int = 2) -> list[LoraAdapter]:
    """Several float32 adapters on one shared W (for combination code such as ``add_weighted_adapter``), each
    with the guarantees of :func:`adapters` (its own factor scales, so the adapters differ in size too)."""
    out_f, in_f = draw(shapes(min_side, max_side))
    n = draw(st.integers(min_size, max_size))
    streams = np.random.SeedSequence(draw(seeds())).spawn(1 + 2 * n)  # W, then A and B of each adapter
    W = _uniform(streams[0], (out_f, in_f), draw(scales(-2, 1)))
    top = max(1, min(max_rank, out_f, in_f))
    r0 = draw(ranks(top))
    out = []
    for i in range(n):
        r = r0 if same_rank else draw(ranks(top))
        rs = draw(st.booleans()) if use_rslora is None else bool(use_rslora)
        A = _away_from_zero(streams[1 + 2 * i], (r, in_f), 0.1, 1.0) * np.float32(draw(scales(-1, 1)))
        B = _away_from_zero(streams[2 + 2 * i], (out_f, r), 0.1, 1.0) * np.float32(draw(scales(-1, 1)))
        out.append(LoraAdapter(W, A, B, r, draw(alphas()), rs))
    return out


@st.composite
def quant_tensors(draw, blocksizes=(32, 64, 128, 256), max_side: int = 40, dtypes=QUANT_DTYPES,
                  min_dims: int = 1, max_dims: int = 3) -> tuple[np.ndarray, int]:
    """(x, blocksize) for blockwise 4-bit properties: a tensor whose blocks exercise the rounding.

    Guarantees: x has 1–3 dims of sides in [1, max_side] (odd and even element counts, blocks that span rows,
    a partial last block) and a dtype from ``dtypes``; its entries are independent draws (normal, uniform or
    Student-t with 3 degrees of freedom, chosen per tensor) times a scale 10^k, k ∈ [−3, 2] (float16: [−2, 1], to
    stay in its normal range), so a non-zero block of ≥ 8 elements holds ≥ 3 distinct values with probability
    ≥ 95% (float32: all distinct almost surely). On purpose, in most draws: all-zero blocks (whole blocks of the
    drawn ``blocksize``, when there are at least two blocks) and outliers (1–3 entries 10–50× the scale, so one
    block's absmax is far above its typical entry).
    """
    dtype = np.dtype(draw(st.sampled_from(list(dtypes))))
    blocksize = int(draw(st.sampled_from(list(blocksizes))))
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))
    k = draw(st.integers(-2, 1) if dtype == np.float16 else st.integers(-3, 2))
    rng = np.random.default_rng(draw(seeds()))
    kind = draw(st.sampled_from(["normal", "uniform", "student_t"]))
    n = int(np.prod(shape))
    if kind == "normal":
        flat = rng.standard_normal(n)
    elif kind == "uniform":
        flat = rng.uniform(-1.0, 1.0, n)
    else:
        flat = np.clip(rng.standard_t(3, n), -20, 20)
    flat = flat * 10.0 ** k
    nblocks = -(-n // blocksize)
    if nblocks >= 2 and draw(st.integers(0, 3)) > 0:  # zero blocks in 3 draws of 4
        for b in rng.choice(nblocks, size=int(rng.integers(1, nblocks)), replace=False):
            flat[b * blocksize:(b + 1) * blocksize] = 0.0
    n_out = draw(st.integers(0, 3))  # outliers in 3 draws of 4
    if n_out:
        at = rng.choice(n, size=min(n_out, n), replace=False)
        flat[at] = rng.choice([-1.0, 1.0], size=at.size) * rng.uniform(10, 50, at.size) * 10.0 ** k
    x = flat.astype(np.float32).astype(dtype).reshape(shape)
    return x, blocksize
