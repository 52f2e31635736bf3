"""Check bitsandbytes' CPU 4-bit quantizer against the lora_ref reference vectors.

Usage: python check_bitsandbytes_cpu.py VECTORS_DIR RESULTS.safetensors

For every ``quantize_4bit`` case of the manifest this runs ``bitsandbytes.functional.quantize_4bit`` and
``dequantize_4bit`` on the case's input, on the CPU, and saves the outputs under the case's keys; then it runs the
standalone checker. Cases computed with ``rounding="cpu"`` should pass; the ``divergence_*_cuda`` cases record what
the CUDA kernel computes and should fail exactly where their descriptions say the two paths differ.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # odd last dimensions otherwise reach torch.compile

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bitsandbytes_results(vectors: str | Path) -> dict[str, np.ndarray]:
    """Outputs of bitsandbytes on the CPU for every plain 4-bit quantization case (no double quantization)."""
    import bitsandbytes.functional as bnbf

    vectors = Path(vectors)
    manifest = json.loads((vectors / "manifest.json").read_text())
    files: dict[str, dict[str, np.ndarray]] = {}
    results: dict[str, np.ndarray] = {}
    for case in manifest["cases"]:
        if case["op"] != "quantize_4bit":
            continue
        name, p = case["name"], case["params"]
        tensors = files.setdefault(case["file"], load_file(str(vectors / case["file"])))
        x = torch.from_numpy(tensors[f"{name}/inputs/x"]).to(DTYPES[p["dtype"]]).reshape(p["shape"])
        packed, state = bnbf.quantize_4bit(x, blocksize=p["blocksize"], quant_type=p["quant_type"])
        deq = bnbf.dequantize_4bit(packed, state)
        results[f"{name}/outputs/packed"] = packed.numpy().reshape(-1)
        results[f"{name}/outputs/absmax"] = state.absmax.float().numpy()
        # bitsandbytes returns a 1-D input of even length as (1, n) on the CPU: restore the case's shape
        results[f"{name}/outputs/dequantized"] = deq.float().numpy().reshape(p["shape"])
    return results


def main(argv: list[str]) -> int:
    vectors, out = argv
    save_file(bitsandbytes_results(vectors), out)
    sys.path.insert(0, str(Path(vectors)))
    import check  # the standalone checker that ships with the vectors

    return check.run(vectors, out)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
