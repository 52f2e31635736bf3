"""``lora-ref merge``: merge one or more PEFT adapters into a base checkpoint and write a plain HF checkpoint."""

from __future__ import annotations

HELP = "merge one or more PEFT adapters into a base checkpoint"

EXAMPLES = """\
examples:
  lora-ref merge --base runs/tour/base --adapter runs/tour/lora --out runs/merged
  lora-ref merge --base BASE --adapter A --adapter B --weights 0.7,0.3 --combination cat --out OUT
  lora-ref merge --base BASE --adapter A --adapter B --combination svd --svd-rank 16 --out OUT
  lora-ref merge --base BASE --adapter A --adapter B --combination dare_ties --density 0.5 --seed 1 --out OUT
  lora-ref merge --base BASE --adapter A --dtype bfloat16 --out OUT --json

--base is a Llama checkpoint folder (config.json + model.safetensors, or shards); each --adapter a PEFT adapter
folder (adapter_config.json + adapter_model.safetensors), e.g. from 'lora-ref finetune' or PEFT's
save_pretrained. One adapter without --weights is merged as PEFT's merge_and_unload does: W ← W + s·B·A, rounded
once to the output dtype. Several adapters (or --weights) are first combined into one adapter with PEFT's
add_weighted_adapter semantics (--combination, default svd; --weights default 1 each; --density for ties, dare_*
and magnitude_prune; --svd-rank for svd, default the largest adapter rank; --seed for DARE's random masks),
with two corrections: rsLoRA adapters are not over-scaled by sqrt(rank), and lora_B biases are kept.
Only cat, and svd with --svd-rank at least the summed ranks, reproduce the weighted sum of the adapters exactly.

--dtype (float32 or bfloat16) defaults to the base checkpoint's. The output folder gets config.json and
model.safetensors, which transformers' LlamaForCausalLM.from_pretrained and lora_ref's Llama.from_pretrained
load. --out must be missing or empty; the inputs are only read."""

_DTYPES = ("float32", "bfloat16")


def add_arguments(p) -> None:
    from lora_ref.merging.combine import COMBINATION_TYPES

    p.add_argument("--base", required=True, help="base checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--adapter", required=True, action="append", metavar="DIR",
                   help="PEFT adapter folder; repeat to combine several")
    p.add_argument("--weights", default=None, help="comma-separated weight per adapter (default 1 each)")
    p.add_argument("--combination", default="svd", choices=COMBINATION_TYPES, metavar="TYPE",
                   help="how several adapters are combined: " + "|".join(COMBINATION_TYPES) + " (default svd)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction kept by ties, dare_linear, dare_ties, magnitude_prune (0..1)")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of an svd combination (default: max rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="output dtype (default: the base's)")
    p.add_argument("--out", required=True, help="output checkpoint folder (must be missing or empty)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="4-bit base only: write the merge report (JSON) of each way to merge into it to FILE; "
                        "--out then gets PEFT's re-quantized merge")
    p.add_argument("--report-original", default=None, metavar="DIR",
                   help="with --report: the 16-bit checkpoint the 4-bit base was quantized from")


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    import math

    from lora_ref.errors import UsageError

    if text is None:
        return None
    try:
        ws = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(ws) != n:
        raise UsageError(f"--weights has {len(ws)} value(s) for {n} adapter(s)")
    if not all(math.isfinite(w) for w in ws):
        raise UsageError(f"--weights must be finite numbers, got {text!r}")
    return ws


def checkpoint_dtype(folder) -> str:
    """The dtype most of a checkpoint's tensors are stored in ("float32", "bfloat16", "float16"), from the
    safetensors header(s) alone."""
    import json
    import struct
    from collections import Counter
    from pathlib import Path

    folder = Path(folder)
    files = [folder / "model.safetensors"]
    if not files[0].is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
        files = sorted({folder / f for f in index["weight_map"].values()})
    counts: Counter = Counter()
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n).decode("utf-8"))
        for k, v in header.items():
            if k != "__metadata__":
                counts[v["dtype"]] += 1
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    return names.get(counts.most_common(1)[0][0], "float32") if counts else "float32"


def run(args) -> int:
    import json
    import sys
    import time

    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    from lora_ref.merging import combine as M
    from lora_ref.errors import UsageError
    from lora_ref.files.outputs import atomic_write, check_out_dir, output_dir, require_dir, write_json
    from lora_ref.modeling.llama import Llama
    from lora_ref.adapters.lora import as_bfloat16, lora_layers, merge_and_unload, set_adapter
    from lora_ref.adapters.peft_files import load_adapter

    if getattr(args, "report", None) or getattr(args, "report_original", None):
        from lora_ref.adapters.merge_report import run_report

        return run_report(args)
    t0 = time.perf_counter()
    adapters = list(args.adapter)
    weights = _parse_weights(args.weights, len(adapters))
    ct = args.combination
    combine = len(adapters) > 1 or weights is not None
    if args.density is not None:
        if not combine or ct not in M._NEEDS_DENSITY:
            raise UsageError(f"--density applies to combining with {', '.join(M._NEEDS_DENSITY)}")
        if not 0.0 <= args.density <= 1.0:
            raise UsageError(f"--density must lie in [0, 1], got {args.density}")
    elif combine and len(adapters) > 1 and ct in M._NEEDS_DENSITY:
        raise UsageError(f"--combination {ct} needs --density (the fraction of entries kept, 0..1)")
    if args.svd_rank is not None:
        if not combine or not ct.endswith("svd"):
            raise UsageError("--svd-rank applies to the svd combinations only")
        if args.svd_rank < 1:
            raise UsageError(f"--svd-rank must be >= 1, got {args.svd_rank}")
    check_out_dir(args.out)  # fail before any work
    require_dir(args.base, "base checkpoint folder")
    for a in adapters:
        require_dir(a, "adapter folder")

    model = Llama.from_pretrained(args.base)
    base_dtype = checkpoint_dtype(args.base)
    out_dtype = args.dtype or base_dtype
    if out_dtype not in _DTYPES:
        raise UsageError(f"the base checkpoint is stored in {base_dtype}; choose --dtype float32 or bfloat16")
    if base_dtype == "bfloat16" and out_dtype == "bfloat16":
        as_bfloat16(model)  # merges round once to bfloat16, as PEFT's merge into a bfloat16 weight does

    names = [f"adapter{i}" for i in range(len(adapters))]
    for name, folder in zip(names, adapters):
        load_adapter(model, folder, name)
    if combine:
        try:
            M.add_weighted_adapter(model, names, weights or [1.0] * len(names), "merged", combination_type=ct,
                                   svd_rank=args.svd_rank, density=args.density,
                                   rng=np.random.default_rng(args.seed))
        except ValueError as e:
            raise ValueError(f"the adapters cannot be combined with --combination {ct}: {e}") from None
        active = "merged"
    else:
        active = names[0]
    set_adapter(model, active)
    n_layers = sum(1 for _, layer in lora_layers(model) if active in layer.lora_A)
    merge_and_unload(model, adapter_names=[active])

    np_dtype = np.float32 if out_dtype == "float32" else ml_dtypes.bfloat16
    params = dict(model.named_parameters())
    tensors = {k: np.ascontiguousarray(params[k].data.astype(np_dtype)) for k in sorted(model.checkpoint_names())}
    for k, v in tensors.items():
        if not np.all(np.isfinite(v.astype(np.float32))):
            raise ValueError(f"the merged tensor {k} holds NaN or inf; nothing was written")
    config = model.config.to_dict()
    config["dtype"] = out_dtype
    with output_dir(args.out) as tmp:
        write_json(tmp / "config.json", config)
        atomic_write(tmp / "model.safetensors", safetensors.numpy.save(tensors, metadata={"format": "pt"}))

    doc = {
        "out": str(args.out), "base": str(args.base), "adapters": adapters, "weights": weights,
        "combination": ct if combine else None, "dtype": out_dtype, "base_dtype": base_dtype,
        "merged_layers": n_layers, "tensors": len(tensors), "seconds": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        how = f"{len(adapters)} adapters combined with {ct}" if combine else "1 adapter"
        sys.stdout.write(f"merged {how} into {n_layers} layers of {args.base}; wrote {out_dtype} checkpoint "
                         f"{args.out}\n")
    return 0
