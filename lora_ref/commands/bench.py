"""``lora-ref bench``: every figure a ratio of our time to a baseline's, both measured alternately in one run.

Rows (``ratio = ours_s / baseline_s``; lower is better):

- ``train_step`` vs ``torch`` (group ``train``): one forward + backward + gradient clipping + AdamW step of the
  tutorial model (:mod:`lora_ref.tutorial`) on one batch of the pretraining corpus, against the same model written
  in PyTorch (:mod:`lora_ref.torch_ref`), run eagerly on the CPU, started from a copy of our initial weights, on
  the same batch, with the same optimizer settings and the same thread count. Before timing, one step of each is
  compared: the losses must agree, which shows both sides compute the same thing.
- the kernel rows (group ``kernels``) come from :func:`lora_ref.quant.bench.kernel_rows`.
"""

from __future__ import annotations

import json
import sys

HELP = "benchmarks, each a ratio against a baseline measured in the same run"

EXAMPLES = """\
examples:
  lora-ref bench                      # every row
  lora-ref bench train                # the training step of the tutorial model vs PyTorch
  lora-ref bench kernels --quick      # the kernel rows, fewer repeats
  lora-ref bench all --json > bench.json

Each row times our code and a baseline doing the same work, alternately in the same run (medians of several
repeats after warm-up), with equal thread counts (--threads, default: all CPUs) on both sides, and prints
ratio = our time / baseline time. --quick cuts repeats, never shapes. With --json, stdout is exactly one JSON
document {"machine": {...}, "results": [{"name", "ours_s", "baseline", "baseline_s", "ratio", "params"}], "notes": [...]};
progress goes to stderr. Timings vary with the machine's load; the ratios are the figure to read."""

GROUPS = ("train", "kernels", "all")


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
        from lora_ref.quant.bench import set_threads as _set
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


def train_step_row(quick: bool, threads: dict) -> dict:
    """``train_step`` vs ``torch``: one full training step of the tutorial model, ours against PyTorch eager."""
    import numpy as np
    import torch

    from lora_ref import tutorial
    from lora_ref.benchutil import row, time_pair
    from lora_ref.data import pretraining_corpus, sample_batch
    from lora_ref.llama import Llama
    from lora_ref.optim import AdamW
    from lora_ref.torch_ref import TorchLlama, torch_train_step
    from lora_ref.train import decay_groups, train_step

    r = tutorial.recipe(quick=False)
    cfg = tutorial.tutorial_config()
    model = Llama(cfg, rng=np.random.default_rng(0))
    tmodel = TorchLlama.from_state_dict(cfg, model.state_dict(), sdpa=True)
    x, y = sample_batch(pretraining_corpus().train, r["batch"], r["seq"], np.random.default_rng(1))  # (B, T)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    kw = dict(lr=r["lr"], betas=tuple(r["betas"]))
    opt = AdamW(decay_groups(model, r["weight_decay"]), **kw)
    tdecay = [p for p in tmodel.parameters() if p.ndim >= 2]
    tnodecay = [p for p in tmodel.parameters() if p.ndim < 2]
    topt = torch.optim.AdamW([{"params": tdecay, "weight_decay": r["weight_decay"]},
                              {"params": tnodecay, "weight_decay": 0.0}], **kw)
    clip = r["max_grad_norm"]

    # same work: the first step of each starts from the same weights and batch, so the losses agree
    loss_ours = train_step(model, opt, x, y, max_grad_norm=clip)
    loss_torch = torch_train_step(tmodel, topt, tx, ty, max_grad_norm=clip)
    if abs(loss_ours - loss_torch) > 1e-4 * abs(loss_torch):
        raise ValueError(f"train_step: our loss {loss_ours:.6f} differs from PyTorch's {loss_torch:.6f} on the same "
                         f"weights and batch; the comparison would not be of the same work")
    # after one step both have updated the same way; a second step checks the optimizers agree too
    loss2_ours = train_step(model, opt, x, y, max_grad_norm=clip)
    loss2_torch = torch_train_step(tmodel, topt, tx, ty, max_grad_norm=clip)
    if abs(loss2_ours - loss2_torch) > 1e-3 * abs(loss2_torch):
        raise ValueError(f"train_step: after one AdamW step our loss {loss2_ours:.6f} differs from PyTorch's "
                         f"{loss2_torch:.6f}")

    reps = {"repeats": 3, "warmup": 1} if quick else {"repeats": 9, "warmup": 2}
    ours_s, base_s = time_pair(lambda: train_step(model, opt, x, y, max_grad_norm=clip),
                               lambda: torch_train_step(tmodel, topt, tx, ty, max_grad_norm=clip), **reps)
    tokens = r["batch"] * r["seq"]
    try:
        from lora_ref import fast
        fast_paths = "on (fused Numba kernels)" if fast.enabled() else "off (readable NumPy twins)"
    except ImportError:
        fast_paths = "none"
    return row("train_step", ours_s, "torch", base_s,
               model=f"tutorial Llama: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, "
                     f"H={cfg.num_attention_heads}, K={cfg.num_key_value_heads}, F={cfg.intermediate_size}, "
                     f"V={cfg.vocab_size}", parameters=model.num_parameters(), batch=r["batch"], seq=r["seq"],
               tokens_per_s_ours=tokens / ours_s, tokens_per_s_torch=tokens / base_s,
               work="forward + cross-entropy + backward + clip_grad_norm(1.0) + AdamW, float32",
               torch=f"{torch.__version__}, eager, scaled_dot_product_attention",
               first_step_loss={"ours": loss_ours, "torch": loss_torch}, fast_paths=fast_paths,
               **reps, **threads)


def run(args) -> int:
    from lora_ref.benchutil import machine
    from lora_ref.cli import UsageError

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    threads = set_threads(args.threads)
    results, notes = [], []
    if args.which in ("train", "all"):
        _log("train_step: tutorial model, ours vs PyTorch eager")
        results.append(train_step_row(args.quick, threads))
    if args.which in ("kernels", "all"):
        try:
            from lora_ref.quant.bench import kernel_rows
        except ImportError as e:
            note = f"kernel rows not available: lora_ref.quant.bench.kernel_rows cannot be imported ({e})"
            _log(note)
            notes.append(note)
        else:
            _log("kernel rows (sgemm, NF4 dequantize / GEMV / quantize)")
            results.extend(kernel_rows(args.quick, threads["threads"]))
    doc = {"machine": machine(), "results": results, "notes": notes}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('cpus', '?')} CPUs; "
          f"threads on both sides: {threads.get('threads')}")
    print(f"{'name':<16} {'ours (ms)':>11}  {'baseline':<18} {'baseline (ms)':>13}  {'ratio':>7}")
    for r in results:
        print(f"{r['name']:<16} {r['ours_s'] * 1e3:>11.2f}  {r['baseline']:<18} {r['baseline_s'] * 1e3:>13.2f}  "
              f"{r['ratio']:>7.3f}")
    for n in notes:
        print(f"note: {n}")
    return 0
