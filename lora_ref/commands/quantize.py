"""``lora-ref quantize``: quantize a checkpoint's linear weights to 4 bit in bitsandbytes' format."""

from __future__ import annotations

import json
import re
import shutil
import sys


EXAMPLES = """\
examples:
  lora-ref quantize --base runs/tour/base --out runs/base-nf4 --double-quant
  lora-ref quantize --base path/to/hf-llama --out path/to/hf-llama-fp4 --quant-type fp4 --blocksize 128 --json

Reads an HF checkpoint folder (config.json + model.safetensors, or shards with model.safetensors.index.json) and
quantizes the linear weights q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj with NF4 or FP4
(blockwise absmax, bit for bit as bitsandbytes; --rounding picks its CUDA or CPU arithmetic). Embeddings, norms
and lm_head stay in floating point, as transformers keeps them. The output folder (missing or empty) gets
config.json with the quantization_config transformers writes for load_in_4bit, model.safetensors in bitsandbytes'
Linear4bit state-dict format, and the base folder's other small files (tokenizer, generation config).
transformers + bitsandbytes load it with AutoModelForCausalLM.from_pretrained(out).

Printed per tensor and in total: the relative Frobenius error ||W - deq(q(W))||_F / ||W||_F, the max abs error
and bits per parameter (4-bit codes plus scales; with --double-quant the 8-bit scales, second-level scales and
offset; the 16- and 256-entry code tables and the JSON are not counted). With --json, stdout is one JSON document
with the same numbers.

Caveat (bitsandbytes 0.50.2, not this command): its CPU dequantization returns wrong values for some 2-D weights
whose in_features is not a multiple of the blocksize (e.g. 96 at blocksize 64); on the GPU, and for the usual
multiples of 64, the checkpoint dequantizes exactly.
"""

TARGET_PATTERN = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|\.bin\.index\.json)$")


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="HF checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output folder (must be missing or empty)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit code (default nf4)")
    p.add_argument("--blocksize", type=int, default=64,
                   help="elements per absmax block: 32, 64, ..., 4096 (default 64, as transformers)")
    p.add_argument("--double-quant", action="store_true",
                   help="quantize the absmax constants again (8-bit dynamic map, blocksize 256), as QLoRA")
    p.add_argument("--rounding", choices=("cuda", "cpu"), default="cuda",
                   help="reproduce bitsandbytes' CUDA kernels (default) or its CPU path")
    p.add_argument("--impl", choices=("numpy", "numba"), default="numpy",
                   help="NumPy reference steps (default) or their Numba twins")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _load_base(folder):
    """(config dict, tensors in their stored dtypes) of an HF checkpoint folder."""
    from lora_ref.files.outputs import require_dir, require_file
    from lora_ref.quant.serialize import read_safetensors_raw

    folder = require_dir(folder, "base checkpoint folder")
    cfg_path = require_file(folder / "config.json", "config.json of the base checkpoint")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"config.json is not valid JSON: {cfg_path}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config.json does not hold a JSON object: {cfg_path}")
    if "quantization_config" in config:
        raise ValueError(f"{cfg_path} already has a quantization_config; quantize a floating-point checkpoint")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        tensors, _ = read_safetensors_raw(single)
        return config, tensors
    if not index.is_file():
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"corrupt index file (expected JSON with a weight_map): {index}") from None
    tensors = {}
    for fname in files:
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise ValueError(f"index file {index} names a shard outside its folder: {fname!r}")
        part, _ = read_safetensors_raw(folder / fname)
        tensors.update(part)
    return config, tensors


def quantize_checkpoint(base, out, *, quant_type="nf4", blocksize=64, double_quant=False, rounding="cuda",
                        impl="numpy", progress=None) -> dict:
    """Quantize the linear weights of the checkpoint in ``base`` and write a bitsandbytes checkpoint to ``out``.

    Returns the report (the ``--json`` document): per-tensor and total relative Frobenius error, max abs error
    and bits per parameter.
    """
    import numpy as np

    from lora_ref.files.outputs import check_out_dir, output_dir, write_json
    from lora_ref.quant.blockwise import SUPPORTED_DTYPES, bits_per_parameter, dequantize_4bit, quantize_4bit
    from lora_ref.quant.serialize import dtype_name, state_to_tensors, transformers_quantization_config, \
        write_safetensors

    check_out_dir(out)
    config, tensors = _load_base(base)
    targets = sorted(k for k, v in tensors.items() if TARGET_PATTERN.search(k))
    if not targets:
        raise ValueError(f"no linear weights (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) "
                         f"found in {base}")
    for k in targets:
        a = tensors[k]
        if a.ndim != 2:
            raise ValueError(f"tensor {k!r} has shape {a.shape}; a linear weight is 2-D (out, in)")
        if a.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {k!r} has dtype {a.dtype}; expected float32, float16 or bfloat16")
        bad = ~np.isfinite(a.astype(np.float32))
        if bad.any():
            raise ValueError(f"tensor {k!r} holds {int(bad.sum())} NaN or inf values (first at index "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}); 4-bit quantization needs finite weights")

    rows = []
    written: dict = {}
    err2 = ref2 = 0.0
    max_abs = 0.0
    total_bits = 0.0
    total_params = 0
    iterator = targets
    if progress is not None:
        from tqdm import tqdm

        iterator = tqdm(targets, desc="quantize", unit="tensor", file=progress, leave=False)
    for name in iterator:
        w = tensors[name]
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                                      rounding=rounding, impl=impl)
        w_hat = dequantize_4bit(packed, state, impl=impl)
        w64, d64 = w.astype(np.float64), w_hat.astype(np.float64) - w.astype(np.float64)
        e2, r2 = float(np.sum(d64 * d64)), float(np.sum(w64 * w64))
        mx = float(np.max(np.abs(d64)))
        bpp = bits_per_parameter(state)
        rows.append({
            "name": name, "shape": list(w.shape), "dtype": dtype_name(w.dtype),
            "rel_frobenius_error": (e2 ** 0.5) / (r2 ** 0.5) if r2 > 0 else 0.0,
            "max_abs_error": mx, "bits_per_param": bpp,
        })
        err2, ref2, max_abs = err2 + e2, ref2 + r2, max(max_abs, mx)
        total_bits += bpp * w.size
        total_params += int(w.size)
        written.update(state_to_tensors(name, packed, state))
    for k, v in tensors.items():
        if k not in written:
            written[k] = v

    dtypes = sorted({tensors[k].dtype.name for k in targets})
    compute = config.get("dtype") or config.get("torch_dtype") or "float32"
    if compute not in ("float32", "float16", "bfloat16"):
        compute = "float32"
    out_config = dict(config)
    out_config["quantization_config"] = transformers_quantization_config(quant_type, double_quant, compute)

    from pathlib import Path

    base_dir = Path(base)
    with output_dir(out) as tmp:
        write_json(tmp / "config.json", out_config)
        write_safetensors(tmp / "model.safetensors", written, {"format": "pt"})
        for f in sorted(base_dir.iterdir()):
            if f.is_file() and f.name != "config.json" and not _WEIGHT_FILES.search(f.name):
                shutil.copyfile(f, tmp / f.name)

    return {
        "base": str(base), "out": str(out), "quant_type": quant_type, "blocksize": blocksize,
        "double_quant": double_quant, "rounding": rounding, "weight_dtypes": dtypes,
        "tensors": rows,
        "total": {
            "tensors": len(rows), "params": total_params,
            "rel_frobenius_error": (err2 ** 0.5) / (ref2 ** 0.5) if ref2 > 0 else 0.0,
            "max_abs_error": max_abs, "bits_per_param": total_bits / total_params,
        },
        "kept_in_float": sorted(k for k in tensors if k not in targets),
    }


def run(args) -> int:
    from lora_ref.errors import UsageError
    from lora_ref.quant.blockwise import ALLOWED_BLOCKSIZES

    if args.blocksize not in ALLOWED_BLOCKSIZES:
        raise UsageError(f"--blocksize {args.blocksize} is not allowed; use one of "
                         f"{', '.join(map(str, ALLOWED_BLOCKSIZES))}")
    from lora_ref.files.models import model_arg
    from lora_ref.files.outputs import check_out_dir

    check_out_dir(args.out)  # before a known model is fetched
    args.base = model_arg(args.base)  # a known model name (lora-ref models) is fetched on first use
    report = quantize_checkpoint(args.base, args.out, quant_type=args.quant_type, blocksize=args.blocksize,
                                 double_quant=args.double_quant, rounding=args.rounding, impl=args.impl,
                                 progress=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.quant_type}{' + double quant' if args.double_quant else ''}, blocksize {args.blocksize}, "
          f"{args.rounding} rounding: {report['total']['tensors']} tensors, {report['total']['params']:,} parameters")
    width = max(len(r["name"]) for r in report["tensors"])
    print(f"{'tensor':<{width}}  {'shape':>12}  {'rel. Frobenius err':>18}  {'max |err|':>10}  {'bits/param':>10}")
    for r in report["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{width}}  {shape:>12}  {r['rel_frobenius_error']:>18.5f}  {r['max_abs_error']:>10.4g}"
              f"  {r['bits_per_param']:>10.4f}")
    t = report["total"]
    print(f"{'total':<{width}}  {'':>12}  {t['rel_frobenius_error']:>18.5f}  {t['max_abs_error']:>10.4g}"
          f"  {t['bits_per_param']:>10.4f}")
    print(f"kept in floating point: {len(report['kept_in_float'])} tensors (embeddings, norms, lm_head)")
    print(f"wrote {args.out}")
    return 0
