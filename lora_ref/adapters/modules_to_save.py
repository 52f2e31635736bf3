"""``modules_to_save``: whole modules trained (and saved) next to a LoRA adapter, as PEFT's ``ModulesToSaveWrapper``
(``peft/utils/other.py``).

Chat fine-tunes that add tokens must train the embedding rows and the output head in full, not through a low-rank
update. PEFT wraps each listed module: ``original_module`` stays frozen, ``modules_to_save[<adapter>]`` is a trainable
copy, and the forward pass uses the active adapter's copy (the original when adapters are disabled). In the adapter
file the copy's tensors are saved under the module's own names (``base_model.model.lm_head.weight``); merging or
unloading replaces the wrapper by the trained copy.

Matching: an entry names a module whose full name equals it or ends with ``"." + entry`` (PEFT's ``_set_trainable``).
An entry that matches nothing raises ``ValueError``; so does a module that is also a LoRA target.
"""

from __future__ import annotations

import copy

from lora_ref.modeling.nn import Module, ModuleDict

__all__ = ["ModulesToSave", "wrap_modules_to_save", "modules_to_save_wrappers", "unwrap_modules_to_save",
           "find_modules_to_save"]


class ModulesToSave(Module):
    """A frozen module and one trainable copy of it per adapter."""

    def __init__(self, module: Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        module.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Only ``adapter_name``'s copy is trainable (and used, if it exists)."""
        self.active_adapter = adapter_name
        for n, m in self.modules_to_save.items():
            m.requires_grad_(n == adapter_name)

    @property
    def weight(self):
        return self._active().weight

    def _active(self) -> Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self._active()(*args, **kwargs)


def find_modules_to_save(model: Module, entries) -> list[str]:
    """Module names matching ``entries`` (``ValueError`` naming an entry that matches nothing)."""
    names = [n for n, _ in model.named_modules() if n]
    found = []
    for e in entries:
        hits = [n for n in names if (n == e or n.endswith("." + e)) and not any(
            n.startswith(f + ".") for f in found) and ".modules_to_save." not in n and ".original_module" not in n]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits if h != n)]
        if not hits:
            raise ValueError(f"modules_to_save names {e!r}, but the model has no such module "
                             f"(some module names: {names[:6]})")
        found.extend(h for h in hits if h not in found)
    return found


def wrap_modules_to_save(model: Module, entries, adapter_name: str, lora_targets=()) -> list[str]:
    """Wrap (or extend) every module ``entries`` names for ``adapter_name``; returns the module names."""
    names = find_modules_to_save(model, entries)
    for n in names:
        if n in set(lora_targets):
            raise ValueError(f"{n} is both a LoRA target and in modules_to_save; choose one")
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, ModulesToSave):
            m.update(adapter_name)
        else:
            model.set_submodule(n, ModulesToSave(m, adapter_name))
    return names


def modules_to_save_wrappers(model: Module):
    """(name, wrapper) for every :class:`ModulesToSave` in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield n, m


def unwrap_modules_to_save(model: Module, adapter_names=None) -> None:
    """Replace every wrapper by its active (or first listed) adapter's trained copy, as PEFT's merge_and_unload /
    unload do."""
    for n, w in list(modules_to_save_wrappers(model)):
        pick = w.active_adapter
        if adapter_names:
            pick = next((a for a in adapter_names if a in w.modules_to_save), pick)
        model.set_submodule(n, w.modules_to_save[pick] if pick in w.modules_to_save else w.original_module)
