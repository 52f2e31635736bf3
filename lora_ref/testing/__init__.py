"""Public test helpers: hypothesis strategies for LoRA shapes, configs and adapters with B ≠ 0.

Import them in your own test suite to property-test merge code against lora_ref (see :mod:`.strategies`).
Needs ``hypothesis`` (the ``test`` extra).
"""

from lora_ref.testing.strategies import (  # noqa: F401
    DTYPES,
    LoraAdapter,
    adapter_sets,
    adapters,
    alphas,
    factors,
    lora_configs,
    ranks,
    shapes,
    weights,
)

__all__ = ["DTYPES", "LoraAdapter", "adapter_sets", "adapters", "alphas", "factors", "lora_configs", "ranks",
           "shapes", "weights"]
