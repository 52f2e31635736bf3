"""Public test helpers: hypothesis strategies that exercise LoRA merges and 4-bit quantization, and tiny Llama
configurations (:func:`tiny_llama_config`).

Independent entries from a drawn seed, full-rank factors with B ≠ 0, both sides ≥ 2, scales that vary by orders
of magnitude, and 4-bit blocks with many distinct values, zero blocks and outliers. Import them in your own test
suite to property-test merge code against lora_ref (see :mod:`.strategies` for what each one guarantees, and the
book's "Check your implementation" page for a worked example). Needs ``hypothesis`` (the ``test`` extra).
"""

from lora_ref.testing.configs import TINY_LLAMA, tiny_llama_config  # noqa: F401
from lora_ref.testing.strategies import (  # noqa: F401
    DTYPES,
    QUANT_DTYPES,
    LoraAdapter,
    adapter_sets,
    adapters,
    alphas,
    factors,
    lora_configs,
    quant_tensors,
    ranks,
    scales,
    seeds,
    shapes,
    weights,
)

__all__ = ["DTYPES", "QUANT_DTYPES", "LoraAdapter", "adapter_sets", "adapters", "alphas", "factors", "lora_configs",
           "quant_tensors", "ranks", "scales", "seeds", "shapes", "weights", "TINY_LLAMA", "tiny_llama_config"]
