"""The 4-bit merge question, answered per layer: what does each way of merging a QLoRA adapter cost?

A QLoRA adapter was trained on top of dequant(W), the NF4 base. After training there are five ways to deploy it
(peft#2321, #1043, #1080, #2105 ask which one to use):

==============  =====================================================================  ===================
target          weight used at inference                                               storage
==============  =====================================================================  ===================
``requantize``  Q(dequant(W) + ΔW): PEFT's ``merge_and_unload`` on a 4-bit model        4 bit
``refit``       the same target, per-block MSE-fitted scales (:func:`quantize_4bit_refit`) 4 bit
``float``       dequant(W) + ΔW, a float merge into the dequantized base                 16/32 bit
``original``    W₁₆ + ΔW, a float merge into the 16-bit weights that were quantized      16/32 bit
``unmerged``    dequant(W) and the adapter kept apart (the function that was trained)    4 bit + adapter
==============  =====================================================================  ===================

(For a DoRA adapter ΔW stands for DoRA's merge, W' = (m/n)·(W + s·B·A).) The report measures, for every adapted
layer, on sample inputs x (the layer's real inputs when token ids are given):

- the reference y = x·(dequant(W) + ΔW)ᵀ + b in float64 — exactly what the adapter was trained to compute;
- each target's output in lora_ref's float32 forward, and its relative error ‖y_target − y‖_F / ‖y‖_F;
- the adapter's own effect ‖x·ΔWᵀ‖_F / ‖y‖_F, the yardstick for those errors: a merge whose error is comparable
  to the effect has thrown the fine-tuning away;
- ‖ΔW‖ against the NF4 grid: the RMS of ΔW over the RMS of the local spacing between neighbouring NF4 levels at
  each weight (block scale × code gap), and the share of weights that ΔW moves by more than half a spacing;
- the share of the 4-bit codes that the re-quantized merge changes.

An ``original`` error far above ``float``'s is the base's own quantization error, which the adapter learnt
around: merging a QLoRA adapter into the 16-bit weights is *not* the trained function.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lora_ref.adapters.lora import LoraLinear, dora_merged_weight, dora_weight_norm, lora_layers
from lora_ref.adapters.qlora import Linear4bit, merge_4bit
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import whole_rows
from lora_ref.modeling.nn import Linear, Module, Parameter
from lora_ref.quant.blockwise import unpack_nibbles

__all__ = ["TARGETS", "merge_report", "layer_report", "target_layer", "capture_inputs", "recommendation",
           "load_4bit_llama", "save_4bit_llama", "is_4bit_checkpoint", "write_merge_report", "format_report",
           "NO_4BIT_QUESTION"]

TARGETS = ("requantize", "refit", "float", "original", "unmerged")

NO_4BIT_QUESTION = ("the base has no 4-bit layers under the adapter, so there is no 4-bit merge question: a float "
                    "merge is exact up to rounding; use --report with a 4-bit (bitsandbytes) base checkpoint")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _adapters(layer: LoraLinear) -> list[str]:
    return [n for n in layer.active_adapters if n in layer.lora_A]


def _merged64(layer: LoraLinear, W: np.ndarray) -> np.ndarray:
    """W + Σ ΔW in float64 for a float64 base ``W`` (DoRA: (m/n)(W + ΔW), n from the unmerged W)."""
    out = _f64(W).copy()
    for n in _adapters(layer):
        A, B, s = _f64(layer.lora_A[n].weight.data), _f64(layer.lora_B[n].weight.data), layer.scaling[n]
        delta = s * (B @ A)
        if layer.use_dora[n]:
            V = _f64(W) + delta
            m = _f64(layer.lora_magnitude_vector[n].weight.data)
            out = (m / np.linalg.norm(V, axis=1))[:, None] * (out + delta)
        else:
            out = out + delta
    return out


def _bias64(layer: LoraLinear):
    b = None if layer.bias is None else _f64(layer.bias.data).copy()
    for n in _adapters(layer):
        if layer.lora_bias[n]:
            b = b + layer.scaling[n] * _f64(layer.lora_B[n].bias.data)
    return b


def target_layer(layer: LoraLinear, target: str, original: np.ndarray | None = None) -> Module:
    """The layer ``target`` deploys (see the module docstring); ``original`` is W₁₆ (out, in) for "original"."""
    if target in ("requantize", "refit", "float"):
        return merge_4bit(layer, target)
    if target == "unmerged":
        return layer
    if target != "original":
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if original is None:
        raise ValueError("the 'original' target needs the 16-bit weight the 4-bit base was quantized from")
    W = np.asarray(original, dtype=np.float32)
    if W.shape != (layer.out_features, layer.in_features):
        raise ValueError(f"original weight has shape {W.shape}, the layer is {(layer.out_features, layer.in_features)}")
    for n in _adapters(layer):
        delta = layer.get_delta_weight(n)
        if layer.use_dora[n]:
            W = dora_merged_weight(W, delta, layer.lora_magnitude_vector[n].weight.data, dora_weight_norm(W, delta))
        else:
            W = W + delta
    out = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.weight.data[...] = W
    b = _bias64(layer)
    if b is not None:
        out.bias = Parameter(b.astype(np.float32))
    return out


def _local_spacing(base: Linear4bit) -> np.ndarray:
    """Per weight: block scale × the mean gap from its NF4 level to the neighbouring levels (out, in), float64."""
    state = base.quant_state
    n = state.numel
    codes = unpack_nibbles(np.asarray(base.weight.data).reshape(-1), n)
    table = _f64(state.code)
    order = np.argsort(table)
    rank = np.empty(len(table), int)
    rank[order] = np.arange(len(table))
    srt = table[order]
    gaps = np.diff(srt)
    lower = np.concatenate([[gaps[0]], gaps])  # gap below each sorted level (the lowest: the one above)
    upper = np.concatenate([gaps, [gaps[-1]]])
    gap_of_code = ((lower + upper) / 2)[rank]  # indexed by stored code
    scales = _f64(state.block_absmax())
    block = np.arange(n) // state.blocksize
    return (gap_of_code[codes] * scales[block]).reshape(state.shape)


def _rel(y, ref) -> float:
    d = np.linalg.norm(_f64(y) - ref)
    r = np.linalg.norm(ref)
    return float(d / r) if r > 0 else float(d)


def layer_report(layer: LoraLinear, x: np.ndarray, original: np.ndarray | None = None) -> dict:
    """One layer's row of the report (see the module docstring); ``x`` (N, in) sample inputs."""
    base = layer.base_layer
    if not isinstance(base, Linear4bit):
        raise ValueError(NO_4BIT_QUESTION)
    x = np.asarray(x, dtype=np.float32).reshape(-1, layer.in_features)
    Wq = _f64(base.dequantize())
    T = _merged64(layer, Wq)
    b = _bias64(layer)
    ref = x.astype(np.float64) @ T.T + (0 if b is None else b)
    delta = T - Wq
    spacing = _local_spacing(base)
    row = {
        "shape": [layer.out_features, layer.in_features],
        "delta_rms": float(np.sqrt(np.mean(delta ** 2))),
        "delta_max": float(np.abs(delta).max()),
        "grid_spacing_rms": float(np.sqrt(np.mean(spacing ** 2))),
        "delta_over_spacing": float(np.sqrt(np.mean(delta ** 2)) / np.sqrt(np.mean(spacing ** 2))),
        "share_beyond_half_spacing": float(np.mean(np.abs(delta) > spacing / 2)),
        "adapter_effect": _rel(x.astype(np.float64) @ Wq.T + (0 if b is None else b), ref),
    }
    errors = {}
    with no_grad():
        for t in TARGETS:
            if t == "original" and original is None:
                continue
            tl = target_layer(layer, t, original)
            errors[t] = _rel(np.asarray(tl(x).data), ref)
            if t == "requantize":
                n = base.quant_state.numel
                old = unpack_nibbles(np.asarray(base.weight.data).reshape(-1), n)
                new = unpack_nibbles(np.asarray(tl.weight.data).reshape(-1), n)
                row["codes_changed"] = float(np.mean(old != new))
    row["errors"] = errors
    return row


def capture_inputs(model: Module, ids, names) -> dict[str, np.ndarray]:
    """The inputs (N, in) that layers ``names`` see when ``model`` runs on token ids ``ids`` (float32)."""
    seen: dict[str, list] = {n: [] for n in names}
    patched = []
    for n in names:
        layer = model.get_submodule(n)
        fwd = layer.forward

        def record(x, *a, _n=n, _fwd=fwd, **k):
            xd = x.data if hasattr(x, "data") and not isinstance(x, np.ndarray) else x
            seen[_n].append(np.array(xd, dtype=np.float32).reshape(-1, np.shape(xd)[-1]))
            return _fwd(x, *a, **k)

        object.__setattr__(layer, "forward", record)
        patched.append(layer)
    try:
        with no_grad(), whole_rows():  # one call per layer, rows in order (no layer run in parts by threads)
            model(np.asarray(ids))
    finally:
        for layer in patched:
            object.__delattr__(layer, "forward")
    return {n: np.concatenate(v) for n, v in seen.items()}


def recommendation(total: dict) -> str:
    """One line from the totals: which target keeps the adapter's effect at what storage."""
    e, effect = total["errors"], total["adapter_effect"]
    best4 = min(("requantize", "refit"), key=lambda t: e[t])
    lost = e[best4] / effect if effect > 0 else float("inf")
    orig = ""
    if "original" in e and e["original"] > 2 * max(e["float"], 1e-12):
        orig = (f"; merging into the original 16-bit base is off by {e['original']:.2e}, the base's quantization "
                "error the adapter was trained around: do not")
    if lost <= 0.1:
        return (f"merge into 4 bits with '{best4}': its output error {e[best4]:.2e} is {100 * lost:.0f}% of the "
                f"adapter's effect {effect:.2e}" + ("" if best4 == "requantize" else
                                                     f" (PEFT's re-quantization: {e['requantize']:.2e})") + orig)
    return (f"keep the adapter unmerged on the 4-bit base (error {e['unmerged']:.2e}) or merge in float into the "
            f"dequantized base (error {e['float']:.2e}, 16/32-bit storage): the best 4-bit merge '{best4}' errs by "
            f"{e[best4]:.2e}, {100 * lost:.0f}% of the adapter's effect {effect:.2e}" + orig)


def merge_report(model: Module, *, inputs: dict | None = None, ids=None, original: dict | None = None,
                 rng: np.random.Generator | None = None, samples: int = 64) -> dict:
    """The merge report for every LoRA layer over a 4-bit base in ``model`` (its active adapters).

    Parameters
    ----------
    inputs : {layer name: (N, in)} sample inputs, or
    ids : token ids to run ``model`` on, recording each layer's real inputs (:func:`capture_inputs`), or neither:
        ``samples`` standard normal rows from ``rng`` per layer.
    original : {layer name: W₁₆ (out, in)} the weights the 4-bit base was quantized from (adds the "original"
        target); layer names as in ``model`` (``model.layers.0.self_attn.q_proj``).

    Returns ``{"layers": {name: row}, "total": {...}, "recommendation": str}``; rows as :func:`layer_report`
    (``errors`` per target, ``codes_changed``, the grid comparison); totals: the mean over layers of each relative
    error and of the adapter's effect, the weight-count-weighted share of codes changed and ΔW/spacing. ``ValueError`` (:data:`NO_4BIT_QUESTION`) when no adapted layer is 4-bit.
    """
    layers = [(n, l) for n, l in lora_layers(model) if isinstance(l.base_layer, Linear4bit) and _adapters(l)]
    if not layers:
        raise ValueError(NO_4BIT_QUESTION)
    if inputs is None:
        if ids is not None:
            inputs = capture_inputs(model, ids, [n for n, _ in layers])
        else:
            if rng is None:
                raise ValueError("merge_report draws sample inputs: pass inputs=, ids= or rng=")
            inputs = {n: rng.standard_normal((samples, l.in_features)).astype(np.float32) for n, l in layers}
    original = original or {}
    rows = {}
    for n, l in layers:
        if n not in inputs:
            raise ValueError(f"no sample inputs for layer {n}")
        rows[n] = layer_report(l, inputs[n], original.get(n))
    have_orig = all(n in original for n, _ in layers)
    targets = [t for t in TARGETS if t != "original" or have_orig]
    total = {  # every layer counts once (pooling the squares would let the layers with large outputs decide)
        "layers": len(rows),
        "errors": {t: float(np.mean([r["errors"][t] for r in rows.values()])) for t in targets},
        "adapter_effect": float(np.mean([r["adapter_effect"] for r in rows.values()])),
        "codes_changed": float(np.average([r["codes_changed"] for r in rows.values()],
                                          weights=[np.prod(r["shape"]) for r in rows.values()])),
        "delta_over_spacing": float(np.average([r["delta_over_spacing"] for r in rows.values()],
                                               weights=[np.prod(r["shape"]) for r in rows.values()])),
    }
    return {"targets": targets, "layers": rows, "total": total, "recommendation": recommendation(total)}


# ---------------------------------------------------------------------------------------------------------------
# Files: a bitsandbytes 4-bit Llama checkpoint, and the command's report
# ---------------------------------------------------------------------------------------------------------------


def is_4bit_checkpoint(folder) -> bool:
    """Whether ``folder/config.json`` declares a bitsandbytes 4-bit quantization."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(q, dict) and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def load_4bit_llama(folder) -> Module:
    """A lora_ref Llama from a bitsandbytes 4-bit checkpoint folder: its 4-bit weights as
    :class:`~lora_ref.adapters.qlora.Linear4bit` with the stored codes and scales, everything else float32.

    :meth:`Llama.from_pretrained <lora_ref.modeling.llama.Llama.from_pretrained>` reads the folder; this name also
    refuses a float checkpoint, which has no 4-bit merge question."""
    from lora_ref.modeling.llama import Llama

    model = Llama.from_pretrained(folder)
    if model.quantization_config is None:
        raise ValueError(f"{folder} is not a 4-bit checkpoint (config.json has no quantization_config)")
    return model


def save_4bit_llama(model: Module, folder) -> Path:
    """Write a lora_ref Llama whose linear layers are :class:`Linear4bit` (no LoRA layers) as a bitsandbytes 4-bit
    checkpoint folder transformers loads: ``config.json`` with ``quantization_config``, ``model.safetensors``
    (:func:`lora_ref.modeling.llama.save_4bit_pretrained`)."""
    from lora_ref.modeling.llama import save_4bit_pretrained

    if any(True for _ in lora_layers(model)):
        raise ValueError("save_4bit_llama: the model still has LoRA layers; merge or unload them first")
    return save_4bit_pretrained(model, folder)


def write_merge_report(base, adapter, report_file, *, out=None, original=None, seed: int = 0,
                       tokens: int = 64) -> dict:
    """``lora-ref merge --report``: load the 4-bit ``base`` folder and the PEFT ``adapter``, run the report on the
    layers' inputs for ``tokens`` random token ids (``seed``), write it as JSON to ``report_file`` (atomically) and
    return it. ``original``: the 16-bit checkpoint folder the base was quantized from (adds that target). ``out``:
    also write PEFT's merge (re-quantized, ``merge_and_unload_4bit(model, "requantize")``) as a 4-bit checkpoint.
    A float base raises ``ValueError`` (:data:`NO_4BIT_QUESTION`)."""
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.adapters.qlora import merge_and_unload_4bit
    from lora_ref.files.outputs import atomic_write, check_out_dir
    from lora_ref.modeling.llama import Llama

    if not is_4bit_checkpoint(base):
        raise ValueError(NO_4BIT_QUESTION)
    if out is not None:
        check_out_dir(out)
    model = load_4bit_llama(base)
    load_adapter(model, adapter)
    orig = None
    if original is not None:
        om = Llama.from_pretrained(original)
        params = dict(om.named_parameters())
        orig = {}
        for n, _ in lora_layers(model):
            if f"{n}.weight" not in params:
                raise ValueError(f"the original checkpoint {original} has no {n}.weight")
            orig[n] = params[f"{n}.weight"].data
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(1, tokens))
    report = merge_report(model, ids=ids, original=orig)
    report.update({"base": str(base), "adapter": str(adapter), "original": None if original is None else str(original),
                   "seed": seed, "tokens": tokens})
    atomic_write(report_file, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if out is not None:
        save_4bit_llama(merge_and_unload_4bit(model, "requantize"), out)
    return report


def format_report(report: dict) -> str:
    """A table (one line per layer: errors per target, codes changed, ΔW/spacing) and the recommendation."""
    ts = report["targets"]
    lines = [f"{'layer':40s} " + " ".join(f"{t:>10s}" for t in ts) + f" {'effect':>10s} {'codes':>7s} {'dW/grid':>8s}"]
    for n, r in list(report["layers"].items()) + [("total", report["total"])]:
        lines.append(f"{n[-40:]:40s} " + " ".join(f"{r['errors'][t]:10.2e}" for t in ts)
                     + f" {r['adapter_effect']:10.2e} {100 * r['codes_changed']:6.2f}% {r['delta_over_spacing']:8.3f}")
    lines.append("recommendation: " + report["recommendation"])
    return "\n".join(lines)


def run_report(args) -> int:
    """The ``--report`` branch of ``lora-ref merge`` (one adapter, a 4-bit base)."""
    import sys

    from lora_ref.errors import UsageError

    if not args.report:
        raise UsageError("--report-original needs --report FILE")
    if len(args.adapter) != 1 or args.weights is not None:
        raise UsageError("--report takes exactly one --adapter (and no --weights)")
    if args.dtype is not None:
        raise UsageError("--report writes a 4-bit merge; --dtype does not apply")
    report = write_merge_report(args.base, args.adapter[0], args.report, out=args.out,
                                original=args.report_original, seed=args.seed)
    if args.json:
        sys.stdout.write(json.dumps({"report": str(args.report), "out": str(args.out),
                                     "recommendation": report["recommendation"], "total": report["total"]}) + "\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
        sys.stdout.write(f"wrote the report {args.report} and PEFT's re-quantized merge to {args.out}\n")
    return 0
