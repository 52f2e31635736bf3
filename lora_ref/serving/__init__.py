"""Serving many LoRA adapters from one base model (chapter 13).

- :mod:`lora_ref.serving.bgmv` — y = x Wᵀ + s_a(i)·(x_i A_a(i)ᵀ) B_a(i)ᵀ for a batch whose rows use different
  adapters, unmerged (Punica's BGMV): a readable NumPy twin and a Numba kernel.
- :mod:`lora_ref.serving.batch` — :class:`~lora_ref.serving.batch.AdapterSet` (adapters loaded and unloaded by name)
  and :class:`~lora_ref.serving.batch.BatchDecoder` (one decode step for rows of different lengths, each with its own
  adapter and KV cache).
- :mod:`lora_ref.serving.engine` — the scheduler: one compute thread, continuous batching (a request joins the
  running batch at the next decode step), per-row sampling, adapters held under an LRU bound.
- :mod:`lora_ref.serving.server` — OpenAI's API shape over HTTP (aiohttp): completions, chat completions, models,
  vLLM's load/unload adapter routes; ``lora-ref serve``.
- :mod:`lora_ref.serving.loadtest` — concurrent clients against a server: throughput, p50/p99 latency, errors;
  ``lora-ref loadtest``.
"""
