"""lora_ref: LoRA, QLoRA and adapter merging from first principles in NumPy.

The package is laid out in the book's chapter order, each package importing only those above it in this list
(``tests/test_layering.py`` holds the rule):

    quick       QUICK=1: the small configuration every chapter offers (``lora_ref/quick.py``)
    files       safetensors, HF checkpoint folders, atomic outputs, the artifact cache
    kernels     compiled Numba kernels on arrays, and the switch that turns them on      (chapter 6)
    autograd    Tensor, primitives, fused composites, numerical gradient checks          (chapter 1)
    modeling    nn modules, the Llama, tokenizers                                        (chapter 2)
    quant       NF4/FP4 codes, blockwise quantization, bitsandbytes' format               (chapter 5)
    adapters    LoRA layers and configs, QLoRA over 4-bit bases, PEFT files              (chapters 3, 7)
    merging     combining adapters: TIES, DARE, SVD, concatenation                       (chapter 8)
    serving     many adapters in one batch (BGMV), continuous batching, the HTTP server     (chapter 13)
    training    corpora, AdamW, the training loop, the tutorial model
    analysis    counts, the memory model, cached experiments                             (chapters 4, 9-11)
    reference   reference vectors, their checker, a torch twin of the model
    bench       benchmark rows
    tour        the sections of ``lora-ref tour``
    commands    the command line, one module per command

The public names below are imported lazily, so ``import lora_ref`` stays fast and a module is loaded only when
used. Module paths from before this layout (``lora_ref.llama``, ``lora_ref.lora``, ``lora_ref.fsutil`` …) still
import: a finder resolves each to the module that now holds it, the *same* module object, so module state (the
fast-path switch, registries) is never duplicated and monkeypatching either name patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from lora_ref.heap import keep_freed_memory as _keep_freed_memory
from lora_ref.threads import apply_defaults as _apply_thread_defaults

_apply_thread_defaults()  # idle thread pools sleep instead of spinning (lora_ref/threads.py); before any pool starts
_keep_freed_memory()  # freed memory stays mapped for the next step's arrays (lora_ref/heap.py)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Tensor": "autograd.tensor", "no_grad": "autograd.tensor", "enable_grad": "autograd.tensor",
    "is_grad_enabled": "autograd.tensor",
    "gradcheck": "autograd.numerical",
    "Parameter": "modeling.nn", "Module": "modeling.nn",
    "Llama": "modeling.llama", "LlamaConfig": "modeling.llama",
    "LoraConfig": "adapters.lora", "LoraLinear": "adapters.lora", "inject_lora": "adapters.lora",
    "merge_and_unload": "adapters.lora",
    "load_adapter": "adapters.peft_files", "save_adapter": "adapters.peft_files",
    "add_weighted_adapter": "merging.combine",
    "load_tokenizer": "modeling.tokenizer",
    "loftq_init": "adapters.loftq",
}

# module path before the chapter layout -> where the module lives now
MOVED = {
    "safetensors_io": "files.safetensors", "fsutil": "files.outputs", "cache": "files.cache",
    "fast": "kernels.switch", "jit": "kernels.jit", "matmul": "kernels.matmul", "train_kernels": "kernels.training",
    "tensor": "autograd.tensor", "ops": "autograd.ops", "functional": "autograd.functional",
    "nn": "modeling.nn", "llama": "modeling.llama",
    "lora": "adapters.lora", "qlora": "adapters.qlora", "peft_io": "adapters.peft_files",
    "merge": "merging.combine",
    "data": "training.data", "train": "training.loop", "optim": "training.optim", "tutorial": "training.tutorial",
    "counts": "analysis.counts", "memory": "analysis.memory", "memory_numpy": "analysis.memory_measure",
    "experiments": "analysis.experiments",
    "vectors": "reference.vectors", "check": "reference.check", "torch_ref": "reference.torch_model",
    "benchutil": "bench.timing", "bench_report": "bench.report", "train_bench": "bench.training",
    "quant.bench": "bench.quant", "quant.fused": "quant.dequant_matmul",
}

__all__ = sorted(_LAZY) + ["__version__"]


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``lora_ref.<old path>`` to the module at its new path (one object under two names)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("lora_ref."):
            return None
        new = MOVED.get(fullname[len("lora_ref."):])
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        # The import system keeps the module's own __name__ and __spec__ (they are set), binds it under the old
        # name in sys.modules and as an attribute of the parent package.
        return importlib.import_module("lora_ref." + MOVED[spec.name[len("lora_ref."):]])

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"lora_ref.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_ref' has no attribute {name!r}")


def __dir__():
    return __all__
