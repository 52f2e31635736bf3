"""LoRA adapters: configuration and target matching, the LoRA layer and its merge arithmetic, QLoRA over 4-bit
bases, LoRA on embeddings, modules trained in full (modules_to_save), LoftQ and PiSSA initialisations, PEFT adapter
files (chapters 3 and 7).

The generic code (:mod:`lora_ref.adapters.lora`) wraps a base layer in the LoRA class registered for its type
(:func:`lora_ref.adapters.lora.register_lora_layer`) and never imports the modules that register one; importing
this package runs those registrations, so whichever adapters module a caller imports first, a 4-bit layer gets
:class:`~lora_ref.adapters.qlora.LoraLinear4bit` and an embedding :class:`~lora_ref.adapters.embedding.LoraEmbedding`.
"""

from lora_ref.adapters import embedding, qlora  # noqa: F401  (registrations: LoraEmbedding, LoraLinear4bit)
