"""LoRA: a frozen linear layer plus a trainable low-rank update, with PEFT's semantics.

For a frozen weight W (out, in) the layer computes [Hu et al. 2021, Eq. 3]

.. math::

    y = x W^\\top + s \\,(\\operatorname{dropout}(x) A^\\top) B^\\top, \\qquad
    s = \\alpha / r \\;\\; (\\text{or } \\alpha/\\sqrt{r} \\text{ with rsLoRA, Kalajdzievski 2023})

with ``lora_A`` (R, in) and ``lora_B`` (out, R). Merging adds ΔW = s·B·A to W, after which the layer is one
matrix product again [LoRA §4.1]. DoRA [Liu et al. 2024, arXiv 2402.09353] rescales each output row of W + ΔW to a
learned magnitude m.

Everything follows PEFT 0.21.2 (``peft/tuners/lora/layer.py``, ``dora.py``, ``variants.py``, ``tuners_utils.py``):
attribute names (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``, ``lora_magnitude_vector``),
so ``named_parameters()`` gives ``...q_proj.lora_A.default.weight``; target matching; initializations; the order of
operations in the forward pass; safe (two roundings) and unsafe (one rounding) merges into low-precision weights.

Low-precision bases. A weight stored in bfloat16 is held here as a float32 array whose values are bfloat16 numbers,
and its layer carries ``weight_dtype = ml_dtypes.bfloat16`` (see :func:`as_bfloat16`). The forward pass computes in
float32; merges round exactly where PEFT's in-place tensor arithmetic rounds.

Shapes: B batch, T time, R rank; ``in``/``out`` are the base layer's features.
Taught in ``notebooks/03_lora.ipynb``.

Notes
-----
The LoRA paper initializes A from a Gaussian; loralib and PEFT use Kaiming-uniform with a = √5, i.e.
U(−1/√in, 1/√in). PEFT's ``"gaussian"`` option draws A with standard deviation 1/r (not 1/√r).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import InitVar, asdict, dataclass, field
from typing import Iterator

import ml_dtypes
import numpy as np

from lora_ref.autograd import functional as F
from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import switch as fast
from lora_ref.modeling.nn import Linear, Module, ModuleDict, Parameter
from lora_ref.threads import one_blas_thread

__all__ = [
    "LoraConfig", "LoraLinear", "DoraMagnitude", "inject_lora", "merge_and_unload", "unload", "trainable_count",
    "lora_layers", "set_adapter", "disable_adapters", "delete_adapter", "as_bfloat16", "round_to_dtype",
    "matches_target", "find_targets", "DEFAULT_TARGET_MODULES", "register_lora_layer", "lora_layer_type",
    "delta_weight", "merged_weight", "dora_weight_norm", "dora_merged_weight", "svd_lowrank",
]

#: PEFT's per-architecture default for ``target_modules=None`` (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``
#: for llama): the query and value projections, as in the LoRA paper's main experiments.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")

_INITS = (True, False, "gaussian", "pissa", "olora")
_PISSA_NITER = "pissa_niter_"


def _pissa_niter(init) -> int | None:
    """N for PEFT's fast PiSSA ``"pissa_niter_N"`` (randomized SVD with N subspace iterations), else None."""
    if isinstance(init, str) and init.startswith(_PISSA_NITER) and init[len(_PISSA_NITER):].isdigit():
        return int(init[len(_PISSA_NITER):])
    return None


def svd_lowrank(W: np.ndarray, q: int, niter: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """A rank-``q`` SVD ``(U (out, q), S (q,), V (in, q))`` of ``W`` by randomized subspace iteration.

    Halko, Martinsson & Tropp 2011 ("Finding structure with randomness", Algorithm 4.4), as ``torch.svd_lowrank``
    computes it (``torch/_lowrank.py``): Q = orth(W·G) for a Gaussian G (in, q), then ``niter`` times
    Q = orth(W·orth(Wᵀ·Q)); finally the exact SVD of the small Qᵀ·W. No oversampling (PEFT asks for q = r), so the
    result approaches the top-q singular triplets as ``niter`` grows, fastest when σ_q ≫ σ_{q+1}. ``rng`` draws G
    (torch draws it from its global generator: the two never agree bit for bit, only in the subspace they find).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError("svd_lowrank draws a random test matrix: pass rng (np.random.Generator)")
    W = np.asarray(W, dtype=np.float32)
    Q, _ = np.linalg.qr(W @ rng.standard_normal((W.shape[1], q)).astype(np.float32))  # (out, q)
    for _ in range(int(niter)):
        Q, _ = np.linalg.qr(W @ np.linalg.qr(W.T @ Q)[0])
    U, S, Vh = np.linalg.svd(Q.T @ W, full_matrices=False)  # (q, in): small
    return (Q @ U).astype(np.float32), S.astype(np.float32), Vh.T.astype(np.float32)
_BIAS = ("none", "all", "lora_only")


# --------------------------------------------------------------------------------------------- config
@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter, with PEFT's names, defaults and meaning (``peft.LoraConfig``).

    Parameters
    ----------
    r : int
        Rank R of the update (default 8).
    lora_alpha : float
        α; the update is scaled by ``lora_alpha / r`` (default 8, so the default scaling is 1).
    lora_dropout : float
        Dropout probability on the LoRA branch input only (the base path never sees it).
    target_modules : None, str, list of str, or "all-linear"
        Which modules get an adapter. A list matches a module whose full name equals an entry or ends with
        ``"." + entry``; a string is a regex that must match the full name (``re.fullmatch``); ``"all-linear"``
        (any case) is every linear layer except the output head ``lm_head``. None means ``("q_proj", "v_proj")``.
    exclude_modules : None, str or list of str
        Modules never targeted (same matching rules as a list / a regex), checked first.
    use_rslora : bool
        Scale by α/√r instead of α/r (rank-stabilized LoRA, Kalajdzievski 2023).
    init_lora_weights : True, False, "gaussian", "pissa" or "olora"
        True: A ~ U(±1/√in) (Kaiming-uniform, a=√5), B = 0. "gaussian": A ~ N(0, (1/r)²), B = 0. False: A and B both
        nonzero (torch.nn.Linear's default init, U(±1/√fan_in)); the adapter is not a no-op, which tests need.
        "pissa": A, B from the top-r SVD of W and the base replaced by the residual (Meng et al. 2024).
        "pissa_niter_N" (PEFT's fast PiSSA): the same from a randomized SVD with N subspace iterations
        (:func:`svd_lowrank`; needs ``rng``).
        "olora": A, B from the QR decomposition of W (B = Q_r, A = R_r), the base W − s·B·A (Büyükakyüz 2024).
    use_dora : bool
        Weight-decomposed LoRA: a trainable magnitude per output row.
    bias : "none", "all" or "lora_only"
        Which base biases train along with the adapter.
    lora_bias : bool
        Give ``lora_B`` a bias (merged as b += s·b_B).
    rank_pattern, alpha_pattern : dict
        Per-module r / α: a key matches a module name ``n`` if ``re.match(rf"(.*\\.)?({key})$", n)``.
    layers_to_transform, layers_pattern : optional
        Restrict list targets to some layer indices (the first number after ``layers_pattern`` in the name).
    alpha, dropout, init : optional aliases of ``lora_alpha``, ``lora_dropout``, ``init_lora_weights``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    bias: str = "none"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    lora_bias: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    alpha: InitVar[float | None] = None
    dropout: InitVar[float | None] = None
    init: InitVar[bool | str | None] = None

    def __post_init__(self, alpha, dropout, init):
        if alpha is not None:
            self.lora_alpha = alpha
        if dropout is not None:
            self.lora_dropout = dropout
        if init is not None:
            self.init_lora_weights = init
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        self.r = int(self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float, np.number)) \
                or not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig: lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if (self.init_lora_weights not in _INITS and _pissa_niter(self.init_lora_weights) is None) or (
                isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool)):
            raise ValueError(f"LoraConfig: init_lora_weights must be one of {_INITS}, got {self.init_lora_weights!r}")
        if self.bias not in _BIAS:
            raise ValueError(f"LoraConfig: bias must be one of {_BIAS}, got {self.bias!r}")
        if self.fan_in_fan_out:
            raise ValueError("LoraConfig: fan_in_fan_out=True (GPT-2 Conv1D layout) is not supported; "
                             "weights are (out, in)")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m
                                                                 for m in self.modules_to_save):
                raise ValueError(f"LoraConfig: modules_to_save must be a list of module names, "
                                 f"got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        for name, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pat, dict):
                raise ValueError(f"LoraConfig: {name} must be a dict, got {type(pat).__name__}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None
                                                     or self.layers_pattern is not None):
            raise ValueError("LoraConfig: layers_to_transform / layers_pattern cannot be used when target_modules is "
                             "a str (a regex)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: layers_pattern needs layers_to_transform")
        if self.lora_bias and (self.use_dora or self.init_lora_weights not in (True, False)):
            raise ValueError("LoraConfig: lora_bias=True needs use_dora=False and init_lora_weights True or False")
        for key, rk in self.rank_pattern.items():
            if isinstance(rk, bool) or not isinstance(rk, (int, np.integer)) or rk <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be a positive integer, got {rk!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, α) for a module, after ``rank_pattern`` / ``alpha_pattern`` (PEFT's ``get_pattern_key``)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha)
        return int(r), alpha

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_key(pattern: dict, name: str) -> str:
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


# --------------------------------------------------------------------------------------------- dtypes
def round_to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Round float32 values to ``dtype`` (round to nearest even) and return them as float32.

    ``round_to_dtype(x, ml_dtypes.bfloat16)`` is what ``tensor.to(torch.bfloat16)`` does to the values.
    """
    dtype = np.dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    if dtype == np.float32:
        return x
    return x.astype(dtype).astype(np.float32)


def weight_dtype(layer: Module) -> np.dtype:
    """The dtype a layer's weight is stored in: its ``weight_dtype`` attribute, else the array's dtype."""
    dt = getattr(layer, "weight_dtype", None)
    return np.dtype(dt) if dt is not None else np.dtype(layer.weight.dtype)


def as_bfloat16(model: Module) -> Module:
    """Make every linear layer of ``model`` a bfloat16 layer: round its weight (and bias) to bfloat16 values.

    The arrays stay float32 (the autograd computes in float32); ``weight_dtype = ml_dtypes.bfloat16`` on the layer
    tells merges to round as a bfloat16 tensor would. Returns the model.
    """
    for _, m in model.named_modules():
        if isinstance(m, Linear):
            m.weight.data[...] = round_to_dtype(m.weight.data, ml_dtypes.bfloat16)
            if m.bias is not None:
                m.bias.data[...] = round_to_dtype(m.bias.data, ml_dtypes.bfloat16)
            m.weight_dtype = np.dtype(ml_dtypes.bfloat16)
    return model


# --------------------------------------------------------------------------------------------- merge arithmetic
def delta_weight(lora_A: np.ndarray, lora_B: np.ndarray, scaling: float) -> np.ndarray:
    """ΔW = (B @ A)·s in float32 (out, in), PEFT's ``get_delta_weight``; A (R, in), B (out, R). The product runs on one
    BLAS thread, so its bits (and DoRA's weight norm, merges) do not depend on the thread count: OpenBLAS's threaded
    driver sums some shapes in another order than its one-thread driver (:mod:`lora_ref.threads`)."""
    A = np.asarray(lora_A, dtype=np.float32)
    B = np.asarray(lora_B, dtype=np.float32)
    with one_blas_thread():
        return (B @ A) * np.float32(scaling)


def merged_weight(W: np.ndarray, delta: np.ndarray, dtype=np.float32, safe_merge: bool = False) -> np.ndarray:
    """W + ΔW stored in ``dtype``, rounded where PEFT rounds; float32 (out, in) holding ``dtype`` values.

    ``safe_merge=False`` (torch ``W.data += ΔW``): one rounding, round(W + ΔW).
    ``safe_merge=True`` (``W += ΔW.to(W.dtype)`` on a copy): two roundings, round(W + round(ΔW)).
    In float32 both are the float32 sum. ``W`` must already hold ``dtype`` values.
    """
    delta = np.asarray(delta, dtype=np.float32)
    if safe_merge:
        delta = round_to_dtype(delta, dtype)
    return round_to_dtype(np.asarray(W, dtype=np.float32) + delta, dtype)


def dora_weight_norm(W: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """n = ‖W + ΔW‖ per output row (the norm over in_features), float32 (out,): DoRA's norm in PEFT's layout."""
    V = np.asarray(W, dtype=np.float32) + np.asarray(delta, dtype=np.float32)
    return np.linalg.norm(V, axis=1).astype(np.float32)


def dora_merged_weight(W: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, weight_norm: np.ndarray,
                       dtype=np.float32) -> np.ndarray:
    """DoRA's merged weight round((m/n)[:, None]·(W + ΔW)), one rounding (safe and unsafe alike in PEFT).

    ``weight_norm`` n comes from the *unmerged* weight (:func:`dora_weight_norm`); m (out,) is the magnitude.
    """
    factor = np.asarray(magnitude, dtype=np.float32) / np.asarray(weight_norm, dtype=np.float32)  # (out,)
    return round_to_dtype(factor[:, None] * (np.asarray(W, dtype=np.float32) + delta), dtype)


# --------------------------------------------------------------------------------------------- the layer
class DoraMagnitude(Module):
    """DoRA's magnitude vector m (out,) for one adapter (PEFT's ``DoraLinearLayer``; its parameter is ``weight``)."""

    def __init__(self, magnitude: np.ndarray):
        super().__init__()
        self.weight = Parameter(np.asarray(magnitude, dtype=np.float32))


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or hasattr(ModuleDict, name):
        raise ValueError(f"adapter name must be a Python identifier that is not a ModuleDict attribute, got {name!r}")


def _features(base: Module) -> tuple[int, int]:
    inf, outf = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if inf is None or outf is None:
        w = getattr(base, "weight", None)
        if w is None or w.ndim != 2:
            raise ValueError(f"LoRA needs a linear base layer with a 2-D weight (out, in); got {type(base).__name__}")
        outf, inf = w.shape
    return int(inf), int(outf)


class LoraLinear(Module):
    """A base linear layer plus any number of named LoRA adapters (PEFT's ``lora.Linear``).

    Parameters
    ----------
    base_layer : Module
        Anything with ``weight`` (out, in) (or ``in_features``/``out_features``) and ``forward(x)``: a
        :class:`lora_ref.modeling.nn.Linear`, or a 4-bit layer whose subclass overrides :meth:`base_weight` and
        :meth:`set_base_weight` (or :meth:`merge_weight` / :meth:`unmerge_weight` outright). Its parameters are
        frozen (``requires_grad=False``).
    adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora, lora_bias :
        The first adapter (see :meth:`update_layer` and :class:`LoraConfig`).
    rng : numpy.random.Generator
        Draws the initial A (and B for ``init_lora_weights=False``) and, later, the dropout masks.

    Attributes
    ----------
    lora_A, lora_B : ModuleDict of Linear
        Per adapter: A = ``lora_A[name].weight`` (R, in), B = ``lora_B[name].weight`` (out, R), float32.
    lora_magnitude_vector : ModuleDict of DoraMagnitude
        Per DoRA adapter: m (out,).
    scaling, r, lora_alpha, lora_dropout : dict
        Per adapter: s, R, α, dropout probability.
    active_adapters : list of str
        Adapters used by the forward pass (PEFT allows several; usually one).
    merged_adapters : list of str
        Adapters currently added into the base weight, in merge order.
    """

    def __init__(self, base_layer: Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: bool | str | None = True,
                 use_dora: bool = False, lora_bias: bool = False, *, rng: np.random.Generator | None = None):
        super().__init__()
        if isinstance(base_layer, LoraLinear):
            raise ValueError("the base layer already is a LoraLinear; add adapters with update_layer")
        self.in_features, self.out_features = _features(base_layer)
        base_layer.requires_grad_(False)  # the base is frozen; only adapters train
        self.base_layer = base_layer
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_magnitude_vector = ModuleDict()
        self.lora_dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._rngs: dict[str, np.random.Generator | None] = {}
        self._dora_norms: dict[str, np.ndarray] = {}  # the row norms a DoRA merge used (needed to unmerge)
        self.active_adapters: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora,
                          lora_bias, rng=rng)

    # ------------------------------------------------------------------------------------------- adapters
    @property
    def weight(self) -> Parameter:
        """The base layer's weight (as ``peft``'s ``lora.Linear.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def weight_dtype(self) -> np.dtype:
        """The storage dtype of the base weight (float32, or bfloat16 values held in float32)."""
        return weight_dtype(self.base_layer)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def row_parallel(self) -> bool:
        """Whether a decoder layer holding this one may run its rows in parts from two threads at once
        (:func:`lora_ref.modeling.llama.row_parts`): not while a dropout is active in training mode (it draws random
        numbers in order), not for DoRA (its weight norm is a product of its own), and not while merged adapters are
        disabled (the next forward unmerges them, writing the base weight in place)."""
        if self.training and any(p > 0 for p in self.lora_dropout.values()):
            return False
        if any(self.use_dora.values()):
            return False
        base = type(self.base_layer).__dict__.get("row_parallel", False)  # declared by the base layer's own class
        return not (self.disable_adapters and self.merged) and base is True

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: bool | str | None = True, use_dora: bool = False,
                     lora_bias: bool = False, *, rng: np.random.Generator | None = None) -> None:
        """Add adapter ``adapter_name``: A (R, in) and B (out, R), scaling α/R (α/√R with rsLoRA), its init.

        ``init_lora_weights=None`` leaves A = B = 0 (and m = ‖W‖) for weights that are loaded right after.
        The new adapter is trainable only if it is active (as in PEFT).
        """
        _check_adapter_name(adapter_name)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if self.merged:
            raise ValueError("cannot add an adapter to a merged layer; unmerge first")
        r = int(r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self._rngs[adapter_name] = rng
        self.lora_A[adapter_name] = Linear(self.in_features, r, bias=False)  # weight (R, in)
        self.lora_B[adapter_name] = Linear(r, self.out_features, bias=lora_bias)  # weight (out, R)
        self.reset_lora_parameters(adapter_name, init_lora_weights, rng=rng)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(self.dora_weight_norm(adapter_name))
        self._set_requires_grad()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str | None,
                              rng: np.random.Generator | None) -> None:
        """Initialize A and B as PEFT's ``reset_lora_parameters`` does (see :class:`LoraConfig`)."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        if init_lora_weights is None:
            return
        if init_lora_weights == "pissa":
            self.pissa_init(adapter_name)
        elif _pissa_niter(init_lora_weights) is not None:
            if not isinstance(rng, np.random.Generator):
                raise ValueError(f"init_lora_weights={init_lora_weights!r} draws a random test matrix: "
                                 "pass rng=np.random.Generator")
            self.pissa_init(adapter_name, niter=_pissa_niter(init_lora_weights), rng=rng)
        elif init_lora_weights == "olora":
            self.olora_init(adapter_name)
        else:
            self._random_init(adapter_name, init_lora_weights, rng)
        if self.weight_dtype != np.float32:
            # PEFT moves a new adapter to the base's dtype and back to float32: its initial values are rounded
            for p in (A, B, self.lora_B[adapter_name].bias):
                if p is not None:
                    p.data[...] = round_to_dtype(p.data, self.weight_dtype)

    def _random_init(self, adapter_name: str, init_lora_weights, rng) -> None:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        r, fan_in = A.shape
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"unknown init_lora_weights {init_lora_weights!r}; use True, False, 'gaussian' or 'pissa'")
        if rng is None:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} draws random numbers: "
                             "pass rng=np.random.Generator")
        if init_lora_weights == "gaussian":
            A.data[...] = rng.normal(0.0, 1.0 / r, size=A.shape)  # std 1/r, as PEFT
        else:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5): gain·√(3/fan_in) = √(1/3)·√(3/fan_in)
            A.data[...] = rng.uniform(-bound, bound, size=A.shape)
        if init_lora_weights is False:  # torch.nn.Linear's default init for B too: U(±1/√fan_in), fan_in = r
            bound = 1.0 / math.sqrt(r)
            B.data[...] = rng.uniform(-bound, bound, size=B.shape)
            if self.lora_B[adapter_name].bias is not None:
                self.lora_B[adapter_name].bias.data[...] = rng.uniform(-bound, bound, size=self.out_features)
        else:
            B.data[...] = 0.0

    def pissa_init(self, adapter_name: str, niter: int | None = None, rng: np.random.Generator | None = None) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-R singular triplets of W; the base keeps the residual.

        With W = U·diag(S)·Vh and S_r' = S_r / s: A = diag(√S_r')·Vh_r (R, in), B = U_r·diag(√S_r') (out, R),
        and W ← W − s·B·A, so the layer's output is unchanged at init. With ``niter`` (PEFT's ``"pissa_niter_N"``)
        the triplets come from :func:`svd_lowrank` with that many subspace iterations and ``rng``'s test matrix.
        """
        s, r = self.scaling[adapter_name], self.r[adapter_name]
        W = self.base_weight()  # (out, in) float32
        if niter is None:
            U, S, Vh = np.linalg.svd(W, full_matrices=False)
        else:
            U, S, V = svd_lowrank(W, r, niter, rng)
            Vh = V.T
        Sr = S[:r] / np.float32(s)
        A = np.sqrt(Sr)[:, None] * Vh[:r]  # (R, in)
        B = U[:, :r] * np.sqrt(Sr)[None, :]  # (out, R)
        self.lora_A[adapter_name].weight.data[...] = A
        self.lora_B[adapter_name].weight.data[...] = B
        self.set_base_weight(W - delta_weight(A, B, s))  # s·(B @ A), on one BLAS thread

    def olora_init(self, adapter_name: str) -> None:
        """OLoRA (Büyükakyüz 2024, arXiv 2406.01775; PEFT ``olora_init``): W = Q·R (reduced QR of the (out, in) weight),
        B = Q[:, :R] (out, R), A = R[:R] (R, in), and W ← W − s·B·A. A quantized base is dequantized first and the
        residual re-quantized (as PEFT does for a bitsandbytes base); the layer's output changes by that rounding."""
        s, r = self.scaling[adapter_name], self.r[adapter_name]
        W = self.base_weight()  # (out, in) float32
        Qm, Rm = np.linalg.qr(W)  # reduced: Q (out, k), R (k, in), k = min(out, in)
        B, A = np.ascontiguousarray(Qm[:, :r], np.float32), np.ascontiguousarray(Rm[:r], np.float32)
        self.lora_A[adapter_name].weight.data[...] = A
        self.lora_B[adapter_name].weight.data[...] = B
        self.set_base_weight(W - delta_weight(A, B, s))  # s·(B @ A), on one BLAS thread

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make ``adapter_names`` the active adapters; only their parameters are trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.lora_A:
                raise ValueError(f"no adapter {n!r} in this layer (adapters: {list(self.lora_A)})")
        self.active_adapters = names
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            for name, m in d.items():
                m.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged)."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter {adapter_name!r} in this layer")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter_name in d:
                del d[adapter_name]
        for d in (self.lora_dropout, self.scaling, self.r, self.lora_alpha, self.use_rslora, self.use_dora,
                  self.lora_bias, self._rngs):
            d.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name] or list(self.lora_A)[:1]

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x) -> Tensor:
        """y = base(x) + Σ_active s·(dropout(x)·Aᵀ)·Bᵀ; only base(x) when merged or disabled.

        x: (…, in) → (…, out). DoRA adapters add (m/n − 1)⊙(x·Wᵀ) + (m/n)⊙(x·Aᵀ·Bᵀ)·s instead, with n the row
        norms of W + s·B·A, detached (no gradient flows through n; DoRA §4.3).
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        result = self.base_layer(x)  # (…, out)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            p = self.lora_dropout[name]
            if self.use_dora[name]:
                result = result + self._dora_forward(name, x, result)
                continue
            xd = F.dropout(x, p, self._rngs[name], training=self.training) if p > 0 else x
            if fast.enabled() and B.bias is None and self._output_is_scratch(result):
                result = F.lora_add(result, xd, A.weight, B.weight, s)  # one node, added in place
                continue
            result = result + B(A(xd)) * s  # (…, R) then (…, out), then × s: PEFT's order
        return result

    def _output_is_scratch(self, result: Tensor) -> bool:
        """Whether the adapter may be added into ``result``'s buffer (:func:`lora_ref.autograd.functional.lora_add`): it is
        the float32 output of a base layer whose class declares ``fresh_output = True`` (its forward returns a new
        array that its backward does not read: :class:`lora_ref.modeling.nn.Linear`, the 4-bit
        :class:`lora_ref.modeling.linear4bit.Linear4bit`; declared per class, not inherited)."""
        d = result.data
        return (vars(type(self.base_layer)).get("fresh_output", False) and d.dtype == np.float32
                and d.flags.c_contiguous and d.flags.writeable)

    def _dora_forward(self, name: str, x, base_result: Tensor) -> Tensor:
        """DoRA's extra output (PEFT ``DoraLinearLayer.forward``): (m/n − 1)⊙base + (m/n)⊙lora·s."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        p = self.lora_dropout[name]
        m = self.lora_magnitude_vector[name].weight  # (out,)
        n = self.dora_weight_norm(name)  # (out,) constant: detached
        mag_norm_scale = m / Tensor(n)  # (out,)
        if p > 0 and self.training:
            x = F.dropout(x, p, self._rngs[name], training=True)
            base = F.linear(x, Tensor(self.base_weight()))  # x·Wᵀ recomputed on the dropped-out input
        else:
            bias = self.bias
            base = base_result - Tensor(bias.data) if bias is not None else base_result  # (…, out)
        lora = B(A(x))  # (…, out)
        return (mag_norm_scale - 1.0) * base + mag_norm_scale * lora * s

    def dora_weight_norm(self, name: str, base_weight: np.ndarray | None = None) -> np.ndarray:
        """n = ‖W + s·B·A‖ per output row (over in_features), float32 (out,). PEFT's ``get_weight_norm``."""
        W = self.base_weight() if base_weight is None else base_weight
        return dora_weight_norm(W, self.get_delta_weight(name))

    # ------------------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> np.ndarray:
        """ΔW = (B @ A) · s, float32 (out, in)."""
        return delta_weight(self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data,
                            self.scaling[adapter_name])

    def base_weight(self) -> np.ndarray:
        """The base weight as float32 (out, in), a copy; a quantized base layer (one with ``dequantize``) is
        dequantized, so a plain LoraLinear around a 4-bit layer merges correctly too."""
        if hasattr(self.base_layer, "dequantize"):
            return np.array(self.base_layer.dequantize(), dtype=np.float32, copy=True)
        return np.array(self.base_layer.weight.data, dtype=np.float32, copy=True)

    def set_base_weight(self, w: np.ndarray) -> None:
        """Store float32 ``w`` (out, in) as the base weight, rounded once to its storage dtype.

        A quantized base layer (one with ``set_weight``) re-quantizes ``w``. A float weight is updated in place, so
        references to it stay valid.
        """
        if hasattr(self.base_layer, "set_weight"):
            self.base_layer.set_weight(w)
            return
        self.base_layer.weight.data[...] = round_to_dtype(w, self.weight_dtype)

    def merge_weight(self, adapter_name: str, safe_merge: bool) -> None:
        """Add one adapter into the base weight, rounding as PEFT does.

        Unsafe (``W.data += ΔW`` in torch): one rounding, W ← round(W + ΔW). Safe (a clone, then
        ``W += ΔW.to(W.dtype)``): two roundings, W ← round(W + round(ΔW)), then a NaN/inf check that raises
        ``ValueError`` before anything is written. DoRA: W ← round((m/n)[:, None]·(W + ΔW)) with n from the
        unmerged weight, both ways.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # a broken adapter is reported below, not warned about
            self._merge_weight(adapter_name, safe_merge)

    def _merge_weight(self, adapter_name: str, safe_merge: bool) -> None:
        dt = self.weight_dtype
        delta = self.get_delta_weight(adapter_name)  # (out, in) float32
        W = self.base_weight()
        if self.use_dora[adapter_name]:
            n = self.dora_weight_norm(adapter_name, self._unmerged_base_weight(safe_merge))
            self._dora_norms[adapter_name] = n
            new = dora_merged_weight(W, delta, self.lora_magnitude_vector[adapter_name].weight.data, n, dt)
        else:
            new = merged_weight(W, delta, dt, safe_merge)
        new_bias = None
        if self.lora_bias[adapter_name]:
            if self.bias is None:
                raise ValueError("cannot merge a LoRA adapter with lora_bias=True into a base layer without bias")
            b_B = self.lora_B[adapter_name].bias.data
            new_bias = round_to_dtype(self.bias.data + b_B * np.float32(self.scaling[adapter_name]), dt)  # once
        if safe_merge:
            if not np.all(np.isfinite(new)) or (new_bias is not None and not np.all(np.isfinite(new_bias))):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        self.set_base_weight(new)
        if new_bias is not None:
            self.bias.data[...] = new_bias

    def unmerge_weight(self, adapter_name: str) -> None:
        """Take one merged adapter out again: W ← round(W − round(ΔW)) (DoRA: round(W/(m/n) − ΔW)).

        Exact in float32 only up to rounding; in bfloat16 it does not restore W (as in PEFT).
        """
        dt = self.weight_dtype
        delta = self.get_delta_weight(adapter_name)
        W = self.base_weight()
        if self.use_dora[adapter_name]:
            n = self._dora_norms.pop(adapter_name)
            factor = self.lora_magnitude_vector[adapter_name].weight.data / n  # (out,)
            new = W / factor[:, None] - delta
        else:
            new = W - round_to_dtype(delta, dt)
        self.set_base_weight(new)
        if self.lora_bias[adapter_name]:
            b = self.bias.data - self.lora_B[adapter_name].bias.data * np.float32(self.scaling[adapter_name])
            self.bias.data[...] = round_to_dtype(b, dt)

    def _unmerged_base_weight(self, safe_merge: bool = False) -> np.ndarray:
        """The base weight with the already merged adapters taken out (what DoRA's norm is computed from).

        As PEFT's ``_unmerged_base_weight``: unmerge, copy, merge the same adapters again the same way.
        """
        if not self.merged_adapters:
            return self.base_weight()
        merged = list(self.merged_adapters)
        self.unmerge()
        W = self.base_weight()
        for name in merged:
            self.merge_weight(name, safe_merge)
            self.merged_adapters.append(name)
        return W

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters (default: the active ones not merged yet) into the base weight; see :meth:`merge_weight`."""
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        # as PEFT: adapters this layer does not have are skipped (a model-level name may target other layers)
        names = [n for n in names if n not in self.merged_adapters and n in self.lora_A]
        for name in names:
            self.merge_weight(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Unmerge every merged adapter, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.unmerge_weight(name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.lora_A)}"


# --------------------------------------------------------------------------------------------- model level
#: LoraLinear subclass to use for a base layer type (e.g. a 4-bit layer whose merge re-quantizes); see
#: :func:`register_lora_layer`.
_LAYER_TYPES: dict[type, type] = {}


def register_lora_layer(base_type: type, lora_type: type) -> None:
    """Make :func:`inject_lora` wrap layers of ``base_type`` in ``lora_type`` (a :class:`LoraLinear` subclass)."""
    if not (isinstance(lora_type, type) and issubclass(lora_type, LoraLinear)):
        raise ValueError(f"register_lora_layer needs a LoraLinear subclass, got {lora_type!r}")
    _LAYER_TYPES[base_type] = lora_type


def lora_layer_type(base: Module) -> type:
    """The LoraLinear class that wraps ``base`` (the most specific registered base type, else LoraLinear)."""
    for cls in type(base).__mro__:
        if cls in _LAYER_TYPES:
            return _LAYER_TYPES[cls]
    return LoraLinear


def lora_layers(model: Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every :class:`LoraLinear` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def _is_linear(m: Module) -> bool:
    return isinstance(m, (Linear, LoraLinear)) or (
        hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight"))


def matches_target(config: LoraConfig, key: str) -> bool:
    """Whether module name ``key`` is targeted (PEFT ``check_target_module_exists``; "all-linear" resolved first)."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return False
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return False
    targets = config.target_modules if config.target_modules is not None else list(DEFAULT_TARGET_MODULES)
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    if found and layers is not None and (not isinstance(layers, list) or len(layers) != 0):
        pattern = config.layers_pattern
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pat in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def _is_embedding(m: Module) -> bool:
    from lora_ref.modeling.nn import Embedding

    return isinstance(m, Embedding)


def _candidate_modules(model: Module) -> list[tuple[str, Module]]:
    """Every named module except the model itself and anything inside a LoraLinear."""
    out, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        out.append((name, m))
        if isinstance(m, LoraLinear):
            inside.append(name)
    return out


def find_targets(model: Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` targets, in model order (``ValueError`` if none, or a non-linear match).

    ``"all-linear"`` is every linear layer except the output head (the top-level ``lm_head``), as PEFT does for a
    transformers model.
    """
    cands = _candidate_modules(model)
    tm = config.target_modules
    if isinstance(tm, str) and tm.lower() == "all-linear":
        names = [n for n, m in cands if _is_linear(m) and n != "lm_head"]
        config = copy.copy(config)
        config.target_modules = names
    names = []
    for n, m in cands:
        if matches_target(config, n):
            if not (_is_embedding(m) or _is_linear(m)):
                raise ValueError(f"target module {n} is a {type(m).__name__}; LoRA here supports linear and embedding layers")
            names.append(n)
    if not names:
        raise ValueError(f"target modules {config.target_modules!r} not found in the base model "
                         f"(some module names: {[n for n, _ in cands][:8]})")
    return names


def inject_lora(model: Module, config: LoraConfig, name: str = "default", *,
                rng: np.random.Generator | None = None) -> Module:
    """Wrap the targeted linear layers of ``model`` in :class:`LoraLinear` with adapter ``name``; returns ``model``.

    The base is frozen (``requires_grad=False`` on every parameter that is not a LoRA parameter, except biases
    with ``bias="all"``/``"lora_only"``). The first adapter becomes active and trainable; a later one is added
    inactive (as PEFT's ``add_adapter``) until :func:`set_adapter`. ``model.peft_config[name]`` keeps the config,
    with ``"all-linear"`` expanded to the module names (as PEFT saves it). A base layer whose type was registered
    with :func:`register_lora_layer` is wrapped in that LoraLinear subclass.
    """
    return _inject(model, config, name, rng=rng, init_lora_weights=config.init_lora_weights)


def _inject(model: Module, config: LoraConfig, name: str, *, rng, init_lora_weights) -> Module:
    """:func:`inject_lora` with the init chosen by the caller (None: zeros, for weights loaded next)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"inject_lora needs a LoraConfig, got {type(config).__name__}")
    _check_adapter_name(name)
    existing = getattr(model, "peft_config", None) or {}
    if name in existing:
        raise ValueError(f"adapter {name!r} already exists in the model")
    targets = find_targets(model, config)
    if config.modules_to_save:
        from lora_ref.adapters.modules_to_save import find_modules_to_save

        clash = set(find_modules_to_save(model, config.modules_to_save)) & set(targets)  # checked before any change
        if clash:
            raise ValueError(f"{sorted(clash)[0]} is both a LoRA target and in modules_to_save; choose one")
    first = not existing
    for tname in targets:
        r, alpha = config.rank_and_alpha(tname)
        m = model.get_submodule(tname)
        if isinstance(m, LoraLinear):
            m.update_layer(name, r, alpha, config.lora_dropout, config.use_rslora, init_lora_weights,
                           config.use_dora, config.lora_bias, rng=rng)
        else:
            layer = lora_layer_type(m)(m, name, r, alpha, config.lora_dropout, config.use_rslora,
                                       init_lora_weights, config.use_dora, config.lora_bias, rng=rng)
            if not first:  # keep the model's active adapter(s), even if this layer has none of them
                active = model.active_adapter
                layer.active_adapters = [active] if isinstance(active, str) else list(active)
                layer._set_requires_grad()
            model.set_submodule(tname, layer)
    saved = copy.deepcopy(config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        saved.target_modules = sorted(targets)
    elif config.target_modules is None:
        saved.target_modules = sorted(DEFAULT_TARGET_MODULES)
    if config.modules_to_save:
        from lora_ref.adapters.modules_to_save import wrap_modules_to_save

        wrap_modules_to_save(model, config.modules_to_save, name, targets)
    existing = dict(existing)
    existing[name] = saved
    model.peft_config = existing
    if first:
        model.active_adapter = name
    _freeze_base(model, config.bias)
    return model


def _freeze_base(model: Module, bias: str = "none") -> None:
    """requires_grad False for every non-LoRA parameter (PEFT ``_mark_only_adapters_as_trainable``)."""
    lora_names = {n for n, _ in lora_layers(model)}
    for pname, p in model.named_parameters():
        if "lora_" in pname or ".modules_to_save." in pname or pname.startswith("modules_to_save."):
            continue  # adapters, and the trained copies of modules_to_save (their wrapper sets requires_grad)
        trainable = False
        if pname.endswith("bias"):
            if bias == "all":
                trainable = True
            elif bias == "lora_only":
                trainable = any(pname == f"{ln}.base_layer.bias" for ln in lora_names)
        p.requires_grad = trainable


def set_adapter(model: Module, name: str | list[str]) -> Module:
    """Activate adapter(s) ``name`` in every layer that has them; only they train. Returns ``model``."""
    names = [name] if isinstance(name, str) else list(name)
    known = set(getattr(model, "peft_config", {}) or {})
    for n in names:
        if n not in known:
            raise ValueError(f"no adapter {n!r} in the model (adapters: {sorted(known)})")
    for _, layer in lora_layers(model):
        # a layer without any of these adapters computes as its base layer
        layer.active_adapters = list(names)
        layer._set_requires_grad()
    from lora_ref.adapters.modules_to_save import modules_to_save_wrappers

    for _, w in modules_to_save_wrappers(model):
        w.set_adapter(names[0])
    model.active_adapter = names[0] if len(names) == 1 else names
    return model


def delete_adapter(model: Module, name: str) -> Module:
    """Remove adapter ``name`` from every layer (layers left without adapters are unwrapped)."""
    known = getattr(model, "peft_config", {}) or {}
    if name not in known:
        raise ValueError(f"no adapter {name!r} in the model (adapters: {sorted(known)})")
    for lname, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.delete_adapter(name)
            if not len(layer.lora_A):
                model.set_submodule(lname, layer.base_layer)
    model.peft_config = {k: v for k, v in known.items() if k != name}
    return model


@contextlib.contextmanager
def disable_adapters(model: Module) -> Iterator[Module]:
    """Inside the block the model computes with its base weights only (merged adapters are unmerged first)."""
    from lora_ref.adapters.modules_to_save import modules_to_save_wrappers

    layers = [l for _, l in lora_layers(model)] + [w for _, w in modules_to_save_wrappers(model)]
    prev = [l.disable_adapters for l in layers]
    for l in layers:
        l.disable_adapters = True
    try:
        yield model
    finally:
        for l, p in zip(layers, prev):
            l.disable_adapters = p


def merge_and_unload(model: Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> Module:
    """Merge the adapters into the base weights and replace every LoraLinear by its base layer; returns ``model``.

    ``adapter_names`` None merges each layer's active adapters; names the model does not have raise ``ValueError``.
    """
    known = getattr(model, "peft_config", None)
    if adapter_names is not None and known is not None:
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        unknown = [n for n in adapter_names if n not in known]
        if unknown:
            raise ValueError(f"no adapter(s) {unknown} in the model (adapters: {sorted(known)})")
    for name, layer in list(lora_layers(model)):
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        model.set_submodule(name, layer.base_layer)
    from lora_ref.adapters.modules_to_save import unwrap_modules_to_save

    unwrap_modules_to_save(model, adapter_names)  # the trained copies replace the originals (as PEFT)
    _drop_peft_state(model)
    return model


def unload(model: Module) -> Module:
    """Replace every LoraLinear by its base layer without merging (unmerging first if needed)."""
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        model.set_submodule(name, layer.base_layer)
    from lora_ref.adapters.modules_to_save import unwrap_modules_to_save

    unwrap_modules_to_save(model)
    _drop_peft_state(model)
    return model


def _drop_peft_state(model: Module) -> None:
    for attr in ("peft_config", "active_adapter"):
        if attr in model.__dict__:
            object.__delattr__(model, attr)


def trainable_count(model: Module) -> int:
    """Number of trainable scalars: Σ R·(in + out) over LoRA layers (+ out per DoRA magnitude, + lora_B biases)."""
    return int(sum(p.size for p in model.parameters() if p.requires_grad))
