"""The memory of one training step of our own NumPy Llama, measured with tracemalloc against the prediction.

:func:`lora_ref.analysis.memory.predict_lora_ref_step` predicts the step from the op ledger of
:mod:`lora_ref.analysis.memory_profile`; :func:`measure` trains the tutorial model for one step as full, lora or
qlora and compares the peak traced by ``tracemalloc`` (which sees NumPy's and Numba's buffers) with it:
``lora-ref count --measure``. Taught in ``notebooks/04_counts.ipynb``.
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc

import numpy as np

from lora_ref.analysis.counts import lora_plan, parse_targets, spec_from_config
from lora_ref.analysis.memory import predict_lora_ref_step as predict
from lora_ref.analysis.memory_profile import fast_paths_enabled, step_peak  # noqa: F401  (step_peak: read beside the measurement in chapter 4)

# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------

TUTORIAL_BATCH = 8
TUTORIAL_SEQ = 128


def tutorial_config() -> dict:
    """The tutorial model's config.json (:data:`lora_ref.training.tutorial.TUTORIAL_CONFIG`) with its model_type."""
    from lora_ref.training.tutorial import TUTORIAL_CONFIG

    return {"model_type": "llama", **TUTORIAL_CONFIG}


def _build(method: str, config: dict, r: int, targets, rng: np.random.Generator):
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.modeling.llama import Llama
    from lora_ref.training.optim import AdamW

    model = Llama(dict(config), rng=rng)
    if method != "full":
        if isinstance(targets, str) and targets.strip().lower() == "all-linear":
            lora_config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        else:
            ranks = parse_targets(targets, r)  # PEFT-style list plus rank_pattern for "name=R" entries
            lora_config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ranks),
                                     rank_pattern={k: v for k, v in ranks.items() if v != r})
    if method == "qlora":
        from lora_ref.adapters.qlora import inject_qlora, quantize_model

        quantize_model(model, blocksize=64, double_quant=True)
        inject_qlora(model, lora_config, rng=rng)
    elif method == "lora":
        inject_lora(model, lora_config, rng=rng)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, AdamW(params, lr=1e-3)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits  # optional, like lora_ref.reference.vectors
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def measure(method: str, config: dict | None = None, *, batch: int = TUTORIAL_BATCH, seq: int = TUTORIAL_SEQ,
            r: int = 8, targets="all-linear", seed: int = 0) -> dict:
    """Train one step as ``method`` and return the predicted and the measured bytes of the step.

    The model, its optimizer and a first step (which creates AdamW's state and compiles the Numba kernels) run
    untraced. After ``zero_grad``, ``tracemalloc`` starts; the peak it traces during the second step (every
    NumPy and Numba buffer allocated by the step) is ``measured_bytes``. ``predicted_bytes`` is the step part of
    the memory model (:func:`predict`), ``phase`` where it puts the peak.
    """
    from lora_ref.training.loop import train_step

    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown method {method!r}; known: full, lora, qlora")
    config = config or tutorial_config()
    spec = spec_from_config(config)
    plan = None if method == "full" else lora_plan(spec, targets, r)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config["vocab_size"], (batch, seq))  # (B, T)
    y = rng.integers(0, config["vocab_size"], (batch, seq))  # (B, T)
    if tracemalloc.is_tracing():
        raise ValueError("measure() needs tracemalloc to be off when it starts (it starts and stops it itself)")
    with _one_blas_thread():  # BLAS threads change no traced buffer, but oversubscribed cores slow matmuls 10×
        model, opt = _build(method, config, r, targets, rng)
        train_step(model, opt, x, y)
        opt.zero_grad()
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            train_step(model, opt, x, y)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    fast = fast_paths_enabled()
    pred = predict(spec, method, plan, batch, seq, fast=fast)
    return {"method": method, "predicted_bytes": int(pred["step"]), "measured_bytes": int(peak - baseline),
            "phase": step_peak(spec, method, plan, batch, seq, fast)["phase"], "fast_paths": fast,
            "batch": batch, "seq": seq, "r": r if plan else None, "targets": targets if plan else None}


def measure_all(progress=None, **kwargs) -> list[dict]:
    """:func:`measure` for full, lora and qlora (``progress``: a stream for one line per method)."""
    rows = []
    for method in ("full", "lora", "qlora"):
        if progress is not None:
            progress.write(f"measuring one {method} step ...\n")
        rows.append(measure(method, **kwargs))
    return rows
