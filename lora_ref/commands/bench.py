"""``lora-ref bench``: every figure a ratio of our time to a baseline's, both measured alternately in one run.

Rows (``ratio = ours_s / baseline_s``; lower is better):

- group ``train`` (:mod:`lora_ref.bench.training`): ``train_step`` vs ``torch``, one forward + backward + gradient
  clipping + AdamW step of the tutorial model (:mod:`lora_ref.training.tutorial`) against the same model written in
  PyTorch (:mod:`lora_ref.reference.torch_model`), run eagerly on the CPU from a copy of our initial weights, on the same batch
  (the losses of both sides are compared before timing); ``qlora_step`` vs ``lora_step``; the memory rows.
  The group also holds ``contention`` vs ``quiet`` (:func:`lora_ref.bench.real.contention_row`): the same step
  beside one busy process against the step without it.
- group ``real`` (:mod:`lora_ref.bench.real`, SmolLM2-135M-Instruct from the artifact cache): ``real_lora_step`` vs
  ``torch_peft`` (a LoRA step, r 16, all-linear, 4 × 256 tokens, against transformers + PEFT), ``real_qlora_step``
  vs ``real_lora_step`` and ``real_prefill`` vs ``torch`` (a 1 × 512 forward against transformers, eager or sdpa,
  whichever is faster). Without torch, transformers and peft (the ``interop`` extra) a note says so instead.
- group ``kernels`` (:func:`lora_ref.bench.quant.kernel_rows`): sgemm and the NF4 kernels.
- group ``decode`` (:func:`lora_ref.bench.decode.decode_rows`): greedy decoding of SmolLM2-135M-Instruct, float32
  and NF4, against transformers' ``generate`` and against the memory roofline.
- group ``serving`` (:func:`lora_ref.bench.serving.serving_rows`): seconds per generated token on SmolLM2-135M-Instruct
  (fetched on first use) — four adapters mixed in one batch against one adapter, the batch against one request at
  a time, and one request's unmerged adapter against the merged model.

Numba, the BLAS and torch are pinned to the same thread count (``--threads``) before any row runs.
"""

from __future__ import annotations

import json
import sys

EXAMPLES = """\
examples:
  lora-ref bench                      # every row
  lora-ref bench train                # training step vs PyTorch, QLoRA vs LoRA step, peak memory, contention
  lora-ref bench real                 # SmolLM2: LoRA / QLoRA step vs PEFT, prefill vs transformers
  lora-ref bench kernels --quick      # the kernel rows, fewer repeats
  lora-ref bench decode               # decoding SmolLM2-135M: vs transformers and vs the memory roofline
  lora-ref bench serving              # mixed-adapter batches on SmolLM2-135M-Instruct (fetched on first use)
  lora-ref bench all --json > bench.json

Each row times our code and a baseline doing the same work, alternately in the same run (after warm-up: medians
of several repeats for the training rows, the fastest of several rounds for the kernel and decode rows), with
equal thread counts (--threads, default: all CPUs) on both sides, and prints ratio = our time / baseline time.
--quick cuts repeats or rounds, never shapes or token counts. With --json, stdout is exactly one JSON
document {"machine": {...}, "results": [{"name", "ours_s", "baseline", "baseline_s", "ratio", "goal", "met",
"params"}], "notes": [...]};
progress goes to stderr. Timings vary with the machine's load; the ratios are the figure to read."""

GROUPS = ("train", "real", "kernels", "decode", "serving", "all")


def add_arguments(p) -> None:
    p.add_argument("which", nargs="?", default="all", choices=GROUPS, help="which rows (default all)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (same shapes)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--threads", type=int, default=None, help="threads on both sides (default: all CPUs)")


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench] {msg}\n")
    sys.stderr.flush()


def set_threads(n: int | None) -> dict:
    """Equal thread counts for Numba, the BLAS and torch (the kernels' helper when it is importable)."""
    try:
        from lora_ref.bench.quant import set_threads as _set
    except ImportError:
        _set = None
    if _set is not None:
        info = _set(n)
        info.pop("numba_threading_layer", None)
        return info
    import os

    import torch
    from threadpoolctl import threadpool_limits

    n = int(n or os.cpu_count() or 1)
    threadpool_limits(n)
    torch.set_num_threads(n)
    return {"threads": n, "torch_threads": torch.get_num_threads()}


def run(args) -> int:
    from lora_ref.bench.report import text_table
    from lora_ref.bench.timing import machine
    from lora_ref.errors import UsageError

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    threads = set_threads(args.threads)
    results, notes = [], []
    if args.which in ("train", "all"):
        from lora_ref.bench.training import memory_rows, qlora_step_row, train_step_row

        _log("train_step: the tutorial model's training step, ours vs PyTorch eager")
        results.append(train_step_row(args.quick))
        _log("qlora_step: the adapter step on an NF4 base vs on a float32 base")
        results.append(qlora_step_row(args.quick))
        _log("memory: peak bytes of full, LoRA and QLoRA training steps")
        results.extend(memory_rows())
        from lora_ref.bench.real import contention_row

        _log("contention: the training step beside one busy process vs quiet")
        results.append(contention_row(args.quick))
    if args.which in ("real", "all"):
        from lora_ref.bench import real

        try:
            real.require_torch()
        except ImportError as e:
            note = f"real-model rows (real_lora_step, real_qlora_step, real_prefill) not run: {e}"
            _log(note)
            notes.append(note)
        else:
            _log(f"real_lora_step, real_qlora_step: LoRA / QLoRA steps on {real.MODEL} vs transformers + PEFT")
            results.extend(real.real_lora_rows(args.quick))
            _log(f"real_prefill: a 1 x {real.PREFILL} forward of {real.MODEL} vs transformers (eager, sdpa)")
            results.append(real.real_prefill_row(args.quick))
    if args.which in ("kernels", "all"):
        try:
            from lora_ref.bench.quant import kernel_rows
        except ImportError as e:
            note = f"kernel rows not available: lora_ref.bench.quant.kernel_rows cannot be imported ({e})"
            _log(note)
            notes.append(note)
        else:
            _log("kernel rows (sgemm, NF4 dequantize / GEMV / quantize)")
            results.extend(kernel_rows(args.quick, threads["threads"]))
    if args.which in ("decode", "all"):
        from lora_ref.bench.decode import decode_rows

        _log("decode rows: SmolLM2-135M-Instruct greedy decoding, float32 and NF4, vs transformers and the roofline")
        rows = decode_rows(args.quick, threads["threads"], log=_log)
        notes.extend(r["params"]["skipped"] for r in rows if r["ratio"] is None)
        results.extend(rows)
    if args.which in ("serving", "all"):
        from lora_ref.bench.serving import serving_rows

        _log("serving rows: mixed-adapter batches, batched vs one at a time, unmerged vs merged (SmolLM2-135M)")
        results.extend(serving_rows(args.quick))
    doc = {"machine": machine(), "results": results, "notes": notes}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('cpus', '?')} CPUs; "
          f"threads on both sides: {threads.get('threads')}")
    print(text_table(results))
    for n in notes:
        print(f"note: {n}")
    return 0
