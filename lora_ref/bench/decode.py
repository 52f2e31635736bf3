"""Benchmark rows of decoding a real model: ours against transformers' ``generate``, and against the memory roofline.

Rows (:func:`lora_ref.bench.timing.row`; ``ratio = ours / baseline``, lower is better; times are seconds per
generated token):

- ``real_decode_fp32`` vs ``transformers``: greedy decoding of SmolLM2-135M-Instruct (fetched and cached by
  :func:`lora_ref.files.models.fetch`), 128 new tokens after a 128-token prompt, KV cache, float32, our
  :func:`lora_ref.modeling.generate.generate_tokens` (:class:`lora_ref.modeling.decode.Decoder`) against
  transformers' ``generate(do_sample=False)`` in float32 on the same folder, both without an end-of-sequence stop.
- ``real_decode_nf4`` vs ``transformers_fp32``: the same with our model quantized to NF4 (blocksize 64, double
  quantization, the tied head float32 as in bitsandbytes' default), against the same float32 transformers run.
- ``real_decode_fp32_roofline``, ``real_decode_nf4_roofline`` vs ``roofline``: our time against the time it takes
  to read the bytes one decode step must read (:func:`decode_bytes`: every weight once as stored, the head once,
  the norms, and the keys and values of the cached positions, averaged over the 128 steps) at the read bandwidth
  measured in the same run (:func:`read_bandwidth`: best of 5 ``np.sum`` passes over 512 MiB, split over as many
  threads as the decoding uses).

Before timing, both sides must choose the same tokens: ours and transformers' greedy continuations are compared
token for token (for NF4, against transformers running our dequantized NF4 weights), and ``ValueError`` ends the
row otherwise. The prefill is excluded on both sides: every generated token's time is taken as it is produced
(our generator's yields, a transformers ``streamer``'s ``put`` calls), and a run's figure is the median of its 127
step times (the first token comes from the prefill); runs of ours and of transformers alternate, and each side's
figure is the minimum over its runs. On a machine shared with other work a slow phase only adds time, so the
minimum of medians is the figure that repeats (``--quick`` runs fewer alternations of the same work).
If torch or transformers is missing, the transformers rows say so (``ours_s`` only, no ratio) and the roofline
rows still run.

Measured on 2 cores shared with other work (load average 3.6-5), ``lora-ref bench decode --threads 2``: float32
45.9 ms per token against transformers' 81.7 (ratio 0.56), 0.59 of the roofline; NF4 27.4 ms (0.34 of
transformers' float32 time), 1.09 of its roofline. Where the time goes (each part timed alone, same load): float32
layers 54 ms (8 GB/s over their 431 MB), head 12.5 ms (9 GB/s over 113 MB); NF4 layers 20.5 ms (61 MB: decoding the
codes, ~5 G weights/s on 2 threads, not the memory, is the limit), head 11.7 ms, so the float32 head is ~40% of an
NF4 step; the Python around the compiled call is under 0.1 ms per token. Later, on a quiet 2-CPU AMD Zen 3 virtual
machine (AVX2, no AVX-512; ``Decoder.step`` timed directly, best of 15 × 32 steps, three processes): NF4
13.2-14.6 ms per token, of which the float32 head 3.9-4.3 ms and the layers with attention the rest; float32
22.3-23.5 ms. On a quiet 2-CPU Intel Xeon with AVX-512 (median of 64 steps, best of 5 runs, alternating
processes, each pair of figures from one session of alternating runs, since the host's speed moved between them):
NF4 15.3-17.0 ms before commit 5bd4e46 against 10.9-12.4 ms at it (the 4-bit rows prefetch their codes); later,
5bd4e46 against 8dab331, float32 32.6-32.9 → 25.0-26.1 ms and NF4 13.9-14.2 → 11.3-12.6 ms (the float32 rows one
running sum, inlined into the parallel loops; the float32 head alone, :func:`lora_ref.kernels.decode.head_step`,
5.4 → 4.6 ms, NumPy's sgemv 3.9-4.0 ms).
A roofline ratio below 1 means the probe the rows use, ``np.sum`` (pairwise summation, ~7 GB/s
on the first machine), reads more slowly than a GEMV's streaming loads: it is a conservative bandwidth, not the
machine's peak.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

from lora_ref.bench.timing import row

__all__ = ["read_bandwidth", "decode_bytes", "decode_bytes_from_config", "prompt_ids", "decode_rows",
           "PROMPT_TOKENS", "NEW_TOKENS", "MODEL"]

MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 128
NEW_TOKENS = 128
BANDWIDTH_BYTES = 512 * 2**20
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a press "
    "adapted from wine making with movable metal type, oil-based ink and paper. Books became cheaper, literacy "
    "spread, and ideas travelled faster across Europe than ever before. Scholars compared editions, scientists "
    "shared their measurements, and reformers printed pamphlets by the thousand. Within fifty years presses were "
    "working in more than two hundred cities. Explain, step by step and in detail, how this invention changed "
    "science, religion, politics and everyday life, and what parallels you see with the internet today."
)


# ---------------------------------------------------------------------------------------------------------------
# the roofline: bytes and bandwidth
# ---------------------------------------------------------------------------------------------------------------


def read_bandwidth(threads: int = 1, nbytes: int = BANDWIDTH_BYTES, passes: int = 5) -> float:
    """Bytes per second read by ``np.sum`` over a float32 array of ``nbytes``, split in ``threads`` equal slices
    summed by as many threads at once (NumPy releases the GIL in the sum); the best of ``passes`` passes."""
    if threads < 1 or passes < 1 or nbytes < 4 * threads:
        raise ValueError(f"threads and passes must be >= 1 and nbytes >= 4 * threads, got {threads}, {passes}, "
                         f"{nbytes}")
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(passes):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def decode_bytes(decoder, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS) -> dict:
    """Bytes one decode step reads, by part, for a ``Decoder``: the weights as stored
    (:meth:`lora_ref.modeling.decode.Decoder.weight_bytes`) and the keys and values it attends over, averaged over
    the timed steps (the first new token comes from the prefill; step j = 0 … ``new_tokens`` − 2 feeds position
    ``prompt_tokens + j`` and attends over ``prompt_tokens + j + 1`` positions); ``total``."""
    parts = dict(decoder.weight_bytes())
    positions = [prompt_tokens + j + 1 for j in range(new_tokens - 1)]
    parts["kv_cache"] = int(round(statistics.fmean(decoder.kv_bytes(p) for p in positions))) if positions else 0
    parts["total"] = sum(parts.values())
    return parts


def decode_bytes_from_config(config: dict, *, weight_bits: str = "fp32", prompt_tokens: int = PROMPT_TOKENS,
                             new_tokens: int = NEW_TOKENS, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """The same total counted from a ``config.json`` dict alone (an independent count for the tests and the book).

    ``weight_bits`` "fp32" (4 bytes per projection weight) or "nf4" (half a byte, plus one 8-bit scale per
    ``blocksize`` weights, a float32 scale per ``nested_blocksize`` blocks and a float32 offset per matrix, as
    double quantization stores them); the head, tied or not, float32 and read once.
    """
    D, F, V, L = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    Dh = config.get("head_dim") or D // H
    shapes = [(H * Dh, D), (K * Dh, D), (K * Dh, D), (D, H * Dh), (F, D), (F, D), (D, F)]
    if weight_bits == "fp32":
        per_layer = sum(4 * n * k for n, k in shapes)
    elif weight_bits == "nf4":
        per_layer = 0
        for n, k in shapes:
            blocks = -(-n * k // blocksize)
            per_layer += -(-n * k // 2) + blocks + 4 * -(-blocks // nested_blocksize) + 4
    else:
        raise ValueError(f"weight_bits must be 'fp32' or 'nf4', got {weight_bits!r}")
    norms = 4 * D * (2 * L + 1)
    head = 4 * V * D
    embedding_row = 0 if config.get("tie_word_embeddings", True) else 4 * D
    positions = [prompt_tokens + j + 1 for j in range(new_tokens - 1)]
    kv = round(statistics.fmean(2 * L * K * p * Dh * 4 for p in positions)) if positions else 0
    return L * per_layer + norms + head + embedding_row + int(kv)


# ---------------------------------------------------------------------------------------------------------------
# the two sides
# ---------------------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, n: int = PROMPT_TOKENS) -> np.ndarray:
    """The first ``n`` tokens of a fixed English text (repeated as needed), int64 (n,)."""
    ids = np.asarray(tokenizer.encode(PROMPT_TEXT, add_special_tokens=False), np.int64)
    return np.resize(ids, n)


def _ours(model, ids, n: int) -> tuple[list[int], list[float]]:
    """Our greedy tokens and the time of each, as :func:`generate_tokens` yields them (threads as pinned)."""
    from lora_ref.modeling.generate import generate_tokens

    tokens, stamps = [], []
    for tok in generate_tokens(model, ids, n, decode_threads=None):
        stamps.append(time.perf_counter())
        tokens.append(tok)
    return tokens, stamps


def _transformers_model(folder, state: dict | None = None):
    """transformers' float32 ``AutoModelForCausalLM`` of ``folder`` (with ``state`` loaded over its weights), in
    eval mode, with no end-of-sequence stop (so both sides generate the same number of tokens)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if state is not None:
        missing = set(state) - set(hf.state_dict())
        if missing:
            raise ValueError(f"transformers' model has no tensors {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                hf.get_parameter(name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _theirs(hf, ids, n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and the time each one reached its streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    x = torch.from_numpy(np.asarray(ids, np.int64)[None, :])
    stream = Stamps()
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, streamer=stream)
    return out[0, x.shape[1]:].tolist(), stream.times[1:]     # the first put is the prompt


def _per_token(stamps: list[float]) -> float:
    """Seconds per generated token of one run: the median of its step times (the prefill's token excluded)."""
    return statistics.median(np.diff(stamps))


def _check_same(name: str, ours: list[int], theirs: list[int]) -> None:
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(f"{name}: our greedy tokens differ from transformers' at token {first} "
                         f"({ours[first:first + 3]} vs {theirs[first:first + 3]}): the two sides would not do the "
                         "same work")


def _dequantized_state(model) -> dict:
    """Every 4-bit projection's dequantized weight, by checkpoint name (what transformers must run to match)."""
    from lora_ref.modeling.linear4bit import Linear4bit

    return {f"{n}.weight": m.dequantize() for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def _reps(quick: bool) -> dict:
    return {"repeats": 2, "warmup": 1} if quick else {"repeats": 5, "warmup": 1}


def _timed(runs: dict, repeats: int, warmup: int) -> dict:
    """Alternate the runs (name → callable returning token stamps) ``warmup`` + ``repeats`` times; each one's
    minimum over the timed rounds of its per-token median."""
    best = {k: float("inf") for k in runs}
    names = list(runs)
    for i in range(warmup + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for k in order:
            t = _per_token(runs[k]())
            if i >= warmup:
                best[k] = min(best[k], t)
    return best


def _threads_info() -> dict:
    """The thread counts in force on both sides: Numba's, the BLAS's and torch's (when installed)."""
    from lora_ref.threads import thread_info

    info = {k: v for k, v in thread_info().items() if k in ("numba_threads", "blas_threads")}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def decode_rows(quick: bool = False, threads: int | None = None, *, log=None, prompt_tokens: int = PROMPT_TOKENS,
                new_tokens: int = NEW_TOKENS, bandwidth_bytes: int = BANDWIDTH_BYTES) -> list[dict]:
    """The four decode rows (see the module docstring). ``threads`` is the thread count the caller pinned on every
    side (``lora-ref bench --threads``; default all CPUs), used for the bandwidth measurement; ``log`` a callable
    taking progress lines. The token counts and the bandwidth array's size are the documented ones unless given
    (the tests run a short version)."""
    from lora_ref.adapters.qlora import quantize_model
    from lora_ref.bench.report import GOALS
    from lora_ref.files.models import fetch
    from lora_ref.modeling.decode import Decoder
    from lora_ref.modeling.llama import Llama
    from lora_ref.modeling.tokenizer import load_tokenizer

    log = log or (lambda msg: None)
    n_threads = threads or os.cpu_count() or 1
    folder = fetch(MODEL, progress=False)
    tok = load_tokenizer(folder)
    ids = prompt_ids(tok, prompt_tokens)
    fp32 = Llama.from_pretrained(folder)
    nf4 = quantize_model(Llama.from_pretrained(folder), blocksize=64, double_quant=True, quant_type="nf4")
    try:
        hf = _transformers_model(folder)
        hf_note = None
    except ImportError as e:
        hf, hf_note = None, f"transformers rows not measured: {e}"
        log(hf_note)

    tokens = {"fp32": _ours(fp32, ids, new_tokens)[0], "nf4": _ours(nf4, ids, new_tokens)[0]}
    if hf is not None:
        log("checking that ours and transformers choose the same tokens (float32, then our NF4 weights)")
        _check_same("real_decode_fp32", tokens["fp32"], _theirs(hf, ids, new_tokens)[0])
        hf_nf4 = _transformers_model(folder, _dequantized_state(nf4))
        _check_same("real_decode_nf4", tokens["nf4"], _theirs(hf_nf4, ids, new_tokens)[0])
        del hf_nf4

    log(f"read bandwidth: np.sum over {bandwidth_bytes / 2**20:.0f} MiB")
    bandwidth = read_bandwidth(n_threads, bandwidth_bytes)
    runs = {"fp32": lambda: _ours(fp32, ids, new_tokens)[1], "nf4": lambda: _ours(nf4, ids, new_tokens)[1]}
    if hf is not None:
        runs["transformers"] = lambda: _theirs(hf, ids, new_tokens)[1]
    reps = _reps(quick)
    log(f"timing {', '.join(runs)} alternately ({reps['repeats']} rounds after {reps['warmup']} warm-up)")
    best = _timed(runs, **reps)
    bandwidth = max(bandwidth, read_bandwidth(n_threads, bandwidth_bytes))      # once before and once after the timed runs

    common = dict(model=MODEL, prompt_tokens=prompt_tokens, new_tokens=new_tokens, greedy=True,
                  statistic="min over runs of the median step time; prefill excluded", **reps, **_threads_info())
    if hf is not None:
        import torch
        import transformers

        common["transformers"] = f"{transformers.__version__} (torch {torch.__version__}), float32, generate"
    rows = []
    for kind, decoder_model in (("fp32", fp32), ("nf4", nf4)):
        name = f"real_decode_{kind}"
        baseline = "transformers" if kind == "fp32" else "transformers_fp32"
        extra = dict(quantization={"quant_type": "nf4", "blocksize": 64, "double_quant": True, "head": "float32"}) \
            if kind == "nf4" else {}
        if hf is not None:
            r = row(name, best[kind], baseline, best["transformers"], tokens_checked=new_tokens, **extra, **common)
        else:
            r = {"name": name, "ours_s": best[kind], "baseline": baseline, "baseline_s": None, "ratio": None,
                 "params": dict(skipped=hf_note, **extra, **common)}
        rows.append(r)
        nbytes = decode_bytes(Decoder(decoder_model, prompt_tokens + new_tokens), prompt_tokens, new_tokens)
        rows.append(row(f"{name}_roofline", best[kind], "roofline", nbytes["total"] / bandwidth,
                        bytes_per_token=nbytes, read_bandwidth_bytes_per_s=bandwidth,
                        bandwidth_measure=f"best of 5 np.sum passes over {bandwidth_bytes / 2**20:.0f} MiB on "
                                          f"{n_threads} threads, before and after the timed runs",
                        **extra, **common))
    for r in rows:
        goal = GOALS.get(r["name"])
        r["goal"] = goal
        r["met"] = None if goal is None or r["ratio"] is None else bool(r["ratio"] <= goal)
    return rows
