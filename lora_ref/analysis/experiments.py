"""Fine-tuning experiments and the linear algebra that reads them: cached runs, spectra, ranks, subspaces.

Two halves, one concept: *what a fine-tune changed in the weights*.

**Runs.** :func:`full_finetune`, :func:`lora_finetune` and :func:`qlora_finetune` fine-tune a pretrained base
(by default the tutorial model of :mod:`lora_ref.training.tutorial`) on the fine-tuning corpus (Python source,
:func:`lora_ref.training.data.finetuning_corpus`) and measure the validation loss on **both** corpora: the fine-tuning
domain (what was learned) and the pretraining domain (what was forgotten). Each run is stored in the artifact cache
(:mod:`lora_ref.files.cache`; safetensors + JSON only), keyed by every setting that determines it — the base's weights
(a fingerprint), both corpora, the recipe, the seed — so the notebooks, the claims ledger and the tour share runs,
and a second run of a notebook only loads them. A :class:`Run` gives the losses, the loss history, the trained
model and the weight updates ΔW of the block matrices.

**Linear algebra** on ΔW (all in float64; weights are (out, in), as everywhere in lora_ref):

- :func:`spectrum`, :func:`energy_rank` — the singular values and the smallest k holding 90% of ‖ΔW‖²_F
  ("energy rank"; Biderman et al. 2024 §4.6 measure it on full fine-tunes and find it high);
- :func:`random_like` — a Gaussian matrix of the same shape and Frobenius norm (the no-structure baseline);
- :func:`truncate`, :func:`functional_rank` — the smallest k whose rank-k truncation of *every* ΔW recovers 90% of
  the fine-tuning loss gain ("functional rank", a name this book gives it). Energy rank and functional rank are two
  meanings of "low rank" that can disagree (``notebooks/09_intrinsic_rank.ipynb``): the first is about the matrix,
  the second about what the model needs;
- :func:`subspace_similarity` — the LoRA paper's normalized subspace similarity φ(A₁, A₂, i, j) (Hu et al. 2021,
  §7.2 Eq. 4, App. G), on the rows of Vh of svd(lora_A);
- :func:`amplification_factor` — ‖ΔW‖_F / ‖UᵀWVᵀ‖_F with U, V the top-r singular vectors of ΔW (LoRA §7.3, H.4);
- :func:`intruder_similarity`, :func:`intruder_dimensions` — singular vectors of the fine-tuned W that are far from
  every singular vector of the base W (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
  equivalence"; their definition: top-k left singular vectors, max |cos| < ε, k = 10, ε = 0.5).

Taught in ``notebooks/09_intrinsic_rank.ipynb`` (the SVD study) and ``notebooks/10_rank_choice.ipynb`` (rank,
scaling, targets, learning rate, forgetting).

Recipe. Fine-tuning uses AdamW with β = (0.9, 0.999) (transformers' defaults), a cosine schedule with 5% warmup
down to lr/10, gradient clipping at 1.0 and **no weight decay**, for full fine-tuning too: decay pulls W towards 0,
which would add a multiple of the (full-rank) base W to ΔW and blur exactly the spectrum under study. One seed
drives everything: ``np.random.default_rng(seed).spawn(2)`` gives the adapter-initialization generator and the batch
generator, as in ``lora-ref finetune``; runs with the same seed see the same batches.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lora_ref
from lora_ref.adapters.lora import LoraConfig, find_targets, inject_lora, lora_layers
from lora_ref.files import cache
from lora_ref.files.outputs import write_json
from lora_ref.modeling.llama import Llama
from lora_ref.quick import pick
from lora_ref.training.data import Corpus, finetuning_corpus, pretraining_corpus
from lora_ref.training.loop import History, evaluate, train

__all__ = [
    "Run", "full_finetune", "lora_finetune", "qlora_finetune", "base_losses", "model_fingerprint",
    "adapted_matrix_names", "FINETUNE", "EVAL", "BOOK", "BOOK_QUICK", "EVAL_QUICK", "book_settings",
    "spectrum", "energy_fraction", "energy_rank", "energy_rank_of_spectrum", "random_like", "truncate",
    "FunctionalRank", "truncation_loss", "functional_rank",
    "subspace_basis", "subspace_similarity", "subspace_similarity_grid", "random_subspace_similarity",
    "top_directions", "random_directions", "projection_norm", "amplification_factor",
    "intruder_similarity", "intruder_dimensions",
]

#: Bump when the meaning of a run changes without its settings changing (invalidates cached runs).
EXPERIMENTS_VERSION = 1

#: The fine-tuning recipe shared by every run (see the module docstring); ``lr`` and ``steps`` are per run.
FINETUNE: dict = {"batch": 8, "seq": 128, "warmup_fraction": 0.05, "min_lr_fraction": 0.1, "weight_decay": 0.0,
                  "betas": [0.9, 0.999], "max_grad_norm": 1.0, "eval_points": 5, "eval_batches": 4}

#: How the final losses are measured: the same ``max_batches`` deterministic batches of ``batch`` windows of
#: ``seq`` bytes from each corpus's validation split (:func:`lora_ref.training.data.eval_batches`), for every run.
EVAL: dict = {"batch": 32, "seq": 128, "max_batches": 8}

#: The settings the book's chapters (09, 10, 11) and the full ``lora-ref tour`` share, so each run is made once:
#: steps per run, the peak learning rates of full fine-tuning and of LoRA, and LoRA's α.
BOOK: dict = {"steps": 100, "lr_full": 1e-3, "lr_lora": 1e-2, "alpha": 16.0}

#: QUICK mode (``LORA_REF_QUICK=1``, :mod:`lora_ref.quick`): the chapters' small configuration. A fifth of the steps,
#: the same rates and α, so every comparison of the full configuration still runs, on a model that has learned less.
BOOK_QUICK: dict = {"steps": 20, "lr_full": 1e-3, "lr_lora": 1e-2, "alpha": 16.0}

#: QUICK mode's evaluation: two batches of each validation split instead of eight (a noisier, 4× cheaper loss).
EVAL_QUICK: dict = {"batch": 32, "seq": 128, "max_batches": 2}


def book_settings() -> dict:
    """The chapters' settings: :data:`BOOK` plus ``"eval"`` (:data:`EVAL`), or their QUICK-mode versions."""
    return {**pick(BOOK, BOOK_QUICK), "eval": dict(pick(EVAL, EVAL_QUICK))}

RUN_FILE = "run.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


# ================================================================================================================
# identities (what a cache key is made of)
# ================================================================================================================

def model_fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's name, dtype, shape and bytes, in sorted name order.

    Two models with equal weights have equal fingerprints; a run's cache key holds its base's fingerprint, so a
    run is never reused for a different base.
    """
    h = hashlib.sha256()
    for name, a in sorted(model.state_dict().items()):
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _corpora() -> tuple[Corpus, Corpus]:
    """(fine-tuning corpus, pretraining corpus), read once per process."""
    return finetuning_corpus(), pretraining_corpus()


def _corpus_id(c: Corpus) -> dict:
    return {"name": c.name, "fingerprint": c.fingerprint}


def _default_base(base):
    if base is None:
        from lora_ref.training import tutorial

        return tutorial.pretrained_base()
    if not isinstance(base, Llama):
        raise ValueError(f"base must be a lora_ref Llama (or None for the tutorial base), got {type(base).__name__}")
    if any(True for _ in lora_layers(base)):
        raise ValueError("base must be a plain Llama without LoRA layers (merge or remove adapters first)")
    return base


def adapted_matrix_names(model) -> list[str]:
    """The block matrices LoRA's ``"all-linear"`` targets (every linear layer but ``lm_head``), in model order."""
    return find_targets(model, LoraConfig(target_modules="all-linear"))


# ================================================================================================================
# evaluation
# ================================================================================================================

def _evaluation(evaluation: dict | None) -> dict:
    """``evaluation`` checked (``batch``, ``seq``, ``max_batches``: positive integers), or :data:`EVAL` for None."""
    if evaluation is None:
        return EVAL
    if not isinstance(evaluation, dict) or set(evaluation) != set(EVAL):
        raise ValueError(f"evaluation must be a dict with keys {sorted(EVAL)}, got {evaluation!r}")
    for k, v in evaluation.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"evaluation[{k!r}] must be a positive integer, got {v!r}")
    return {k: int(evaluation[k]) for k in EVAL}


def _eval_both(model, eval_settings: dict) -> dict[str, float]:
    ft, pt = _corpora()
    e = eval_settings
    return {"finetune": evaluate(model, ft.val, e["batch"], e["seq"], e["max_batches"]),
            "pretrain": evaluate(model, pt.val, e["batch"], e["seq"], e["max_batches"])}


def base_losses(base=None, *, evaluation: dict | None = None) -> dict[str, float]:
    """Validation losses (nats/byte) of ``base`` (default: the tutorial base) on both corpora, cached.

    Returns ``{"finetune": ..., "pretrain": ...}`` measured as ``evaluation`` (default :data:`EVAL`) says.
    """
    base = _default_base(base)
    ev = _evaluation(evaluation)
    ft, pt = _corpora()
    desc = {"what": "base validation losses", "base": model_fingerprint(base), "finetune_corpus": _corpus_id(ft),
            "pretrain_corpus": _corpus_id(pt), "eval": ev, "version": EXPERIMENTS_VERSION,
            "lora_ref": lora_ref.__version__}

    def build(folder: Path) -> None:
        write_json(folder / RUN_FILE, _eval_both(base, ev))

    folder = cache.get_or_build("base-eval", desc, build)
    return json.loads((folder / RUN_FILE).read_text())


# ================================================================================================================
# runs
# ================================================================================================================

@dataclass
class Run:
    """A finished fine-tuning run, trained now or loaded from the cache.

    Attributes
    ----------
    kind : ``"full"``, ``"lora"`` or ``"qlora"``.
    settings : everything that determined the run (its cache description).
    history : the :class:`~lora_ref.training.loop.History` (training loss per step, fine-tuning validation loss at
        ``history.val_steps``, on ``FINETUNE["eval_batches"]`` batches).
    val_loss : ``{"finetune": ..., "pretrain": ...}`` after training (nats/byte, :data:`EVAL`).
    base_val_loss : the same for the base before training.
    trainable : number of trained parameters.
    seconds : wall-clock time of the training steps when the run was made.
    folder : the run's cache folder.
    base : the base model the run started from (not modified).
    """

    kind: str
    settings: dict
    history: History
    val_loss: dict
    base_val_loss: dict
    trainable: int
    seconds: float
    folder: Path
    base: Llama

    @property
    def gain(self) -> float:
        """Fine-tuning-domain loss improvement: base loss − fine-tuned loss (nats/byte; > 0 means it learned)."""
        return self.base_val_loss["finetune"] - self.val_loss["finetune"]

    @property
    def forgetting(self) -> float:
        """Pretraining-domain loss increase: fine-tuned loss − base loss (nats/byte; > 0 means it forgot)."""
        return self.val_loss["pretrain"] - self.base_val_loss["pretrain"]

    def model(self) -> Llama:
        """The fine-tuned model: a full checkpoint, or a copy of the base carrying the trained adapter (unmerged)."""
        if self.kind == "full":
            return Llama.from_pretrained(self.folder / MODEL_DIR)
        from lora_ref.adapters.peft_files import load_adapter

        model = copy.deepcopy(self.base)
        if self.kind != "qlora":
            return load_adapter(model, self.folder / ADAPTER_DIR)
        from lora_ref.adapters.qlora import quantize_model

        q = self.settings["quantization"]
        quantize_model(model, blocksize=q["blocksize"], double_quant=q["double_quant"], quant_type=q["quant_type"])
        return load_adapter(model, self.folder / ADAPTER_DIR)  # 4-bit layers get LoraLinear4bit wrappers

    def lora_factors(self) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """``{module name: (lora_A (R, in), lora_B (out, R), scaling)}`` of a LoRA/QLoRA run (float32 arrays)."""
        if self.kind == "full":
            raise ValueError("a full fine-tune has no LoRA factors; use deltas()")
        return {name: (layer.lora_A["default"].weight.data.copy(), layer.lora_B["default"].weight.data.copy(),
                       float(layer.scaling["default"])) for name, layer in lora_layers(self.model())}

    def deltas(self) -> dict[str, np.ndarray]:
        """``{module name: ΔW (out, in) float64}`` for the adapted block matrices.

        Full fine-tuning: W_fine-tuned − W_base for every block matrix (:func:`adapted_matrix_names`). LoRA/QLoRA:
        s·B·A of each adapted layer (rank ≤ R by construction); for QLoRA this is the update on top of the
        dequantized NF4 base, not the difference to the float base.
        """
        if self.kind == "full":
            tuned = self.model()
            out = {}
            for name in adapted_matrix_names(self.base):
                w1 = tuned.get_submodule(name).weight.data.astype(np.float64)
                w0 = self.base.get_submodule(name).weight.data.astype(np.float64)
                out[name] = w1 - w0  # (out, in)
            return out
        return {name: scaling * (B.astype(np.float64) @ A.astype(np.float64))  # (out, R) @ (R, in)
                for name, (A, B, scaling) in self.lora_factors().items()}

    def tuned_weights(self) -> dict[str, np.ndarray]:
        """``{module name: W_base + ΔW (out, in) float64}``: the fine-tuned block matrices (merged for LoRA)."""
        return {name: self.base.get_submodule(name).weight.data.astype(np.float64) + d
                for name, d in self.deltas().items()}

    def __repr__(self) -> str:
        return (f"Run({self.kind}, trainable={self.trainable:,}, finetune loss {self.base_val_loss['finetune']:.3f}"
                f" → {self.val_loss['finetune']:.3f}, pretrain loss {self.base_val_loss['pretrain']:.3f} → "
                f"{self.val_loss['pretrain']:.3f})")


def _check_common(steps: int, lr: float, seed: int, batch: int | None = None) -> None:
    """``ValueError`` naming the first bad run setting (``batch`` checked only when given)."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _train_and_store(kind: str, desc: dict, base: Llama, prepare, save, progress: bool) -> Run:
    """Look the run up in the cache; if missing, ``prepare(init_rng)`` a model, train it, ``save`` it, evaluate."""
    base_val = base_losses(base, evaluation=desc["eval"])
    r = FINETUNE

    def build(folder: Path) -> None:
        init_rng, data_rng = np.random.default_rng(desc["seed"]).spawn(2)
        model = prepare(init_rng)
        ft, _ = _corpora()
        steps, lr = desc["steps"], desc["lr"]
        hist = train(model, ft, steps, lr, r["batch"], r["seq"], data_rng,
                     warmup=max(1, round(r["warmup_fraction"] * steps)), min_lr=lr * r["min_lr_fraction"],
                     weight_decay=r["weight_decay"], betas=tuple(r["betas"]), max_grad_norm=r["max_grad_norm"],
                     eval_every=max(1, steps // r["eval_points"]), eval_batches=r["eval_batches"],
                     progress=progress, desc=f"{kind} fine-tune")
        val = _eval_both(model, desc["eval"])
        save(model, folder)
        write_json(folder / RUN_FILE, {"kind": kind, "history": hist.to_dict(), "val_loss": val,
                                       "trainable": model.num_parameters(trainable_only=True),
                                       "seconds": hist.seconds})

    folder = cache.get_or_build(f"{kind}-finetune", desc, build)
    rec = json.loads((folder / RUN_FILE).read_text())
    return Run(kind=kind, settings=desc, history=History.from_dict(rec["history"]), val_loss=rec["val_loss"],
               base_val_loss=base_val, trainable=int(rec["trainable"]), seconds=float(rec["seconds"]),
               folder=folder, base=base)


def _description(what: str, base: Llama, steps: int, lr: float, seed: int, evaluation: dict | None = None,
                 **extra) -> dict:
    ft, pt = _corpora()
    return {"what": what, "base": model_fingerprint(base), "finetune_corpus": _corpus_id(ft),
            "pretrain_corpus": _corpus_id(pt), "recipe": FINETUNE, "eval": _evaluation(evaluation), "steps": int(steps),
            "lr": float(lr), "seed": int(seed), **extra, "version": EXPERIMENTS_VERSION,
            "lora_ref": lora_ref.__version__}


def full_finetune(base=None, steps: int = 200, lr: float = 1e-3, *, trainable: str = "all-linear", seed: int = 0,
                  evaluation: dict | None = None, progress: bool = True) -> Run:
    """Full fine-tuning of ``base`` on the fine-tuning corpus (cached); returns the :class:`Run`.

    Parameters
    ----------
    base : a plain :class:`~lora_ref.modeling.llama.Llama` (not modified), or None for the tutorial base.
    steps, lr : optimizer steps and peak learning rate (recipe: :data:`FINETUNE`).
    trainable : ``"all-linear"`` trains the block matrices only — exactly the matrices all-linear LoRA adapts, so
        the run's ΔW is the whole fine-tune and compares one to one with LoRA's; ``"all"`` trains every parameter
        (embeddings, head and norms too).
    seed : drives the batches.
    evaluation : how the final losses are measured (default :data:`EVAL`; QUICK mode: :data:`EVAL_QUICK`).
    """
    base = _default_base(base)
    _check_common(steps, lr, seed)
    if trainable not in ("all-linear", "all"):
        raise ValueError(f"trainable must be 'all-linear' or 'all', got {trainable!r}")
    desc = _description("full fine-tune", base, steps, lr, seed, evaluation, trainable=trainable)

    def prepare(init_rng):
        model = copy.deepcopy(base)
        if trainable == "all":
            return model.requires_grad_(True)
        model.requires_grad_(False)
        for name in adapted_matrix_names(model):
            model.get_submodule(name).weight.requires_grad = True
        return model

    def save(model, folder):
        model.save_pretrained(folder / MODEL_DIR)

    return _train_and_store("full", desc, base, prepare, save, progress)


def _lora_config(r, alpha, targets, use_rslora) -> tuple[LoraConfig, dict]:
    if not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(targets, str):
        if targets.lower() != "all-linear":
            raise ValueError(f"targets must be 'all-linear' or a list of module names, got {targets!r}")
        tm, key = "all-linear", "all-linear"
    else:
        tm = sorted(str(t) for t in targets)
        if not tm:
            raise ValueError("targets is empty")
        key = tm
    cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=tm, use_rslora=bool(use_rslora))
    return cfg, {"r": int(r), "lora_alpha": float(alpha), "target_modules": key, "use_rslora": bool(use_rslora)}


def lora_finetune(base=None, r: int = 8, alpha: float = 16.0, targets="all-linear", use_rslora: bool = False,
                  lr: float = 3e-3, steps: int = 200, seed: int = 0, *, evaluation: dict | None = None,
                  progress: bool = True) -> Run:
    """LoRA fine-tuning of ``base`` on the fine-tuning corpus (cached); returns the :class:`Run`.

    Parameters
    ----------
    base : a plain :class:`~lora_ref.modeling.llama.Llama` (not modified; a copy gets the adapter), or None for the
        tutorial base.
    r, alpha, use_rslora : rank R and α; scaling α/R, or α/√R with ``use_rslora`` (PEFT's ``LoraConfig``).
    targets : ``"all-linear"`` or a list of module names (``["q_proj", "v_proj"]``), PEFT's ``target_modules``.
    lr, steps : peak learning rate and optimizer steps (recipe: :data:`FINETUNE`).
    seed : drives the initialization of A (PEFT's Kaiming-uniform; B = 0) and the batches.
    evaluation : how the final losses are measured (default :data:`EVAL`; QUICK mode: :data:`EVAL_QUICK`).
    """
    base = _default_base(base)
    _check_common(steps, lr, seed)
    cfg, lora_desc = _lora_config(r, alpha, targets, use_rslora)
    desc = _description("LoRA fine-tune", base, steps, lr, seed, evaluation, lora=lora_desc)

    def prepare(init_rng):
        return inject_lora(copy.deepcopy(base), cfg, rng=init_rng)

    return _train_and_store("lora", desc, base, prepare, _save_adapter, progress)


def qlora_finetune(base=None, r: int = 8, alpha: float = 16.0, targets="all-linear", use_rslora: bool = False,
                   lr: float = 3e-3, steps: int = 200, seed: int = 0, *, blocksize: int = 64,
                   double_quant: bool = True, quant_type: str = "nf4", evaluation: dict | None = None,
                   progress: bool = True) -> Run:
    """QLoRA: :func:`lora_finetune` on a copy of ``base`` whose block matrices are frozen 4-bit
    (:func:`lora_ref.adapters.qlora.quantize_model`: NF4, blocksize 64, double quantization by default; the embeddings and
    ``lm_head`` stay float). Cached; returns the :class:`Run`. Its ``val_loss`` is that of the 4-bit model with the
    adapter, its ``base_val_loss`` that of the float base: ``gain`` and ``forgetting`` include the quantization error.
    """
    from lora_ref.adapters.qlora import inject_qlora, quantize_model

    base = _default_base(base)
    _check_common(steps, lr, seed)
    cfg, lora_desc = _lora_config(r, alpha, targets, use_rslora)
    quant = {"blocksize": int(blocksize), "double_quant": bool(double_quant), "quant_type": str(quant_type)}
    desc = _description("QLoRA fine-tune", base, steps, lr, seed, evaluation, lora=lora_desc, quantization=quant)

    def prepare(init_rng):
        model = quantize_model(copy.deepcopy(base), **quant)
        return inject_qlora(model, cfg, rng=init_rng)

    return _train_and_store("qlora", desc, base, prepare, _save_adapter, progress)


def _save_adapter(model, folder: Path) -> None:
    from lora_ref.adapters.peft_files import save_adapter

    save_adapter(model, folder / ADAPTER_DIR)


# ================================================================================================================
# spectra and energy rank
# ================================================================================================================

def _matrix(M, what: str = "matrix") -> np.ndarray:
    a = np.asarray(M, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} holds NaN or inf")
    return a


def spectrum(M) -> np.ndarray:
    """Singular values σ₁ ≥ σ₂ ≥ … of ``M`` (m, n), float64 (min(m, n),)."""
    return np.linalg.svd(_matrix(M), compute_uv=False)


def energy_fraction(s) -> np.ndarray:
    """Cumulative energy of a spectrum: entry k−1 is (σ₁² + … + σ_k²) / Σσ² (the share of ‖M‖²_F in the top k).

    ``s`` : singular values (any order is sorted descending). All zeros gives all ones (nothing to explain).
    """
    s = np.sort(np.abs(np.asarray(s, dtype=np.float64)))[::-1]
    e = np.cumsum(s * s)
    return np.ones_like(e) if e[-1] == 0 else e / e[-1]


def energy_rank_of_spectrum(s, fraction: float = 0.9) -> int:
    """The smallest k with σ₁² + … + σ_k² ≥ ``fraction`` · Σσ² (0 for a zero spectrum)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or not np.any(s):
        return 0
    frac = energy_fraction(s)
    # a relative slack of 1e-12 so that an exact rank-k matrix reaches 100% at k despite rounding
    return int(np.searchsorted(frac, fraction * (1 - 1e-12), side="left") + 1)


def energy_rank(M, fraction: float = 0.9) -> int:
    """Energy rank of ``M`` (m, n): the smallest k whose top-k singular values hold ``fraction`` of ‖M‖²_F.

    By Eckart–Young this is the smallest rank of an approximation with ‖M − M_k‖²_F ≤ (1 − fraction)·‖M‖²_F.
    """
    return energy_rank_of_spectrum(spectrum(M), fraction)


def random_like(M, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian matrix of ``M``'s shape scaled to ``M``'s Frobenius norm (float64): the structureless baseline.

    Its spectrum follows the Marchenko–Pastur law; its energy rank is a large fraction of min(m, n).
    """
    a = _matrix(M)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"random_like needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    g = rng.standard_normal(a.shape)
    return g * (np.linalg.norm(a) / np.linalg.norm(g))


def truncate(M, k: int) -> np.ndarray:
    """The best rank-``k`` approximation of ``M`` (m, n) in Frobenius norm: U_k diag(σ_1..k) V_kᵀ (Eckart–Young).

    k = 0 gives zeros; k ≥ min(m, n) gives ``M`` (float64) back.
    """
    a = _matrix(M)
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if k == 0:
        return np.zeros_like(a)
    if k >= min(a.shape):
        return a.copy()
    U, s, Vh = np.linalg.svd(a, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vh[:k]  # (m, k) @ (k, n)


# ================================================================================================================
# functional rank
# ================================================================================================================

@dataclass
class FunctionalRank:
    """The loss of the model with every ΔW truncated to rank k, and the smallest k recovering ``fraction``.

    ``ks`` and ``losses`` hold every k evaluated (sorted); ``recovered[i] = (base_loss − losses[i]) /
    (base_loss − full_loss)``; ``rank`` is the smallest evaluated k with ``recovered ≥ fraction`` (None if even the
    untruncated ΔW does not improve on the base).
    """

    fraction: float
    ks: list
    losses: list
    base_loss: float
    full_loss: float
    rank: int | None

    @property
    def recovered(self) -> np.ndarray:
        gain = self.base_loss - self.full_loss
        return (self.base_loss - np.asarray(self.losses)) / gain if gain > 0 else np.full(len(self.losses), np.nan)


def truncation_loss(model, base_weights: dict, factors: dict, k: int, tokens: np.ndarray, eval_settings: dict) -> float:
    """Loss of ``model`` with each named weight set to W₀ + (rank-k truncation of ΔW); weights are restored after.

    ``factors[name] = (U, s, Vh)`` is the SVD of ΔW; ``base_weights[name]`` is W₀ (out, in).
    """
    saved = {}
    try:
        for name, (U, s, Vh) in factors.items():
            p = model.get_submodule(name).weight
            saved[name] = p.data.copy()
            kk = min(k, s.size)
            p.data[...] = base_weights[name] + (U[:, :kk] * s[:kk]) @ Vh[:kk]  # (out, k) @ (k, in)
        e = eval_settings
        return evaluate(model, tokens, e["batch"], e["seq"], e["max_batches"])
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data[...] = w


def functional_rank(run: Run, fraction: float = 0.9, ks=None, *, eval_settings: dict | None = None) -> FunctionalRank:
    """The smallest k whose rank-k truncation of every ΔW of ``run`` recovers ``fraction`` of its fine-tuning gain.

    The model is the fine-tuned one with each block matrix set to W₀ + truncate(ΔW, k) (for ``trainable="all"``
    runs the embeddings, head and norms keep their fine-tuned values); the gain is measured on the fine-tuning
    corpus's validation windows (``eval_settings``, default :data:`EVAL`) against the base model's loss and the
    untruncated fine-tune's loss. ``ks`` (default 0, 1, 2, 4, … up to the largest min(out, in)) are evaluated,
    then the interval between the last k below ``fraction`` and the first above is bisected, assuming the recovered
    gain grows with k there. Cached (JSON) under the run's key.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if run.kind not in ("full", "lora"):
        raise ValueError(f"functional_rank needs a full or LoRA run, got a {run.kind} run")
    deltas = run.deltas()
    kmax = max(min(d.shape) for d in deltas.values())
    if ks is None:
        ks = [0] + [2 ** i for i in range(int(math.log2(kmax)) + 1)]
        ks = ks + ([kmax] if ks[-1] != kmax else [])
    ks = sorted({int(k) for k in ks})
    if ks[0] < 0:
        raise ValueError(f"ranks must be >= 0, got {ks[0]}")
    e = EVAL if eval_settings is None else eval_settings
    desc = {"what": "functional rank", "run": run.settings, "fraction": float(fraction), "ks": ks, "eval": e,
            "version": EXPERIMENTS_VERSION}

    def build(folder: Path) -> None:
        ft, _ = _corpora()
        model = run.model()
        if run.kind != "full":  # LoRA: evaluate the merged weights on a plain copy of the base
            model = copy.deepcopy(run.base)
        base_w = {n: run.base.get_submodule(n).weight.data.astype(np.float64) for n in deltas}
        factors = {n: np.linalg.svd(d, full_matrices=False) for n, d in deltas.items()}
        base_loss = evaluate(run.base, ft.val, e["batch"], e["seq"], e["max_batches"])
        losses = {k: truncation_loss(model, base_w, factors, k, ft.val, e) for k in ks}
        full_loss = truncation_loss(model, base_w, factors, kmax, ft.val, e)
        target = base_loss - fraction * (base_loss - full_loss)
        passing = [k for k in ks if losses[k] <= target]
        if passing and base_loss > full_loss:
            hi = passing[0]
            below = [k for k in ks if k < hi]
            lo = below[-1] if below else None
            while lo is not None and hi - lo > 1:  # bisect between the grid points
                mid = (lo + hi) // 2
                losses[mid] = truncation_loss(model, base_w, factors, mid, ft.val, e)
                if losses[mid] <= target:
                    hi = mid
                else:
                    lo = mid
        write_json(folder / RUN_FILE, {"ks": sorted(losses), "losses": [losses[k] for k in sorted(losses)],
                                       "base_loss": base_loss, "full_loss": full_loss})

    folder = cache.get_or_build("functional-rank", desc, build)
    rec = json.loads((folder / RUN_FILE).read_text())
    target = rec["base_loss"] - fraction * (rec["base_loss"] - rec["full_loss"])
    passing = [k for k, v in zip(rec["ks"], rec["losses"]) if v <= target]
    rank = passing[0] if passing and rec["base_loss"] > rec["full_loss"] else None
    return FunctionalRank(fraction=float(fraction), ks=rec["ks"], losses=rec["losses"], base_loss=rec["base_loss"],
                          full_loss=rec["full_loss"], rank=rank)


# ================================================================================================================
# subspace similarity (LoRA §7.2)
# ================================================================================================================

def subspace_basis(A) -> np.ndarray:
    """Orthonormal basis of the row space of ``lora_A`` (R, in): the rows of Vh from svd(A), (min(R, in), in).

    Ordered by singular value, so the first i rows span the top-i directions (the paper's U^i; Hu et al. 2021, §7.2).
    """
    _, _, Vh = np.linalg.svd(_matrix(A, "lora_A"), full_matrices=False)
    return Vh


def subspace_similarity_grid(A1, A2) -> np.ndarray:
    """φ(A₁, A₂, i, j) for every i ≤ rows of A₁'s basis and j ≤ rows of A₂'s: an array (R₁, R₂), entry [i−1, j−1].

    φ(A₁, A₂, i, j) = ‖U₁^{i⊤} U₂^{j}‖²_F / min(i, j) ∈ [0, 1] (Hu et al. 2021, Eq. 4), where U^i holds the top-i
    right singular vectors of A (:func:`subspace_basis`). 1 when one top subspace contains the other, 0 when they
    are orthogonal. ``A1`` (R₁, in) and ``A2`` (R₂, in) must have the same ``in``.
    """
    V1, V2 = subspace_basis(A1), subspace_basis(A2)
    if V1.shape[1] != V2.shape[1]:
        raise ValueError(f"lora_A matrices must share the input dimension, got shapes {np.shape(A1)} and {np.shape(A2)}")
    M = V1 @ V2.T  # (R1, R2): cosines between basis vectors
    C = np.cumsum(np.cumsum(M * M, axis=0), axis=1)  # C[i-1, j-1] = ‖V1[:i] V2[:j]ᵀ‖²_F
    i = np.arange(1, M.shape[0] + 1)[:, None]
    j = np.arange(1, M.shape[1] + 1)[None, :]
    return C / np.minimum(i, j)


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """φ(A₁, A₂, i, j) of the LoRA paper (Eq. 4); see :func:`subspace_similarity_grid`."""
    grid = subspace_similarity_grid(A1, A2)
    if not (1 <= i <= grid.shape[0] and 1 <= j <= grid.shape[1]):
        raise ValueError(f"need 1 <= i <= {grid.shape[0]} and 1 <= j <= {grid.shape[1]}, got i={i}, j={j}")
    return float(grid[i - 1, j - 1])


def random_subspace_similarity(i: int, j: int, n: int) -> float:
    """Expected φ of two independent uniformly random subspaces of dimensions i and j in Rⁿ: max(i, j) / n.

    E‖P_iᵀQ_j‖²_F = i·j/n (each of the i·j squared cosines has mean 1/n), divided by min(i, j).
    """
    if not (1 <= i <= n and 1 <= j <= n):
        raise ValueError(f"need 1 <= i, j <= n, got i={i}, j={j}, n={n}")
    return max(i, j) / n


# ================================================================================================================
# amplification (LoRA §7.3)
# ================================================================================================================

def top_directions(M, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``r`` left and right singular vectors of ``M`` (m, n): U (m, r) and Vh (r, n)."""
    a = _matrix(M)
    if not isinstance(r, (int, np.integer)) or not 1 <= r <= min(a.shape):
        raise ValueError(f"r must be an integer in 1..{min(a.shape)}, got {r!r}")
    U, _, Vh = np.linalg.svd(a, full_matrices=False)
    return U[:, :r], Vh[:r]


def random_directions(shape: tuple[int, int], r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random orthonormal U (m, r) and Vh (r, n) (QR of Gaussian matrices): the paper's "random" row of Table 7."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"random_directions needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    m, n = shape
    if not 1 <= r <= min(m, n):
        raise ValueError(f"r must lie in 1..{min(m, n)}, got {r}")
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return U, V.T


def projection_norm(W, U, Vh) -> float:
    """‖Uᵀ W Vhᵀ‖_F: how much of ``W`` (m, n) lies in the subspaces U (m, r) × Vh (r, n)."""
    W = _matrix(W, "W")
    U, Vh = np.asarray(U, dtype=np.float64), np.asarray(Vh, dtype=np.float64)
    if U.shape[0] != W.shape[0] or Vh.shape[1] != W.shape[1] or U.shape[1] != Vh.shape[0]:
        raise ValueError(f"shapes do not fit: W {W.shape}, U {U.shape}, Vh {Vh.shape} (need (m, r), (r, n))")
    return float(np.linalg.norm(U.T @ W @ Vh.T))  # (r, m) @ (m, n) @ (n, r)


def amplification_factor(delta, W, r: int) -> float:
    """‖ΔW‖_F / ‖UᵀWVᵀ‖_F with U, V the top-``r`` singular vectors of ΔW (Hu et al. 2021, §7.3, Table 7, H.4).

    Large when ΔW points in directions that W barely uses (ΔW amplifies them), small when ΔW lies along W's
    dominant directions. ``delta`` and ``W`` are (out, in). For a ΔW of rank above ``r`` (a full fine-tune) the
    numerator is still the whole ‖ΔW‖_F.
    """
    delta, W = _matrix(delta, "ΔW"), _matrix(W, "W")
    if delta.shape != W.shape:
        raise ValueError(f"ΔW and W must have the same shape, got {delta.shape} and {W.shape}")
    U, Vh = top_directions(delta, r)
    return float(np.linalg.norm(delta)) / projection_norm(W, U, Vh)


# ================================================================================================================
# intruder dimensions (Shuttleworth et al. 2024)
# ================================================================================================================

def intruder_similarity(W_base, W_tuned, k: int = 10) -> np.ndarray:
    """For each of the top-``k`` left singular vectors of ``W_tuned``: its largest |cosine| with any left singular
    vector of ``W_base`` (both (out, in)); float64 (k,). Near 1: the direction existed before fine-tuning."""
    W0, W1 = _matrix(W_base, "W_base"), _matrix(W_tuned, "W_tuned")
    if W0.shape != W1.shape:
        raise ValueError(f"W_base and W_tuned must have the same shape, got {W0.shape} and {W1.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(W0.shape):
        raise ValueError(f"k must be an integer in 1..{min(W0.shape)}, got {k!r}")
    U0, _, _ = np.linalg.svd(W0, full_matrices=False)  # (out, min)
    U1, _, _ = np.linalg.svd(W1, full_matrices=False)
    return np.abs(U1[:, :k].T @ U0).max(axis=1)  # (k, min) → (k,)


def intruder_dimensions(W_base, W_tuned, k: int = 10, epsilon: float = 0.5) -> int:
    """How many of the top-``k`` singular vectors of ``W_tuned`` are intruders: max |cos| with every singular vector
    of ``W_base`` below ``epsilon`` (Shuttleworth et al. 2024; their defaults k = 10, ε = 0.5)."""
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1], got {epsilon}")
    return int(np.sum(intruder_similarity(W_base, W_tuned, k) < epsilon))
