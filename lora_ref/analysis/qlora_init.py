"""Does LoftQ or PiSSA initialization recover QLoRA's quantization error? Measured on the real model.

QLoRA starts fine-tuning from Q(W) + 0: the adapter's B is zero, so the model it trains is off by the whole NF4
error W − Q(W) (Dettmers et al. 2023). Two initializations promise a better start on the same 4-bit budget:

- **LoftQ** (Li et al. 2023, arXiv 2310.08659; :mod:`lora_ref.adapters.loftq`): alternate Q = NF4(W − BA) and a
  rank-r SVD of W − Q, so that Q + BA ≈ W;
- **QPiSSA** (Meng et al. 2024, arXiv 2404.02948 §4; :mod:`lora_ref.adapters.pissa`): put W's top-r singular part
  in the adapter and quantize only the residual, whose smaller, flatter values NF4 rounds with less error.

PEFT's trackers ask whether either really helps (peft#1525, #1929; LoftQ#25, #34). This module answers it on
SmolLM2-135M-Instruct (:mod:`lora_ref.analysis.real_llm`) with one comparison per initialization, all three on the
same quantizer (NF4, blocksize 64, no double quantization, CUDA rounding: what PEFT's ``loftq_init`` uses), the
same rank, the same scaling s = α/r = 1 (LoftQ's factors carry no α/r) and the same batches:

- at initialization, per adapted layer, ‖W − (Q + s·BA)‖_F against QLoRA's ‖W − Q(W)‖_F, and the next-token loss
  on general text (:func:`lora_ref.analysis.real_llm.general_loss`) of the initialized model, against the float
  base's: the weight error and what it does to the function;
- after ``steps`` optimizer steps on the invented-facts task of chapter 12 (the same recipe,
  :data:`lora_ref.analysis.real_llm.RECIPE`), the training loss per step, the answer loss on the trained questions
  and on their paraphrases, and the general-text loss again.

W is the model's float weight, which is itself the Q4_1 GGUF release dequantized (not the original bfloat16
checkpoint): the NF4 error measured here is the error of re-quantizing an already 4-bit model, and every figure is
about *that* W. Each run is cached by configuration (:mod:`lora_ref.files.cache`, kind ``qlora-init``).

Taught in ``notebooks/07_qlora.ipynb``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_ref.files import cache
from lora_ref.files.outputs import write_json

__all__ = ["INITS", "QUANT", "truncated", "prepare", "InitRun", "init_run", "fro"]

#: The three initializations compared: QLoRA's B = 0 (PEFT's default, Kaiming-uniform A), LoftQ, QPiSSA.
INITS = ("qlora", "loftq", "qpissa")

#: One quantizer for all three (PEFT's ``loftq_init`` settings): NF4, blocksize 64, no double quantization.
QUANT: dict = {"quant_type": "nf4", "blocksize": 64, "double_quant": False, "rounding": "cuda"}

#: Bump when the meaning of a run changes without its settings changing (invalidates cached runs).
QLORA_INIT_VERSION = 1


def fro(x) -> float:
    """Frobenius norm in float64."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.sum(x * x)))


def truncated(base, layers: int | None):
    """``base`` itself (``layers`` None), or a copy keeping only its first ``layers`` decoder blocks.

    QUICK mode's smaller study: the same weights, quantizers and initializations on a shallower stack (its loss on
    text is not the full model's; the comparison between initializations is what it keeps).
    """
    if layers is None:
        return base
    from lora_ref.modeling.nn import ModuleList

    n = len(base.model.layers)
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or not 0 < layers <= n:
        raise ValueError(f"layers must be an integer in [1, {n}] or None, got {layers!r}")
    model = copy.deepcopy(base)
    model.model.layers = ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = int(layers)
    return model


def prepare(base, init: str, *, r: int = 16, targets="all-linear", num_iter: int = 1,
            rng: np.random.Generator | None = None) -> tuple[object, dict[str, dict]]:
    """A 4-bit copy of ``base`` carrying a rank-``r`` adapter initialized by ``init``, and the per-layer errors.

    ``init``: ``"qlora"`` (A Kaiming-uniform from ``rng``, B = 0), ``"loftq"`` (``num_iter`` alternations) or
    ``"qpissa"``. Every linear layer but the head is NF4 (:data:`QUANT`); α = r, so s = 1 for all three. Returns
    ``(model, {layer: {"weight_norm": ‖W‖, "qlora_error": ‖W − Q(W)‖, "init_error": ‖W − (Q + s·BA)‖}})`` with
    W the float weight of ``base`` (not modified), Q the layer's dequantized 4-bit weight, all norms Frobenius.
    """
    from lora_ref.adapters.lora import LoraConfig, find_targets, lora_layers
    from lora_ref.adapters.qlora import inject_qlora, quantize_model

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "qlora" and not isinstance(rng, np.random.Generator):
        raise ValueError("the B = 0 initialization draws A at random: pass rng (np.random.Generator)")
    kw = dict(r=int(r), lora_alpha=float(r), target_modules=targets)
    model = copy.deepcopy(base)
    originals = {t: np.array(model.get_submodule(t).weight.data, dtype=np.float32)
                 for t in find_targets(model, LoraConfig(**kw))}
    qlora_error = {}
    if init == "qlora":
        quantize_model(model, QUANT["blocksize"], QUANT["double_quant"], QUANT["quant_type"],
                       rounding=QUANT["rounding"])
        inject_qlora(model, LoraConfig(**kw), rng=rng)
    elif init == "loftq":
        from lora_ref.adapters.loftq import apply_loftq

        res = apply_loftq(model, LoraConfig(**kw), num_iter=num_iter, rounding=QUANT["rounding"])
        qlora_error = {t: v.quant_errors[0] for t, v in res.items()}  # the first step quantizes W itself
    else:
        from lora_ref.adapters.pissa import apply_qpissa

        res = apply_qpissa(model, LoraConfig(**kw, init_lora_weights="pissa"), blocksize=QUANT["blocksize"],
                           double_quant=QUANT["double_quant"], rounding=QUANT["rounding"])
        qlora_error = {t: v["qlora_error"] for t, v in res.items()}
    errors = {}
    for name, layer in lora_layers(model):
        W = originals[name].astype(np.float64)
        Q = layer.base_layer.dequantize().astype(np.float64)
        errors[name] = {"weight_norm": fro(W), "qlora_error": qlora_error.get(name, fro(W - Q)),
                        "init_error": fro(W - Q - layer.get_delta_weight("default"))}
    return model, errors


@dataclass
class InitRun:
    """One initialization's measurements (see the module docstring), trained now or loaded from the cache.

    ``errors``: per layer, as :func:`prepare` returns; ``general_loss_start`` / ``general_loss_after``: nats per
    token on general text before the first and after the last step; ``facts_loss_start`` / ``facts_loss_after``:
    ``{"trained": ..., "paraphrase": ...}`` mean answer loss (nats per answer token) over every fact;
    ``train_loss``: one value per step; ``float_general_loss``: the float base's general-text loss.
    """

    init: str
    settings: dict
    errors: dict
    general_loss_start: float
    general_loss_after: float
    facts_loss_start: dict
    facts_loss_after: dict
    train_loss: list
    float_general_loss: float
    seconds: float
    folder: Path

    def total(self, key: str) -> float:
        """√Σ over layers of the squared per-layer ``key`` ("qlora_error", "init_error", "weight_norm")."""
        return math.sqrt(sum(e[key] ** 2 for e in self.errors.values()))

    @property
    def recovered(self) -> float:
        """Share of QLoRA's squared quantization error removed at initialization: 1 − Σ init² / Σ qlora²."""
        return 1.0 - self.total("init_error") ** 2 / self.total("qlora_error") ** 2


def _facts_loss(model, tok, place) -> dict:
    """Mean answer loss (per answer token) over all facts, for the trained questions and for the paraphrases:
    one padded batch each (right padding does not change earlier positions), no graph."""
    from lora_ref.analysis.real_llm import answer_loss, encode_example, fact_batches
    from lora_ref.autograd.tensor import no_grad

    out = {}
    was = getattr(model, "training", True)
    model.eval()
    try:
        for kind in ("trained", "paraphrase"):
            examples = [encode_example(tok, f.question if kind == "trained" else f.paraphrase, f.answer)
                        for f in place.facts]
            (x, y), = fact_batches(examples, len(examples), 1, tok.eos_token_id, np.random.default_rng(0))
            with no_grad():
                out[kind] = float(answer_loss(model, x, y).data)
    finally:
        model.train(was)
    return out


def init_run(init: str, *, r: int = 16, targets="all-linear", num_iter: int = 1, steps: int = 12,
             lr: float = 2e-3, batch: int | None = None, n_facts: int | None = None, fact_seed: int = 0,
             seed: int = 0, layers: int | None = None, folder=None, progress: bool = True) -> InitRun:
    """Initialize with ``init``, measure, train ``steps`` steps on the invented facts, measure again (cached).

    The recipe is chapter 12's (:func:`lora_ref.analysis.real_llm.finetune`: AdamW without weight decay, warmup then
    cosine to a tenth, clipping at 1.0, ``batch`` records per step, loss on the answer only). ``seed`` gives the
    same ``default_rng(seed).spawn(2)`` streams to every initialization: the batches are identical across them
    (and so is the random A of ``"qlora"``'s start). ``layers``: keep only the first ``layers`` decoder blocks
    (:func:`truncated`; QUICK mode). ``folder``: the model folder (default: the real model).
    """
    from lora_ref.analysis import real_llm as R
    from lora_ref.analysis.experiments import _check_common

    batch = R.RECIPE["batch"] if batch is None else batch
    n_facts = len(R.ATTRIBUTES) if n_facts is None else n_facts
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    _check_common(steps, lr, seed, batch=batch)
    if isinstance(num_iter, bool) or not isinstance(num_iter, (int, np.integer)) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer, got {num_iter!r}")
    if not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    place = R._task(n_facts, fact_seed)
    tkey = "all-linear" if isinstance(targets, str) else sorted(targets)
    settings = {"init": init, "r": int(r), "alpha": float(r), "targets": tkey,
                "num_iter": int(num_iter) if init == "loftq" else None, "steps": int(steps), "lr": float(lr),
                "batch": int(batch), "seed": int(seed), "layers": None if layers is None else int(layers),
                "quant": QUANT, "recipe": R.RECIPE}
    desc = {"what": "QLoRA initialization study", **settings, **R._common_description(folder, place),
            "study_version": QLORA_INIT_VERSION}

    def build(out: Path) -> None:
        full, tok = R.load_base(folder)
        base = truncated(full, layers)
        init_rng, data_rng = np.random.default_rng(seed).spawn(2)
        model, errors = prepare(base, init, r=r, targets=tkey, num_iter=num_iter, rng=init_rng)
        start_general, start_facts = R.general_loss(model, tok), _facts_loss(model, tok, place)
        examples = [R.encode_example(tok, f.question, f.answer) for f in place.facts]
        losses, seconds = R.train_facts(model, tok, examples, lr=lr, batch=batch, steps=steps, rng=data_rng,
                                        desc=f"{init} on {R.MODEL_NAME}", progress=progress)
        write_json(out / "result.json", {
            "errors": errors, "general_loss_start": start_general, "general_loss_after": R.general_loss(model, tok),
            "facts_loss_start": start_facts, "facts_loss_after": _facts_loss(model, tok, place),
            "train_loss": losses, "seconds": seconds, "float_general_loss": R.general_loss(base, tok)})

    found = cache.get_or_build("qlora-init", desc, build)
    rec = json.loads((found / "result.json").read_text())
    return InitRun(init=init, settings=desc, errors=rec["errors"], general_loss_start=rec["general_loss_start"],
                   general_loss_after=rec["general_loss_after"], facts_loss_start=rec["facts_loss_start"],
                   facts_loss_after=rec["facts_loss_after"], train_loss=rec["train_loss"],
                   float_general_loss=rec["float_general_loss"], seconds=float(rec["seconds"]), folder=found)
