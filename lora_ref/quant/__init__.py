"""4-bit quantization as QLoRA and bitsandbytes do it: NF4 / FP4 codes, blockwise absmax, double quantization.

- :mod:`lora_ref.quant.nf4` — the code tables, derived (NF4 quantiles, the 8-bit dynamic map) and as shipped, and
  the encoders' decision tables (their one home).
- :mod:`lora_ref.quant.steps` — the readable low-level steps on flat arrays (absmax, encode, pack, decode).
- :mod:`lora_ref.quant.dequant_matmul` — the 4-bit matmuls as dequantize-then-``np.matmul`` (the readable twins).
- :mod:`lora_ref.quant.kernels` — their Numba twins (same names and signatures) and the chooser ``pick`` that
  every ``impl=`` argument goes through (the contract: :mod:`lora_ref.kernels.switch`).
- :mod:`lora_ref.quant.blockwise` — ``quantize_4bit`` / ``dequantize_4bit`` / ``quantize_blockwise`` /
  ``dequantize_blockwise`` and ``QuantState``, bit for bit with bitsandbytes' CUDA or CPU path (``rounding=``).
- :mod:`lora_ref.quant.serialize` — bitsandbytes' ``Linear4bit`` state-dict format, read and written.
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
    storage_bytes,
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
    "storage_bytes",
    "NF4_CODE",
    "FP4_CODE",
    "DYNAMIC_MAP",
    "get_4bit_type",
]
