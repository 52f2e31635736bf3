"""Compiled kernels (Numba) that take and return arrays, their readable NumPy twins, and the switch that turns the fast paths on. Never imports the autograd (chapter 6).

- :mod:`lora_ref.kernels.switch` — the fast-path contract (read it first), the ``LORA_REF_FAST`` switch and the
  chooser machinery every kernel module uses.
- :mod:`lora_ref.kernels.reference` — the readable twins of the two modules below.
- :mod:`lora_ref.kernels.training` — the fused kernels of the training step and their chooser ``pick``.
- :mod:`lora_ref.kernels.matmul` — the tiled float32 GEMM and its chooser.
- :mod:`lora_ref.kernels.lora_batch` — the low-rank terms of a mixed-adapter batch (BGMV, chapter 13), its chooser
  and its twin :mod:`lora_ref.kernels.lora_batch_reference`.
- :mod:`lora_ref.kernels.blas` — large BLAS products shared out in chunks between threads (twin: ``np.matmul``).
- :mod:`lora_ref.kernels.jit` — Numba intrinsics the kernels build on (stack tiles, wide vectors, a register table).
- :mod:`lora_ref.kernels.cache` — Numba's on-disk cache made stale by an edit to any module of the package (an edited
  helper is never loaded stale from its callers' cache entries); installed by :mod:`lora_ref.kernels.jit`.
"""
