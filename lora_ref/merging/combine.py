"""Combining adapters: PEFT's ``add_weighted_adapter`` and the merging papers it borrows from.

Three layers, each readable on its own:

1. **Per-tensor combination rules** (:func:`task_arithmetic`, :func:`magnitude_prune`, :func:`ties`,
   :func:`dare_linear`, :func:`dare_ties` and their helpers), with the semantics of PEFT 0.21.2
   ``utils/merge_utils.py``: a list of same-shape arrays and one weight per array in, one array out.
   DARE's random masks come from an explicit ``rng``.
2. **Per-layer LoRA combination** (:func:`combine_lora`): the new ``lora_A`` / ``lora_B`` (and bias) of one layer
   from the source adapters, for every ``combination_type`` of PEFT's ``add_weighted_adapter``:

   ===================  ==========  ======================================================================
   combination_type     new rank    new factors (w_i the user weights, s_i the source scalings)
   ===================  ==========  ======================================================================
   ``cat``              Σ r_i       A = vstack(w_i·s_i·A_i), B = hstack(B_i): B·A = Σ w_i·s_i·B_i·A_i (exact)
   ``svd``              svd_rank    ΔW = Σ w_i·s_i·B_i·A_i; U, S, Vᵀ = svd(ΔW); B = U_R·diag(S_R), A = Vᵀ_R
   ``linear``           r           A = Σ sign(w_i s_i)·√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i (cross terms!)
   ``ties`` …           r           the same √-weights, then TIES / DARE / magnitude pruning on A and on B
   ``*_svd``            svd_rank    TIES / DARE / magnitude pruning on the full ΔW_i, then the SVD
   ===================  ==========  ======================================================================

   Only ``cat`` and ``svd`` (with svd_rank ≥ rank(ΔW)) give Σ w_i·ΔW_i. ``linear``, ``ties``, ``dare_*`` and
   ``magnitude_prune`` combine A's and B's separately, so B·A carries cross terms B_i·A_j; PEFT's documentation
   calls ``linear`` "a very rough approximation". We reproduce them because users compare against them.
3. **Per-model** :func:`add_weighted_adapter`: adds the combined adapter to every LoRA layer of a model.

Where PEFT 0.21.2 is wrong, we are not, and :func:`add_weighted_adapter_like_peft` reproduces PEFT for comparison:

- **rsLoRA over-scaling** (peft PR #3449, issue #3761). The new adapter's config copies ``adapters[0]``'s with
  ``r = lora_alpha = new_rank`` so that its scaling is 1, the source scalings being baked into the factors. But it
  also copies ``use_rslora``, so the scaling becomes new_rank/√new_rank = √new_rank and the combined update is
  √new_rank times too large. We give the new adapter scaling 1 (``use_rslora=False``).
- **The bias is dropped.** With ``lora_bias=True`` the sources' ``lora_B`` biases are ignored and the new bias stays
  at its initial value (zero). We combine the biases with the same rule as the factors applied to s_i·b_i
  (for ``cat``, ``svd`` and ``linear``: Σ w_i·s_i·b_i, exact).

The papers define the merges on full weight deltas ("task vectors") of whole models, not on LoRA factors;
:func:`paper_task_arithmetic`, :func:`paper_ties` and :func:`paper_dare` implement those definitions on plain
arrays (or dicts of arrays, one per model). Differences from PEFT's per-tensor versions are listed in each
docstring.

Taught in ``notebooks/08_merging.ipynb``. References: Ilharco et al. 2023, "Editing Models with Task Arithmetic"
(arXiv 2212.04089); Yadav et al. 2023, "TIES-Merging" (arXiv 2306.01708); Yu et al. 2024, "Language Models are
Super Mario" (DARE, arXiv 2311.03099); PEFT 0.21.2 ``tuners/lora/model.py`` (``add_weighted_adapter``,
``_svd_generalized_task_arithmetic_weighted_adapter``, ``_generalized_task_arithmetic_weighted_adapter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from lora_ref.adapters.lora import delta_weight

__all__ = [
    "COMBINATION_TYPES",
    "magnitude_based_pruning",
    "random_pruning",
    "prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
    "CombinedLora",
    "combine_lora",
    "new_rank",
    "paper_task_arithmetic",
    "paper_ties",
    "paper_dare",
    "add_weighted_adapter",
    "add_weighted_adapter_like_peft",
]

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
"""Every ``combination_type`` PEFT 0.21.2's ``add_weighted_adapter`` accepts."""

_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # combine A's and B's separately
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # combine ΔW, then SVD
_NEEDS_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                  "magnitude_prune", "magnitude_prune_svd")
_NEEDS_RNG = ("dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd")


# ---------------------------------------------------------------------------------------------------------------
# 1. Per-tensor rules (PEFT utils/merge_utils.py semantics)
# ---------------------------------------------------------------------------------------------------------------


def magnitude_based_pruning(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = ⌊density · x.size⌋ entries of largest |x|, zero the rest (same shape and dtype as ``x``).

    Ties in |x| keep the earlier entry in row-major order (PEFT uses ``torch.topk``, whose choice among equal
    magnitudes is unspecified).
    """
    x = np.asarray(x)
    k = int(density * x.size)
    flat = x.reshape(-1)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    mask = np.zeros(flat.shape, dtype=x.dtype)
    mask[keep] = 1
    return x * mask.reshape(x.shape)


def random_pruning(x: np.ndarray, density: float, rng: np.random.Generator, rescale: bool) -> np.ndarray:
    """DARE's drop: keep each entry with probability ``density`` (mask m ~ Bernoulli(density)), optionally / density.

    The mask is ``rng.random(x.shape) < density`` (PEFT draws ``torch.bernoulli``; the masks differ, the law is
    the same). With ``rescale`` the kept entries are divided by ``density`` so that E[result] = x.
    """
    x = np.asarray(x)
    mask = (rng.random(x.shape) < density).astype(x.dtype)
    pruned = x * mask
    if rescale:
        pruned = pruned / np.asarray(density, dtype=x.dtype)
    return pruned


def prune(x: np.ndarray, density: float, method: str, *, rng: np.random.Generator | None = None,
          rescale: bool = False) -> np.ndarray:
    """PEFT's ``prune``: ``density`` ≥ 1 returns ``x`` unchanged (no rescaling either); ``method`` "magnitude" or "random"."""
    if density is None or not np.isfinite(density):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    if density >= 1:
        return np.asarray(x)
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(x, density)
    if method == "random":
        if rng is None:
            raise ValueError("random pruning (DARE) needs rng: np.random.Generator")
        return random_pruning(x, density, rng, rescale=rescale)
    raise ValueError(f"unknown pruning method {method!r}; expected 'magnitude' or 'random'")


def calculate_majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    """TIES' sign election over axis 0 of ``stacked`` (n_tasks, ...): True where a task agrees with the elected sign.

    ``"total"``: the elected sign is sign(Σ_t x_t) (the paper's "mass"); ``"frequency"``: sign(Σ_t sign(x_t)).
    A sum of exactly 0 elects +1 (PEFT). Zero entries have sign 0 and never agree, so they are not counted.
    """
    sign = np.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise ValueError(f"unknown majority_sign_method {method!r}; expected 'total' or 'frequency'")
    majority = np.where(magnitude >= 0, 1, -1).astype(stacked.dtype)
    return sign == majority


def disjoint_merge(weighted: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """TIES' disjoint mean: Σ_t agree_t·x_t / max(#agreeing tasks, 1), over axis 0."""
    total = (weighted * agree).sum(axis=0)
    count = agree.sum(axis=0).astype(weighted.dtype)
    return total / np.maximum(count, np.asarray(1, weighted.dtype))


def _stack_weighted(tensors: Sequence[np.ndarray], weights) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.stack([np.asarray(t) for t in tensors], axis=0)  # (n, ...)
    w = np.asarray(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))  # (n, 1, ...)
    if w.shape[0] != stacked.shape[0]:
        raise ValueError(f"{stacked.shape[0]} tensors but {w.shape[0]} weights")
    return stacked, w


def task_arithmetic(tensors: Sequence[np.ndarray], weights) -> np.ndarray:
    """Σ_t w_t · x_t (PEFT ``task_arithmetic``)."""
    stacked, w = _stack_weighted(tensors, weights)
    return (stacked * w).sum(axis=0)


def magnitude_prune(tensors: Sequence[np.ndarray], weights, density: float) -> np.ndarray:
    """Σ_t w_t · topk_density(x_t): magnitude pruning of each tensor, then a weighted sum."""
    pruned = [prune(t, density, "magnitude") for t in tensors]
    return task_arithmetic(pruned, weights)


def ties(tensors: Sequence[np.ndarray], weights, density: float, majority_sign_method: str = "total") -> np.ndarray:
    """PEFT's TIES: trim each tensor to its top ``density`` fraction, elect signs on the *unweighted* trimmed
    tensors, then the disjoint mean of the *weighted* agreeing entries.

    Notes
    -----
    The paper (:func:`paper_ties`) trims the whole model's task vector at once, has no per-task weights, and
    multiplies the disjoint mean by one λ. PEFT trims per tensor (here: per LoRA factor) and weights each task
    before the mean, so equal weights w scale the result by w, not w·n.
    """
    pruned = [prune(t, density, "magnitude") for t in tensors]
    stacked, w = _stack_weighted(pruned, weights)
    agree = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * w, agree)


def dare_linear(tensors: Sequence[np.ndarray], weights, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE then task arithmetic: Σ_t w_t · (m_t ⊙ x_t) / density, m_t ~ Bernoulli(density) from ``rng``."""
    pruned = [prune(t, density, "random", rng=rng, rescale=True) for t in tensors]
    return task_arithmetic(pruned, weights)


def dare_ties(tensors: Sequence[np.ndarray], weights, density: float, rng: np.random.Generator,
              majority_sign_method: str = "total") -> np.ndarray:
    """DARE's random drop (with rescale) in place of TIES' trim, then TIES' sign election and disjoint mean."""
    pruned = [prune(t, density, "random", rng=rng, rescale=True) for t in tensors]
    stacked, w = _stack_weighted(pruned, weights)
    agree = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * w, agree)


def _combine(combination: str, tensors, weights, density, majority_sign_method, rng) -> np.ndarray:
    """Dispatch on the combination rule; ``combination`` without the ``_svd`` suffix ("svd" means task arithmetic)."""
    if combination in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if combination == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if combination == "dare_linear":
        return dare_linear(tensors, weights, density, rng)
    if combination == "dare_ties":
        return dare_ties(tensors, weights, density, rng, majority_sign_method)
    if combination == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown combination {combination!r}")


# ---------------------------------------------------------------------------------------------------------------
# 2. One layer: the new lora_A / lora_B from the sources
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CombinedLora:
    """The combined adapter of one layer.

    Attributes
    ----------
    lora_A : float32 (R, in)
    lora_B : float32 (out, R)
    bias : float32 (out,) or None — the combined ``lora_B`` bias (None when no source has one)
    scaling : the scaling the combined adapter must be applied with (1.0; √R when reproducing PEFT's rsLoRA bug)
    """

    lora_A: np.ndarray
    lora_B: np.ndarray
    bias: np.ndarray | None = None
    scaling: float = 1.0

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    def delta_weight(self) -> np.ndarray:
        """scaling · B @ A, float32 (out, in)."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling)  # on one BLAS thread


def new_rank(ranks: Sequence[int], combination_type: str, svd_rank: int | None = None) -> int:
    """The rank of the combined adapter (PEFT ``_check_add_weighted_adapter``).

    ``cat``: Σ r_i; ``*svd``: ``svd_rank`` or max r_i; the others need equal ranks (else ``ValueError``).
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; expected one of {', '.join(COMBINATION_TYPES)}")
    ranks = [int(r) for r in ranks]
    if combination_type in _FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type {combination_type!r} needs adapters of equal rank, got ranks {ranks} "
                             "(use 'cat' or 'svd' to combine different ranks)")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (int(svd_rank) != svd_rank or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    return int(svd_rank) if svd_rank else max(ranks)


def _check_sources(As, Bs, scalings, weights, biases):
    n = len(As)
    if n == 0:
        raise ValueError("no adapters to combine")
    if not (len(Bs) == len(scalings) == len(weights) == n):
        raise ValueError(f"{n} lora_A, {len(Bs)} lora_B, {len(scalings)} scalings and {len(weights)} weights: "
                         "one of each per adapter")
    As = [np.asarray(a, dtype=np.float32) for a in As]
    Bs = [np.asarray(b, dtype=np.float32) for b in Bs]
    out, inp = Bs[0].shape[0], As[0].shape[1]
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {i}: lora_A {a.shape} and lora_B {b.shape} are not (r, in) and (out, r)")
        if a.shape[1] != inp or b.shape[0] != out:
            raise ValueError(f"adapter {i}: lora_B @ lora_A is {(b.shape[0], a.shape[1])}, adapter 0's is {(out, inp)}")
    for w in weights:
        if not np.isfinite(w):
            raise ValueError(f"adapter weights must be finite, got {list(weights)}")
    if biases is not None:
        if len(biases) != n:
            raise ValueError(f"{n} adapters but {len(biases)} biases")
        biases = [None if b is None else np.asarray(b, dtype=np.float32) for b in biases]
        for i, b in enumerate(biases):
            if b is not None and b.shape != (out,):
                raise ValueError(f"adapter {i}: lora_B bias has shape {b.shape}, expected {(out,)}")
        if all(b is None for b in biases):
            biases = None
    return As, Bs, biases


def combine_lora(
    lora_As: Sequence[np.ndarray],
    lora_Bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    rng: np.random.Generator | None = None,
    biases: Sequence[np.ndarray | None] | None = None,
    peft_bugs: bool = False,
    use_rslora: bool = False,
) -> CombinedLora:
    """Combine one layer's adapters as PEFT 0.21.2's ``add_weighted_adapter`` does.

    Parameters
    ----------
    lora_As : per adapter, float32 (r_i, in)
    lora_Bs : per adapter, float32 (out, r_i)
    scalings : per adapter, s_i = α_i / r_i (or α_i / √r_i with rsLoRA)
    weights : per adapter, the user weight w_i (may be negative)
    combination_type : one of :data:`COMBINATION_TYPES`. (PEFT forces "linear" when the *model-level* call has one
        adapter — :func:`add_weighted_adapter` does too — but not for a layer that only one of several adapters targets.)
    svd_rank : rank of the ``*svd`` result (default max r_i). Larger than min(out, in): zero-padded (PEFT fails).
    svd_clamp : a quantile q: entries of B and A are clipped to ±quantile(concat(B, A), q) (PEFT's ``svd_clamp``).
        The quantile depends on the signs of the singular vectors, which LAPACK leaves open; we fix them (the
        largest entry of each column of U is positive), PEFT takes whatever its LAPACK returns, so with a clamp the
        two agree only when the signs happen to agree.
    density : fraction kept by ties / dare / magnitude pruning, in [0, 1]; ≥ 1 means no pruning.
    majority_sign_method : "total" or "frequency" (ties and dare_ties).
    rng : the generator DARE draws its masks from (required for dare_*). Masks are drawn per adapter, A then B.
    biases : per adapter, the ``lora_B`` bias (out,) or None.
    peft_bugs : reproduce PEFT: biases dropped (zero) and, with ``use_rslora``, scaling √R instead of 1.
    use_rslora : whether ``adapters[0]`` uses rsLoRA (only matters with ``peft_bugs``).

    Returns
    -------
    :class:`CombinedLora` whose ``delta_weight()`` is the combined update. For ``cat`` it equals
    Σ w_i·s_i·B_i·A_i exactly (up to float32 rounding); for ``svd`` when ``svd_rank`` ≥ rank of that sum.
    """
    As, Bs, biases = _check_sources(lora_As, lora_Bs, scalings, weights, biases)
    R = new_rank([a.shape[0] for a in As], combination_type, svd_rank)
    if combination_type in _NEEDS_DENSITY and (density is None or not 0 <= density):
        raise ValueError(f"combination_type {combination_type!r} needs density in [0, 1], got {density!r}")
    if combination_type in _NEEDS_RNG and rng is None:
        raise ValueError(f"combination_type {combination_type!r} draws random masks: pass rng (np.random.Generator)")
    ws = [float(w) * float(s) for w, s in zip(weights, scalings)]  # w_i · s_i in Python floats, as PEFT

    if combination_type == "cat":
        A = np.concatenate([a * np.float32(ws_i) for a, ws_i in zip(As, ws)], axis=0)  # (R, in)
        B = np.concatenate(Bs, axis=1)  # (out, R)
    elif combination_type in _SVD_TYPES:
        # get_delta_weight of each source: s_i · (B_i @ A_i), float32 as PEFT
        deltas = [delta_weight(a, b, s) for a, b, s in zip(As, Bs, scalings)]  # each (out, in), one BLAS thread
        rule = "svd" if combination_type == "svd" else combination_type[: -len("_svd")]
        delta = _combine(rule, deltas, np.asarray(weights, np.float32), density, majority_sign_method, rng)
        A, B = _svd_factors(delta, R, svd_clamp)
    else:
        # √|w_i s_i| on both factors, the sign on A only (PEFT: "otherwise negative signs negate")
        wa = np.asarray([math.copysign(math.sqrt(abs(v)), 1.0 if v >= 0 else -1.0) for v in ws], np.float32)
        wb = np.asarray([math.sqrt(abs(v)) for v in ws], np.float32)
        A = _combine(combination_type, As, wa, density, majority_sign_method, rng).astype(np.float32)  # (R, in)
        B = _combine(combination_type, Bs, wb, density, majority_sign_method, rng).astype(np.float32)  # (out, R)

    bias = None
    if biases is not None and not peft_bugs:
        out = Bs[0].shape[0]
        scaled = [np.zeros(out, np.float32) if b is None else b * np.float32(s) for b, s in zip(biases, scalings)]
        rule = {"cat": "linear", "svd": "linear"}.get(combination_type, combination_type.removesuffix("_svd"))
        bias = _combine(rule, scaled, np.asarray(weights, np.float32), density, majority_sign_method, rng)
        bias = bias.astype(np.float32)
    elif biases is not None:
        bias = np.zeros(Bs[0].shape[0], np.float32)  # PEFT keeps the new adapter's initial (zero) bias

    scaling = 1.0
    if peft_bugs and use_rslora:
        scaling = R / math.sqrt(R)  # lora_alpha = r = R with rsLoRA: R / √R
    return CombinedLora(lora_A=A.astype(np.float32), lora_B=B.astype(np.float32), bias=bias, scaling=scaling)


def _svd_factors(delta: np.ndarray, R: int, clamp: float | None) -> tuple[np.ndarray, np.ndarray]:
    """B = U_R·diag(S_R) (out, R), A = Vᵀ_R (R, in) from ΔW (out, in); rows/columns past min(out, in) are zero."""
    U, S, Vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)  # (out, k), (k,), (k, in)
    # Singular vectors are defined up to a sign per pair, and LAPACK builds choose differently (MKL under torch,
    # OpenBLAS under NumPy). B·A does not depend on it; the clamp quantile does. Fix one convention: the entry of
    # largest magnitude in each column of U is positive.
    flip = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])
    flip[flip == 0] = 1
    U, Vh = U * flip, Vh * flip[:, None]
    k = min(R, S.shape[0])
    B = np.zeros((delta.shape[0], R), np.float64)
    A = np.zeros((R, delta.shape[1]), np.float64)
    B[:, :k] = U[:, :k] * S[:k]
    A[:k] = Vh[:k]
    if clamp is not None:
        if not 0 <= clamp <= 1:
            raise ValueError(f"svd_clamp is a quantile in [0, 1], got {clamp}")
        # PEFT takes the quantile of U·diag(S) and Vh before padding (their shapes are (out, R) and (R, in))
        dist = np.concatenate([B[:, :k].reshape(-1), A[:k].reshape(-1)]).astype(np.float32)
        hi = np.quantile(dist, clamp)
        B = np.clip(B, -hi, hi)
        A = np.clip(A, -hi, hi)
    return A.astype(np.float32), B.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# 3. The papers' definitions on full weight deltas
# ---------------------------------------------------------------------------------------------------------------


def _flatten_tasks(task_vectors) -> tuple[list[np.ndarray], callable]:
    """Each task is an array or a {name: array} dict (a whole model); return flat float vectors and an inverse."""
    if len(task_vectors) == 0:
        raise ValueError("no task vectors to merge")
    first = task_vectors[0]
    if isinstance(first, Mapping):
        names = list(first)
        shapes = {k: np.shape(first[k]) for k in names}
        flats = []
        for i, tv in enumerate(task_vectors):
            if not isinstance(tv, Mapping) or set(tv) != set(names):
                raise ValueError(f"task vector {i} does not have the same tensor names as task vector 0")
            for k in names:
                if np.shape(tv[k]) != shapes[k]:
                    raise ValueError(f"task vector {i}: {k} has shape {np.shape(tv[k])}, task vector 0 has {shapes[k]}")
            flats.append(np.concatenate([np.asarray(tv[k]).reshape(-1) for k in names]))
        sizes = [int(np.prod(shapes[k])) for k in names]

        def unflatten(v):
            out, start = {}, 0
            for k, n in zip(names, sizes):
                out[k] = v[start:start + n].reshape(shapes[k])
                start += n
            return out

        return flats, unflatten
    shape = np.shape(first)
    for i, tv in enumerate(task_vectors):
        if np.shape(tv) != shape:
            raise ValueError(f"task vector {i} has shape {np.shape(tv)}, task vector 0 has {shape}")
    return [np.asarray(tv).reshape(-1) for tv in task_vectors], lambda v: v.reshape(shape)


def paper_task_arithmetic(task_vectors, lam: float = 1.0, weights: Sequence[float] | None = None):
    """Task arithmetic [Ilharco et al. 2023, Eq. in §2]: τ_new = λ · Σ_t w_t τ_t (w_t = 1 in the paper).

    ``task_vectors``: a list of arrays, or of {name: array} dicts (τ_t = θ_ft,t − θ_pre for each model).
    Negative weights subtract a task ("forgetting via negation"). Returns the same structure as one task vector;
    the merged model is θ_pre + τ_new. With weights w_t this is PEFT's ``task_arithmetic`` times λ.
    """
    flats, unflatten = _flatten_tasks(task_vectors)
    w = np.ones(len(flats)) if weights is None else np.asarray(weights, np.float64)
    stacked = np.stack(flats)  # (n, P)
    return unflatten((lam * (w[:, None] * stacked).sum(axis=0)).astype(stacked.dtype))


def paper_ties(task_vectors, density: float = 0.2, lam: float = 1.0):
    """TIES-Merging [Yadav et al. 2023, Algorithm 1]: trim, elect sign, disjoint merge, scale by λ.

    1. Trim: keep the top-k (k = ⌊density · P⌋) magnitudes of each task vector τ_t **over all its P parameters**
       (a whole model when tasks are dicts) → τ̂_t.
    2. Elect: γ = sgn(Σ_t τ̂_t) per parameter (the "total mass" rule).
    3. Disjoint merge: τ_m = mean of τ̂_t over the tasks t with sgn(τ̂_t) = γ (0 where none agree).
    4. τ_new = λ · τ_m (the paper tunes λ; 1 by default).

    Differences from PEFT's :func:`ties`: PEFT trims each tensor (each LoRA factor) separately, weights each task
    before the mean, and elects +1 where the sum is 0 (here: γ = 0 and nothing agrees, the same result).
    """
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flats, unflatten = _flatten_tasks(task_vectors)
    trimmed = np.stack([magnitude_based_pruning(f, density) for f in flats])  # (n, P)
    gamma = np.sign(trimmed.sum(axis=0))  # (P,)
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    count = agree.sum(axis=0)
    merged = (trimmed * agree).sum(axis=0) / np.maximum(count, 1)
    return unflatten((lam * merged).astype(trimmed.dtype))


def paper_dare(task_vectors, drop_rate: float, rng: np.random.Generator, lam: float = 1.0,
               merge: str = "task_arithmetic", weights: Sequence[float] | None = None):
    """DARE [Yu et al. 2024, Eq. 1–2] ("Drop And REscale"), then task arithmetic or TIES' sign election.

    For each task: m_t ~ Bernoulli(p) (drop mask, p = ``drop_rate``), τ̃_t = (1 − m_t) ⊙ τ_t / (1 − p), so that
    E[τ̃_t] = τ_t. Then ``merge="task_arithmetic"``: λ · Σ_t w_t τ̃_t; ``merge="ties"``: TIES' elect + disjoint mean
    of the τ̃_t (no further trimming, DARE replacing TIES' trim, as in "dare_ties"), times λ.

    Masks are drawn from ``rng`` task by task over the flattened task vector (dict order for dicts).
    Differences from PEFT: PEFT's ``density`` is 1 − p; PEFT applies it to each LoRA factor separately.
    """
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    flats, unflatten = _flatten_tasks(task_vectors)
    kept = np.stack([f * (rng.random(f.shape) >= drop_rate) / (1.0 - drop_rate) for f in flats]).astype(flats[0].dtype)
    if merge == "task_arithmetic":
        w = np.ones(len(flats)) if weights is None else np.asarray(weights, np.float64)
        return unflatten((lam * (w[:, None] * kept).sum(axis=0)).astype(kept.dtype))
    if merge == "ties":
        gamma = np.sign(kept.sum(axis=0))
        agree = (np.sign(kept) == gamma) & (kept != 0)
        merged = (kept * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
        return unflatten((lam * merged).astype(kept.dtype))
    raise ValueError(f"unknown merge {merge!r}; expected 'task_arithmetic' or 'ties'")


# ---------------------------------------------------------------------------------------------------------------
# 4. A whole model: PEFT's LoraModel.add_weighted_adapter
# ---------------------------------------------------------------------------------------------------------------


def _config_rank(config) -> int:
    return max([config.r, *config.rank_pattern.values()]) if config.rank_pattern else config.r


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    rng: np.random.Generator | None = None,
    *,
    peft_bugs: bool = False,
):
    """Add adapter ``adapter_name`` to ``model``: the ``weights``-weighted combination of ``adapters``.

    The semantics are PEFT 0.21.2's ``LoraModel.add_weighted_adapter`` (see the module docstring and
    :func:`combine_lora` for each ``combination_type``), with two corrections: the new adapter's scaling is 1
    whatever ``use_rslora`` the sources have (PEFT: √R for rsLoRA sources), and ``lora_B`` biases are combined
    (PEFT: dropped). ``peft_bugs=True`` — or :func:`add_weighted_adapter_like_peft` — reproduces PEFT.

    Parameters
    ----------
    model : a model with LoRA layers (``inject_lora`` / ``load_adapter``) and ``model.peft_config``.
    adapters, weights : source adapter names and one weight each (negative weights subtract).
    adapter_name : the new adapter's name (must not exist; PEFT silently returns instead).
    combination_type, svd_rank, svd_clamp, density, majority_sign_method : as PEFT.
    rng : the generator DARE's masks come from (dare_* types), drawn layer by layer in model order.

    The new config copies ``adapters[0]``'s with r = lora_alpha = R (the new rank), the union of the target
    modules, no rank/alpha patterns and ``use_rslora=False`` (PEFT keeps the source's). It is added inactive, as
    in PEFT: call ``lora_ref.adapters.lora.set_adapter(model, adapter_name)`` to use it. Returns ``model``.

    Raises ``ValueError`` for unknown adapters, a name that exists, weights that do not match, DoRA adapters
    (their magnitude vectors do not combine linearly; PEFT silently gets them wrong, issue #3761), ranks that the
    combination type cannot combine, and mixed list / regex ``target_modules``.
    """
    import copy as _copy

    from lora_ref.adapters.lora import lora_layers

    configs = dict(getattr(model, "peft_config", None) or {})
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    for a in adapters:
        if a not in configs:
            raise ValueError(f"adapter {a!r} does not exist (adapters: {sorted(configs)})")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name")
    for a in adapters:
        if configs[a].use_dora:
            raise ValueError(f"adapter {a!r} is a DoRA adapter; DoRA adapters cannot be combined "
                             "(their magnitude vectors do not add)")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; expected one of {', '.join(COMBINATION_TYPES)}")
    if len(adapters) == 1:
        combination_type = "linear"
    R = new_rank([_config_rank(configs[a]) for a in adapters], combination_type, svd_rank)

    kinds = {isinstance(configs[a].target_modules, str) for a in adapters}
    if len(kinds) > 1:
        raise ValueError("adapters whose target_modules mix a regex string and a list cannot be combined")
    if kinds == {True}:
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = sorted(set().union(*(configs[a].target_modules for a in adapters)))

    first = configs[adapters[0]]
    use_rslora = bool(first.use_rslora) if peft_bugs else False
    lora_bias = bool(first.lora_bias) if peft_bugs else any(configs[a].lora_bias for a in adapters)
    new_config = _copy.deepcopy(first)
    new_config.r, new_config.lora_alpha = R, R
    new_config.target_modules = targets
    new_config.rank_pattern, new_config.alpha_pattern = {}, {}
    new_config.use_rslora, new_config.lora_bias = use_rslora, lora_bias

    # compute every layer first, so that a failure leaves the model untouched
    plans = []
    for lname, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        names = [a for a, _ in present]
        biases = [layer.lora_B[a].bias.data if layer.lora_bias.get(a) else None for a in names]
        try:
            c = combine_lora(
                [layer.lora_A[a].weight.data for a in names], [layer.lora_B[a].weight.data for a in names],
                [layer.scaling[a] for a in names], [w for _, w in present], combination_type,
                svd_rank=R if combination_type in _SVD_TYPES else None, svd_clamp=svd_clamp, density=density,
                majority_sign_method=majority_sign_method, rng=rng, biases=biases, peft_bugs=peft_bugs,
                use_rslora=use_rslora)
        except ValueError as e:
            raise ValueError(f"{lname}: {e}") from None
        plans.append((layer, c))

    for layer, c in plans:
        layer.update_layer(adapter_name, R, R, first.lora_dropout, use_rslora, None, False, lora_bias,
                           rng=layer._rngs.get(adapters[0]))
        A = layer.lora_A[adapter_name].weight.data  # (R, in), zeros
        B = layer.lora_B[adapter_name].weight.data  # (out, R), zeros
        A[: c.r] = c.lora_A[:R]
        B[:, : c.r] = c.lora_B[:, :R]
        if lora_bias and c.bias is not None:
            layer.lora_B[adapter_name].bias.data[...] = c.bias
    configs[adapter_name] = new_config
    model.peft_config = configs
    return model


def add_weighted_adapter_like_peft(model, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                                   svd_clamp=None, density=None, majority_sign_method="total", rng=None):
    """PEFT 0.21.2's ``add_weighted_adapter`` *with its bugs*, for comparison: the new adapter keeps
    ``adapters[0]``'s ``use_rslora`` (scaling √R instead of 1, peft PR #3449 / issue #3761) and its ``lora_B``
    bias is zero (the sources' biases are dropped). Use :func:`add_weighted_adapter` for the correct result."""
    return add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                                density, majority_sign_method, rng, peft_bugs=True)
