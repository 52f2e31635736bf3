"""lora_ref: LoRA, QLoRA and adapter merging from first principles in NumPy.

The names below are imported lazily, so ``import lora_ref`` stays fast and a module is loaded only when used.
"""

from __future__ import annotations

import importlib

from lora_ref.threads import apply_defaults as _apply_thread_defaults

_apply_thread_defaults()  # idle thread pools sleep instead of spinning (lora_ref/threads.py); before any pool starts

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Tensor": "tensor", "no_grad": "tensor", "enable_grad": "tensor", "is_grad_enabled": "tensor",
    "gradcheck": "gradcheck",
    "Parameter": "nn", "Module": "nn", "LoraLinear": "lora", "merge_and_unload": "lora",
    "Llama": "llama", "LlamaConfig": "llama",
    "LoraConfig": "lora", "inject_lora": "lora",
    "load_adapter": "peft_io", "save_adapter": "peft_io",
    "add_weighted_adapter": "merge",
    "load_tokenizer": "modeling.tokenizer",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"lora_ref.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_ref' has no attribute {name!r}")


def __dir__():
    return __all__
