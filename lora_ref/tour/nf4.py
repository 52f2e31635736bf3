"""Tour section: NF4 and FP4 codes against bitsandbytes' CUDA and CPU outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "data" / "bnb"


def _fixture_files() -> dict[str, Path]:
    found = {k: FIXTURES / f"nf4_fp4_{k}.safetensors" for k in ("cuda", "cpu")}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise ValueError(f"bitsandbytes reference outputs not found: {', '.join(missing)} (a source checkout has "
                         "them in tests/data/bnb/)")
    return found


def section_nf4(ctx) -> None:
    """lora_ref's quantizer against bitsandbytes' stored CUDA and CPU outputs, code by code."""
    import matplotlib.pyplot as plt
    import ml_dtypes
    from safetensors import safe_open

    from lora_ref.quant import quantize_4bit
    from lora_ref.quant.blockwise import unpack_nibbles

    results = []
    for rounding, path in _fixture_files().items():
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads(f.metadata()["manifest"])
            for entry in manifest:
                key = f"case{int(entry['case']):02d}"
                dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[entry["dtype"]]
                x = f.get_tensor(f"{key}.input").astype(dtype).reshape(entry["shape"])
                packed, _ = quantize_4bit(x, blocksize=entry["blocksize"], quant_type=entry["quant_type"],
                                          double_quant=entry["double_quant"], rounding=rounding)
                theirs = f.get_tensor(f"{key}.packed").reshape(-1)
                n = 2 * theirs.size  # every nibble, the padding one of an odd count included
                same = float(np.mean(unpack_nibbles(packed.reshape(-1), n) == unpack_nibbles(theirs, n)))
                results.append({"rounding": rounding, "case": key, "quant_type": entry["quant_type"],
                                "dtype": entry["dtype"], "double_quant": entry["double_quant"],
                                "n": int(np.prod(entry["shape"])), "agree": same})
    nf4 = [r for r in results if r["quant_type"] == "nf4"]
    ctx.check(all(r["agree"] == 1.0 for r in nf4),
              "every NF4 code equals bitsandbytes' (CUDA kernel and CPU path, each in its rounding mode)")
    fp4 = [r for r in results if r["quant_type"] == "fp4"]
    ctx.check(all(r["agree"] >= 0.9999 for r in fp4), "FP4 codes agree at least 99.99% (CUDA's fast-math "
                                                       "reciprocal flips a few on the thresholds)")

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, rounding in enumerate(("cuda", "cpu")):
        rs = [r for r in results if r["rounding"] == rounding]
        ax.bar(np.arange(len(rs)) + 0.4 * i, [100 * (1 - r["agree"]) + 1e-4 for r in rs], 0.4,
               label=f"vs bitsandbytes {rounding.upper()} (rounding='{rounding}')")
    ax.set_yscale("log")
    ax.set_xlabel("fixture case")
    ax.set_ylabel("codes that differ (%; 1e-4 = none)")
    ax.set_title("lora_ref's 4-bit codes against bitsandbytes 0.50.2")
    ax.legend(fontsize=8)
    rows = "\n".join(f"| {r['case']} | {r['rounding']} | {r['quant_type']} | {r['dtype']} | "
                     f"{'yes' if r['double_quant'] else 'no'} | {r['n']:,} | {100 * r['agree']:.4f}% |"
                     for r in results)
    total = sum(r["n"] for r in nf4)
    ctx.text(f"""
NF4 is QLoRA's 4-bit code: 16 values at quantiles of the normal distribution, scaled per block of 64 weights by
the block's absolute maximum. lora_ref's `quantize_4bit` reproduces bitsandbytes 0.50.2 — its CUDA kernel with
`rounding="cuda"` (decimal thresholds, ties to the lower code, −0.0 for all-zero blocks) and its CPU path with
`rounding="cpu"` — on the outputs stored from both ({total:,} NF4 codes in all, every one equal):

| case | path | type | dtype | double quant | elements | codes equal |
|---|---|---|---|---|---:|---:|
{rows}
""")
    ctx.figure(fig, "nf4_agreement", "Share of 4-bit codes that differ from bitsandbytes, per stored case")
    ctx.summarize(f"NF4: {total:,} codes equal to bitsandbytes (CUDA and CPU); FP4 agreement min "
                  f"{100 * min(r['agree'] for r in fp4):.3f}%")
