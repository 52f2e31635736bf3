"""Hypothesis strategies for property tests of LoRA code: shapes, configs, and adapters whose B is not zero.

A LoRA adapter straight from its default init has B = 0, so ΔW = 0 and every merge test passes whatever the merge
code does. The adapters drawn here have every entry of A and B at least 0.1 in magnitude (A and B have full rank
almost surely), so a wrong scaling, a transposed factor or a missing term shows up.

Use them to test your own merge code against lora_ref's::

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
from hypothesis.extra import numpy as hnp

from lora_ref.adapters.lora import (LoraConfig, LoraLinear, delta_weight, dora_merged_weight, dora_weight_norm, merged_weight,
                           round_to_dtype)
from lora_ref.modeling.nn import Linear

__all__ = [
    "LoraAdapter", "shapes", "ranks", "alphas", "weights", "factors", "lora_configs", "adapters", "adapter_sets",
    "DTYPES",
]

#: the base dtypes merges are tested in: float32 and bfloat16 (values held in float32 arrays)
DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


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


def shapes(min_side: int = 1, max_side: int = 12) -> st.SearchStrategy[tuple[int, int]]:
    """(out_features, in_features)."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def ranks(max_rank: int = 6) -> st.SearchStrategy[int]:
    """A LoRA rank R in [1, max_rank]."""
    return st.integers(1, max_rank)


def alphas() -> st.SearchStrategy[float]:
    """α: small and large, integer and fractional (scalings from ~0.1 to ~60)."""
    return st.one_of(st.sampled_from([1, 2, 8, 16, 32, 64]), st.floats(0.25, 64.0, allow_nan=False).map(
        lambda a: float(np.float32(a))))


def weights(shape: tuple[int, ...], dtype=np.float32, scale: float = 1.0) -> st.SearchStrategy[np.ndarray]:
    """A float32 array with entries in [−scale, scale] (rounded to bfloat16 values if ``dtype`` is bfloat16)."""
    bound = float(np.float32(scale))
    el = st.floats(-bound, bound, width=32, allow_subnormal=False)
    arr = hnp.arrays(np.float32, shape, elements=el)
    dt = np.dtype(dtype)
    return arr.map(lambda a: round_to_dtype(a, dt)) if dt != np.float32 else arr


def factors(shape: tuple[int, ...], low: float = 0.1, high: float = 1.0) -> st.SearchStrategy[np.ndarray]:
    """A float32 array whose every entry has magnitude in [low, high] (so it is never zero)."""
    lo, hi = float(np.float32(low)), float(np.float32(high))
    if lo < low:  # the float32 nearest to ``low`` may lie just below it
        lo = float(np.nextafter(np.float32(low), np.float32(np.inf)))
    el = st.one_of(st.floats(lo, hi, width=32), st.floats(-hi, -lo, width=32))
    return hnp.arrays(np.float32, shape, elements=el)


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
             use_rslora: bool | None = None, shape: tuple[int, int] | None = None) -> LoraAdapter:
    """A :class:`LoraAdapter` with A and B entries of magnitude in [0.1, 1] and W entries in [−1, 1].

    ``dtype``: float32, bfloat16, or None to draw one of :data:`DTYPES`. ``use_dora``/``use_rslora``: fixed, or
    None to draw. DoRA magnitudes are drawn positive, in [0.5, 2]·‖W + ΔW‖ per row.
    """
    out_f, in_f = shape if shape is not None else draw(shapes(1, max_side))
    r = draw(ranks(max_rank))
    dt = np.dtype(draw(st.sampled_from(DTYPES)) if dtype is None else dtype)
    W = draw(weights((out_f, in_f), dt))
    A = draw(factors((r, in_f)))
    B = draw(factors((out_f, r)))
    alpha = draw(alphas())
    rs = draw(st.booleans()) if use_rslora is None else bool(use_rslora)
    dora = draw(st.booleans()) if use_dora is None else bool(use_dora)
    ad = LoraAdapter(W, A, B, r, alpha, rs, dt)
    if dora:
        norm = np.linalg.norm(W + ad.delta_weight(), axis=1)
        ratio = draw(hnp.arrays(np.float32, (out_f,), elements=st.floats(0.5, 2.0, width=32)))
        ad = LoraAdapter(W, A, B, r, alpha, rs, dt, (np.maximum(norm, 1e-3) * ratio).astype(np.float32))
    return ad


@st.composite
def adapter_sets(draw, min_size: int = 2, max_size: int = 3, max_side: int = 10, max_rank: int = 5,
                 same_rank: bool = False, use_rslora: bool | None = None) -> list[LoraAdapter]:
    """Several float32 adapters on one shared W (for combination code such as ``add_weighted_adapter``)."""
    out_f, in_f = draw(shapes(1, max_side))
    W = draw(weights((out_f, in_f)))
    n = draw(st.integers(min_size, max_size))
    r0 = draw(ranks(max_rank))
    out = []
    for _ in range(n):
        r = r0 if same_rank else draw(ranks(max_rank))
        rs = draw(st.booleans()) if use_rslora is None else bool(use_rslora)
        out.append(LoraAdapter(W, draw(factors((r, in_f))), draw(factors((out_f, r))), r, draw(alphas()), rs))
    return out
