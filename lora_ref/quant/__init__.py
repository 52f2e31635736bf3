"""4-bit quantization as QLoRA and bitsandbytes do it: NF4 / FP4 codes, blockwise absmax, double quantization.

- :mod:`lora_ref.quant.nf4` — the code tables, derived (NF4 quantiles, the 8-bit dynamic map) and as shipped.
- :mod:`lora_ref.quant.blockwise` — ``quantize_4bit`` / ``dequantize_4bit`` / ``quantize_blockwise`` /
  ``dequantize_blockwise`` and ``QuantState``, bit for bit with bitsandbytes' CUDA or CPU path (``rounding=``).
- :mod:`lora_ref.quant.serialize` — bitsandbytes' ``Linear4bit`` state-dict format, read and written.
- :mod:`lora_ref.quant.kernels` — Numba twins of the low-level steps (``impl="numba"``).
"""

from lora_ref.quant.blockwise import (
    ALLOWED_BLOCKSIZES,
    NESTED_BLOCKSIZE,
    QuantState,
    bits_per_parameter,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)
from lora_ref.quant.nf4 import DYNAMIC_MAP, FP4_CODE, NF4_CODE, get_4bit_type

__all__ = [
    "ALLOWED_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "bits_per_parameter",
    "NF4_CODE",
    "FP4_CODE",
    "DYNAMIC_MAP",
    "get_4bit_type",
]
