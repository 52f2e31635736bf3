"""``lora-ref quantize``: quantize a checkpoint's linear weights to 4 bit in bitsandbytes' format."""

from __future__ import annotations

import json
import re
import sys

HELP = "quantize a checkpoint's linear layers to 4 bit in bitsandbytes' format"

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
transformers + bitsandbytes load it with AutoModelForCausalLM.from_pretrained(out), and every lora-ref command that
reads a model (generate, merge, ...) loads it with its linear layers in 4 bits.

Memory: the checkpoint (sharded or not) is read one tensor at a time and the output written as it goes, so the
peak is set by the largest tensor (a few times its size while it is quantized), not by the model.

Printed per tensor and in total: the relative Frobenius error ||W - deq(q(W))||_F / ||W||_F, the max abs error
and bits per parameter (4-bit codes plus scales; with --double-quant the 8-bit scales, second-level scales and
offset; the 16- and 256-entry code tables and the JSON are not counted). With --json, stdout is one JSON document
with the same numbers.

Caveat (bitsandbytes 0.50.2, not this command): its CPU dequantization returns wrong values for some 2-D weights
whose in_features is not a multiple of the blocksize (e.g. 96 at blocksize 64); on the GPU, and for the usual
multiples of 64, the checkpoint dequantizes exactly.
"""

TARGET_PATTERN = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


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


def _open_base(folder):
    """(config dict, CheckpointReader) of an HF checkpoint folder; nothing but the headers is read yet."""
    from lora_ref.files.outputs import read_json, require_dir
    from lora_ref.files.safetensors import CheckpointReader

    folder = require_dir(folder, "base checkpoint folder")
    cfg_path = folder / "config.json"
    config = read_json(cfg_path, "config.json of the base checkpoint")
    if "quantization_config" in config:
        raise ValueError(f"{cfg_path} already has a quantization_config; quantize a floating-point checkpoint")
    return config, CheckpointReader(folder)


ERROR_CHUNK = 1 << 18
"""Elements per block when the quantization error is summed in float64 (three float64 blocks = 6 MiB at most)."""


def _error_sums(w, w_hat) -> tuple[float, float, float]:
    """Σ(ŵ − w)², Σw² and max|ŵ − w| in float64, a block of rows at a time (no float64 copy of the whole weight)."""
    import numpy as np

    e2 = r2 = mx = 0.0
    rows = max(1, ERROR_CHUNK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        w64 = w[i:i + rows].astype(np.float64)
        d64 = w_hat[i:i + rows].astype(np.float64) - w64
        e2 += float(np.sum(d64 * d64))
        r2 += float(np.sum(w64 * w64))
        mx = max(mx, float(np.max(np.abs(d64))) if d64.size else 0.0)
    return e2, r2, mx


def quantize_checkpoint(base, out, *, quant_type="nf4", blocksize=64, double_quant=False, rounding="cuda",
                        impl="numpy", progress=None) -> dict:
    """Quantize the linear weights of the checkpoint in ``base`` and write a bitsandbytes checkpoint to ``out``.

    Streams tensor by tensor: each weight is read from its (possibly sharded) file, quantized, measured and handed to
    a :class:`lora_ref.files.safetensors.SafetensorsWriter`, so the memory used is bounded by the largest tensor (a
    few times its size while it is quantized), not the model's. The output is one ``model.safetensors``.

    Returns the report (the ``--json`` document): per-tensor and total relative Frobenius error, max abs error
    and bits per parameter.
    """
    import numpy as np

    from lora_ref.files.outputs import check_out_dir, output_dir, write_json
    from lora_ref.files.safetensors import SafetensorsWriter
    from lora_ref.modeling.llama import copy_model_side_files
    from lora_ref.quant.blockwise import SUPPORTED_DTYPES, bits_per_parameter, dequantize_4bit, quantize_4bit
    from lora_ref.quant.serialize import dtype_name, state_to_tensors, transformers_quantization_config

    check_out_dir(out)
    config, reader = _open_base(base)
    with reader:
        names = sorted(reader.names())
        targets = [k for k in names if TARGET_PATTERN.search(k)]
        if not targets:
            raise ValueError(f"no linear weights (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) "
                             f"found in {base}")
        for k in targets:  # from the headers: refused before any work
            shape, dt = reader.shape(k), reader.dtype(k)
            if len(shape) != 2:
                raise ValueError(f"tensor {k!r} has shape {shape}; a linear weight is 2-D (out, in)")
            if dt not in SUPPORTED_DTYPES:
                raise ValueError(f"tensor {k!r} has dtype {dt}; expected float32, float16 or bfloat16")

        rows = []
        err2 = ref2 = 0.0
        max_abs = 0.0
        total_bits = 0.0
        total_params = 0
        dtypes = sorted({reader.dtype(k).name for k in targets})
        compute = config.get("dtype") or config.get("torch_dtype") or "float32"
        if compute not in ("float32", "float16", "bfloat16"):
            compute = "float32"
        out_config = dict(config)
        out_config["quantization_config"] = transformers_quantization_config(quant_type, double_quant, compute)
        with output_dir(out) as tmp:
            iterator = names
            if progress is not None:  # started once the output folder exists, so an error there stays one line
                from tqdm import tqdm

                iterator = tqdm(names, desc="quantize", unit="tensor", file=progress, leave=False)
            with SafetensorsWriter(tmp / "model.safetensors", {"format": "pt"}) as writer:
                for name in iterator:
                    w = reader.read(name)
                    if name not in targets:
                        writer.add(name, w)
                        del w  # before the next read, or two tensors would be alive at once
                        continue
                    bad = ~np.isfinite(w.astype(np.float32, copy=False))
                    if bad.any():
                        raise ValueError(f"tensor {name!r} holds {int(bad.sum())} NaN or inf values (first at index "
                                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}); 4-bit quantization needs "
                                         f"finite weights")
                    del bad
                    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                  double_quant=double_quant, rounding=rounding, impl=impl)
                    w_hat = dequantize_4bit(packed, state, impl=impl)
                    e2, r2, mx = _error_sums(w, w_hat)
                    del w_hat
                    bpp = bits_per_parameter(state)
                    rows.append({
                        "name": name, "shape": list(w.shape), "dtype": dtype_name(w.dtype),
                        "rel_frobenius_error": (e2 ** 0.5) / (r2 ** 0.5) if r2 > 0 else 0.0,
                        "max_abs_error": mx, "bits_per_param": bpp,
                    })
                    err2, ref2, max_abs = err2 + e2, ref2 + r2, max(max_abs, mx)
                    total_bits += bpp * w.size
                    total_params += int(w.size)
                    for k, v in state_to_tensors(name, packed, state).items():
                        writer.add(k, v)
                    del w, packed, state
            write_json(tmp / "config.json", out_config)
            copy_model_side_files(base, tmp)

    return {
        "base": str(base), "out": str(out), "quant_type": quant_type, "blocksize": blocksize,
        "double_quant": double_quant, "rounding": rounding, "weight_dtypes": dtypes,
        "tensors": rows,
        "total": {
            "tensors": len(rows), "params": total_params,
            "rel_frobenius_error": (err2 ** 0.5) / (ref2 ** 0.5) if ref2 > 0 else 0.0,
            "max_abs_error": max_abs, "bits_per_param": total_bits / total_params,
        },
        "kept_in_float": [k for k in names if k not in set(targets)],
    }


def run(args) -> int:
    from lora_ref.errors import UsageError
    from lora_ref.quant.blockwise import ALLOWED_BLOCKSIZES

    if args.blocksize not in ALLOWED_BLOCKSIZES:
        raise UsageError(f"--blocksize {args.blocksize} is not allowed; use one of "
                         f"{', '.join(map(str, ALLOWED_BLOCKSIZES))}")
    from lora_ref.files.models import model_arg
    from lora_ref.files.outputs import check_out_dir

    check_out_dir(args.out)  # refuse before a known model is fetched
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
