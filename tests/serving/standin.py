"""A stand-in for lora_ref.serving.batch (AdapterSet, BatchDecoder) built from lora_ref's single-sequence model code.

Each row is its own sequence with its own :class:`~lora_ref.modeling.llama.KVCache`; a decode step runs the rows
one after another, switching the model's active PEFT adapter (or disabling adapters for the base) per row. It is
slow and obviously correct: what ``lora-ref generate`` computes, row by row. The engine and server tests use it to
check the scheduling and the HTTP layer on their own, apart from the batched kernels.
"""

from __future__ import annotations

import contextlib

import numpy as np

from lora_ref.adapters.lora import delete_adapter, disable_adapters, set_adapter
from lora_ref.adapters.peft_files import load_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.generate import _last_logits
from lora_ref.modeling.llama import KVCache


class StandInAdapterSet:
    def __init__(self, model):
        self.model = model
        self._names: list[str] = []

    def load(self, name: str, folder) -> None:
        if name in self._names:
            raise ValueError(f"adapter {name!r} is already loaded")
        load_adapter(self.model, folder, name)  # ValueError on a bad folder, before the model is touched
        self._names.append(name)

    def unload(self, name: str) -> None:
        delete_adapter(self.model, name)
        self._names.remove(name)

    def names(self) -> list[str]:
        return list(self._names)


class StandInDecoder:
    def __init__(self, model, adapters: StandInAdapterSet, *, max_batch: int):
        self.model = model.eval()
        self.adapters = adapters
        self.max_batch = max_batch
        self._rows: dict[int, tuple[KVCache, str | None]] = {}

    def _use(self, adapter):
        if adapter is None:
            return disable_adapters(self.model) if self.adapters.names() else contextlib.nullcontext()
        set_adapter(self.model, adapter)
        return contextlib.nullcontext()

    def prefill(self, row: int, token_ids, adapter):
        assert 0 <= row < self.max_batch and row not in self._rows, row
        cache = KVCache(self.model.config.num_hidden_layers)
        self._rows[row] = (cache, adapter)
        with self._use(adapter), no_grad():
            return _last_logits(self.model, np.asarray([token_ids], dtype=np.int64), cache)[0]

    def decode(self, rows, tokens):
        out = []
        for row, token in zip(rows, tokens):
            cache, adapter = self._rows[row]
            with self._use(adapter), no_grad():
                out.append(_last_logits(self.model, np.asarray([[token]], dtype=np.int64), cache)[0])
        return np.stack(out)

    def free(self, row: int) -> None:
        del self._rows[row]
