"""Serving many LoRA adapters from one base model (chapter 13).

- :mod:`lora_ref.serving.bgmv` — y = x Wᵀ + s_a(i)·(x_i A_a(i)ᵀ) B_a(i)ᵀ for a batch whose rows use different
  adapters, unmerged (Punica's BGMV): a readable NumPy twin and a Numba kernel.
- :mod:`lora_ref.serving.batch` — :class:`~lora_ref.serving.batch.AdapterSet` (adapters loaded and unloaded by name)
  and :class:`~lora_ref.serving.batch.BatchDecoder` (one decode step for rows of different lengths, each with its own
  adapter and KV cache).
"""
