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
  lora-ref merge --base BASE-NF4 --adapter QLORA --out OUT                # 4-bit base: float output
  lora-ref merge --base BASE-NF4 --adapter QLORA --quantized requantize --out OUT

--base is a Llama checkpoint folder (config.json + model.safetensors, or shards); each --adapter a PEFT adapter
folder (adapter_config.json + adapter_model.safetensors), e.g. from 'lora-ref finetune' or PEFT's
save_pretrained. One adapter without --weights is merged as PEFT's merge_and_unload does: W ← W + s·B·A, rounded
once to the output dtype. Several adapters (or --weights) are first combined into one adapter with PEFT's
add_weighted_adapter semantics (--combination, default svd; --weights default 1 each; --density for ties, dare_*
and magnitude_prune; --svd-rank for svd, default the largest adapter rank; --seed for DARE's random masks),
with two corrections: rsLoRA adapters are not over-scaled by sqrt(rank), and lora_B biases are kept.
Only cat, and svd with --svd-rank at least the summed ranks, reproduce the weighted sum of the adapters exactly.

--dtype (float32 or bfloat16) defaults to the base checkpoint's. The output folder gets config.json and
model.safetensors (or, for a sharded base, the same shards and model.safetensors.index.json), which transformers'
LlamaForCausalLM.from_pretrained and lora_ref's Llama.from_pretrained load, and the base's tokenizer, chat template
and generation config. --out must be missing or empty; the inputs are only read.

A 4-bit base (bitsandbytes NF4/FP4, as 'lora-ref quantize' or transformers + bitsandbytes write it) is read in 4
bits. By default (--quantized float) the output is a floating-point checkpoint: dequant(W) + s·B·A for the adapted
layers and dequant(W) for the others — the model the QLoRA adapter was trained with, merged exactly (as
transformers' model.dequantize() followed by PEFT's merge_and_unload). --quantized requantize writes a 4-bit
checkpoint as PEFT's merge_and_unload on a bitsandbytes model does (dequantize, add, quantize again; --rounding cpu
for bitsandbytes' CPU arithmetic), --quantized refit the same with per-block least-squares scales; both pay the
4-bit error of the merged weights once more.

Memory: the base is read one tensor at a time and the output written as it goes (sharded bases included), so the
peak is a few times the largest tensor plus the adapters, not the model."""

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
    p.add_argument("--quantized", default="float", choices=STRATEGIES,
                   help="with a 4-bit base: float (default) writes dequant(W) + BA in floating point; requantize "
                        "(PEFT's merge) and refit write a 4-bit checkpoint")
    p.add_argument("--rounding", choices=("cuda", "cpu"), default="cuda",
                   help="arithmetic of --quantized requantize: bitsandbytes' CUDA kernels (default) or its CPU path")
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
    """The dtype most of a checkpoint's floating-point tensors are stored in ("float32", "bfloat16", "float16"), from
    the safetensors header(s) alone (a 4-bit checkpoint's uint8 codes and tables are not counted)."""
    from collections import Counter

    from lora_ref.files.safetensors import CheckpointReader

    counts: Counter = Counter()
    with CheckpointReader(folder) as reader:
        for name in reader.names():
            counts[reader.dtype(name).name] += 1
    counts = Counter({k: v for k, v in counts.items() if k in ("float32", "bfloat16", "float16", "float64")})
    return counts.most_common(1)[0][0] if counts else "float32"


STRATEGIES = ("float", "requantize", "refit")


def merge_checkpoint(base, adapters, out, *, weights=None, combination="svd", density=None, svd_rank=None, seed=0,
                     dtype=None, quantized="float", rounding="cuda", progress=None) -> dict:
    """Merge PEFT adapter folder(s) into the checkpoint ``base`` and write the result to ``out``; returns the report
    (the ``--json`` document).

    **Streaming.** The model is built with :func:`lora_ref.modeling.nn.placeholders` (its weights take no memory); only the
    1-D tensors (norms, biases) and the adapters are loaded up front. Then every weight is read, merged if an
    adapter targets it, handed to a :class:`lora_ref.files.safetensors.SafetensorsWriter` and dropped. The peak memory
    is a few times the largest tensor plus the adapters, not the model. A sharded base gives a sharded output with
    the same shard files and the same tensor-to-shard map.

    The merge is the one :func:`lora_ref.adapters.lora.merge_and_unload` does, on the same layers with the same arithmetic:
    the output is byte for byte what loading the whole model, merging and writing it with
    :func:`lora_ref.files.safetensors.write_safetensors` gives (tested).

    **A 4-bit base** (a bitsandbytes folder, see :meth:`lora_ref.modeling.llama.Llama.from_pretrained`) is merged by
    :func:`lora_ref.adapters.qlora.merge_4bit` with ``quantized`` as its strategy:

    - ``"float"`` (default): a floating-point checkpoint, ``dequant(W) + ΔW`` for the adapted layers and
      ``dequant(W)`` for the others, in ``dtype`` (default: the dtype of the base's float tensors). This is the
      function the QLoRA-trained model computes, up to one rounding — the adapter was trained against
      ``dequant(W)``, so this merge keeps what was learned. It equals transformers' ``model.dequantize()``
      followed by PEFT's ``merge_and_unload`` (tested live).
    - ``"requantize"``: a 4-bit checkpoint in the same format, ``Q(dequant(W) + ΔW)`` — what PEFT's
      ``merge_and_unload`` does on a bitsandbytes model (``rounding="cpu"`` reproduces bitsandbytes' CPU path),
      except that a ``lora_B`` bias is scaled (PEFT forgets the scaling, peft issue #3741). It pays the 4-bit error
      of the merged weight again. Layers without adapters keep their tensors byte for byte.
    - ``"refit"``: as ``"requantize"`` with per-block MSE-optimal scales (:func:`lora_ref.adapters.qlora.quantize_4bit_refit`).
    """
    import time

    import ml_dtypes
    import numpy as np

    from lora_ref.adapters.lora import lora_layers, set_adapter
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.adapters.qlora import Linear4bit, merge_4bit
    from lora_ref.errors import UsageError
    from lora_ref.files.outputs import check_out_dir, output_dir, require_dir, write_json
    from lora_ref.files.safetensors import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, CheckpointReader, SafetensorsWriter
    from lora_ref.merging import combine as M
    from lora_ref.modeling.llama import (
        CONFIG_FILE,
        Llama,
        LlamaConfig,
        copy_model_side_files,
        quantized_tensor_names,
        read_4bit_weight,
        read_quantization_config,
    )
    from lora_ref.modeling.nn import Linear, placeholders
    from lora_ref.quant.blockwise import dequantize_4bit
    from lora_ref.quant.serialize import state_to_tensors

    t0 = time.perf_counter()
    adapters = [str(a) for a in adapters]
    if quantized not in STRATEGIES:
        raise ValueError(f"unknown 4-bit merge {quantized!r}; expected one of {', '.join(STRATEGIES)}")
    check_out_dir(out)  # fail before any work
    base_dir = require_dir(base, "base checkpoint folder")
    for a in adapters:
        require_dir(a, "adapter folder")
    config = LlamaConfig.from_json_file(base_dir / CONFIG_FILE)
    qconfig = read_quantization_config(base_dir / CONFIG_FILE)
    four_bit_out = quantized != "float"
    if four_bit_out and qconfig is None:
        raise UsageError(f"--quantized {quantized} needs a 4-bit base, but {base_dir} is a floating-point checkpoint")
    if four_bit_out and dtype is not None:
        raise UsageError(f"--dtype applies to a floating-point output, not to --quantized {quantized}")
    combine = len(adapters) > 1 or weights is not None

    with placeholders():
        model = Llama(config)
    names = model.checkpoint_names()  # before LoRA layers rename anything
    modules = dict(model.named_modules())
    with CheckpointReader(base_dir) as reader:
        # which weights the file stores in 4 bits, and every tensor that belongs to them
        marker = ".quant_state.bitsandbytes__"
        q_weights = sorted({k.split(marker)[0] for k in reader.names() if marker in k}) if qconfig else []
        consumed: set[str] = set()
        for w in q_weights:
            m = modules.get(w.removesuffix(".weight"))
            if not w.endswith(".weight") or not isinstance(m, Linear) or w not in names:
                raise ValueError(f"4-bit tensor {w!r} in {reader.source(w)} is not the weight of a linear layer of "
                                 f"this model")
            consumed.update(quantized_tensor_names(reader, w))
        if qconfig is not None and not q_weights:
            raise ValueError(f"config.json in {base_dir} has a 4-bit quantization_config, but no tensor has a "
                             "'.quant_state.bitsandbytes__nf4|fp4' companion")
        model._check_checkpoint_names(reader, consumed)
        base_dtype = checkpoint_dtype(base_dir)
        out_dtype = dtype or base_dtype
        if not four_bit_out and out_dtype not in _DTYPES:
            raise UsageError(f"the base checkpoint is stored in {base_dtype}; choose --dtype float32 or bfloat16")
        np_dtype = np.float32 if out_dtype == "float32" else ml_dtypes.bfloat16
        bf16_merge = base_dtype == "bfloat16" and out_dtype == "bfloat16" and qconfig is None

        # the small tensors (norms, biases) for real now: adapters with bias="all" / "lora_only" overwrite biases
        params = dict(model._unique_parameters())
        for name, p in params.items():
            if p.ndim == 1:
                p.data = reader.read(name, out=np.empty(p.shape, np.float32))
        if bf16_merge:  # as lora.as_bfloat16: merges round once to bfloat16, as PEFT's merge into a bfloat16 weight
            for m in modules.values():
                if isinstance(m, Linear):
                    m.weight_dtype = np.dtype(ml_dtypes.bfloat16)

        adapter_names = [f"adapter{i}" for i in range(len(adapters))]
        for name, folder in zip(adapter_names, adapters):
            load_adapter(model, folder, name)
        if combine:
            try:
                M.add_weighted_adapter(model, adapter_names, weights or [1.0] * len(adapter_names), "merged",
                                       combination_type=combination, svd_rank=svd_rank, density=density,
                                       rng=np.random.default_rng(seed))
            except ValueError as e:
                raise ValueError(f"the adapters cannot be combined with --combination {combination}: {e}") from None
            active = "merged"
        else:
            active = adapter_names[0]
        set_adapter(model, active)
        layers = {n: layer for n, layer in lora_layers(model) if active in layer.lora_A}
        for n in layers:
            if f"{n}.weight" not in names:
                raise ValueError(f"the adapter targets {n}, whose weight config.json ties to the embedding; "
                                 "untie it (tie_word_embeddings: false) to merge into it")

        # the output files: the base's shard layout, or one model.safetensors
        shard_of = {n: (reader.shard_of(n) if reader.sharded else WEIGHTS_FILE) for n in names}
        for w in q_weights:
            for k in quantized_tensor_names(reader, w):
                shard_of[k] = shard_of[w]
        weight_map: dict[str, str] = {}
        sizes: dict[str, int] = {}
        out_config = model.config.to_dict()
        out_config["dtype"] = base_dtype if four_bit_out else out_dtype
        if four_bit_out:
            out_config["quantization_config"] = dict(qconfig)

        def put(key, arr):
            a = np.ascontiguousarray(arr)
            if a.dtype.kind == "f" or a.dtype == np.dtype(ml_dtypes.bfloat16):
                if not np.all(np.isfinite(a.astype(np.float32, copy=False))):
                    raise ValueError(f"the merged tensor {key} holds NaN or inf; nothing was written")
            writers[shard_of[key]].add(key, a)
            weight_map[key] = shard_of[key]
            sizes[shard_of[key]] = sizes.get(shard_of[key], 0) + a.nbytes

        def as_out(key, a):
            """A float tensor in the output dtype (a 4-bit output keeps the base's float tensors' dtypes)."""
            if four_bit_out:
                return a.astype(reader.dtype(key), copy=False)
            return a.astype(np.float32, copy=False).astype(np_dtype, copy=False)

        with output_dir(out) as tmp:
            writers = {f: SafetensorsWriter(tmp / f, {"format": "pt"}) for f in sorted(set(shard_of.values()))}
            try:
                iterator = names
                if progress is not None:  # started once the output folder exists: an error there stays one line
                    from tqdm import tqdm

                    iterator = tqdm(names, desc="merge", unit="tensor", file=progress, leave=False)
                for name in iterator:
                    mname, _, leaf = name.rpartition(".")
                    layer = layers.get(mname)
                    has_bias = f"{mname}.bias" in params
                    if leaf == "bias" and (layer is not None or f"{mname}.weight" in q_weights):
                        continue  # written with its weight (a merge may change it)
                    if name in q_weights:  # a 4-bit weight, adapted or not
                        packed, state = read_4bit_weight(reader, name)
                        holder = layer.base_layer if layer is not None else modules[mname]
                        bias = None if holder.bias is None else holder.bias.data
                        new = Linear4bit.from_quantized(packed, state, bias, rounding=rounding)
                        if layer is not None:
                            placeholder = layer.base_layer
                            layer.base_layer = new
                            try:
                                new = merge_4bit(layer, quantized, [active])
                            finally:
                                layer.base_layer = placeholder
                        if four_bit_out and layer is None:  # untouched: the file's own tensors, byte for byte
                            for k in quantized_tensor_names(reader, name):
                                put(k, reader.read(k))
                        elif four_bit_out:
                            for k, v in state_to_tensors(name, new.weight.data, new.quant_state).items():
                                put(k, v)
                        else:
                            w = new.weight.data if isinstance(new, Linear) else \
                                np.asarray(dequantize_4bit(packed, state), dtype=np.float32)
                            put(name, w.astype(np_dtype))
                        if has_bias:
                            put(f"{mname}.bias", as_out(f"{mname}.bias", new.bias.data))
                        del packed, state, new
                    elif layer is not None and leaf == "weight":
                        w_param = layer.base_layer.weight
                        placeholder = w_param.data
                        w_param.data = reader.read(name, out=np.empty(placeholder.shape, np.float32))
                        try:
                            layer.merge(adapter_names=[active])
                            put(name, w_param.data.astype(np_dtype, copy=False))
                            if has_bias:
                                put(f"{mname}.bias", layer.bias.data.astype(np_dtype))
                        finally:
                            w_param.data = placeholder  # the merged array is freed; the skeleton stays
                            layer.merged_adapters.clear()
                    elif params[name].ndim == 1:
                        put(name, as_out(name, params[name].data))
                    else:
                        put(name, as_out(name, reader.read(name)))
                for w in writers.values():
                    w.close()
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            if reader.sharded:
                write_json(tmp / WEIGHTS_INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())},
                                                      "weight_map": dict(sorted(weight_map.items()))})
            write_json(tmp / "config.json", out_config)
            copy_model_side_files(base_dir, tmp)

    return {
        "out": str(out), "base": str(base), "adapters": adapters, "weights": weights,
        "combination": combination if combine else None,
        "dtype": base_dtype if four_bit_out else out_dtype, "base_dtype": base_dtype,
        "base_4bit": qconfig is not None, "quantized": quantized if qconfig is not None else None,
        "merged_layers": len(layers), "tensors": len(weight_map), "shards": len(writers),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run(args) -> int:
    import json
    import sys

    from lora_ref.errors import UsageError
    from lora_ref.merging import combine as M

    if getattr(args, "report", None) or getattr(args, "report_original", None):
        from lora_ref.adapters.merge_report import run_report

        return run_report(args)
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
    if args.quantized != "float" and args.dtype is not None:
        raise UsageError(f"--dtype applies to a floating-point output, not to --quantized {args.quantized}")

    from lora_ref.files.models import model_arg
    from lora_ref.files.outputs import check_out_dir

    check_out_dir(args.out)  # refuse before a known model is fetched
    args.base = model_arg(args.base)  # a known model name (lora-ref models) is fetched on first use
    doc = merge_checkpoint(args.base, adapters, args.out, weights=weights, combination=ct, density=args.density,
                           svd_rank=args.svd_rank, seed=args.seed, dtype=args.dtype, quantized=args.quantized,
                           rounding=args.rounding, progress=sys.stderr if not args.json else None)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        how = f"{len(adapters)} adapters combined with {ct}" if combine else "1 adapter"
        if doc["quantized"] in ("requantize", "refit"):
            what = f"4-bit checkpoint ({doc['quantized']})"
        else:
            what = f"{doc['dtype']} checkpoint" + (" (into the dequantized 4-bit base)" if doc["base_4bit"] else "")
        sys.stdout.write(f"merged {how} into {doc['merged_layers']} layers of {args.base}; wrote {what} "
                         f"{args.out}\n")
    return 0
