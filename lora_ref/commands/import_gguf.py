"""``lora-ref import-gguf``: a Llama GGUF file (llama.cpp's format) as a Hugging Face checkpoint folder."""

from __future__ import annotations

import json
import sys

EXAMPLES = """\
examples:
  lora-ref import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
  lora-ref import-gguf model.gguf --out models/m --json

The output folder (missing or empty) gets config.json (LlamaForCausalLM), model.safetensors (float32),
generation_config.json, tokenizer.json, tokenizer_config.json (with the chat template) and
special_tokens_map.json; transformers and lora_ref load it like any HF checkpoint. Quantized tensors are
dequantized bit for bit as the gguf package does, and llama.cpp's row order of attn_q/attn_k is undone, so the
weights equal those of transformers' own GGUF loader. They are the dequantized GGUF values, not the original
weights the GGUF was made from. Only the llama architecture with byte-level BPE (gpt2) tokenizers is supported.
With --json, stdout is one JSON document: out, architecture, name, tensors, tensor_types.
"""


def add_arguments(p) -> None:
    p.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file to import")
    p.add_argument("--out", required=True, help="output folder (must be missing or empty)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run(args) -> int:
    from lora_ref.files.gguf import describe, import_gguf
    from lora_ref.files.outputs import check_out_dir

    check_out_dir(args.out)
    info = describe(args.gguf)
    bars = []  # the bar starts with the first decoded tensor, so checks that fail print only their error line

    def tick(done, total, name):
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="tensor", desc="import", file=sys.stderr, leave=False))
        bars[0].update(1)

    try:
        import_gguf(args.gguf, args.out, progress=None if args.json else tick)
    finally:
        for bar in bars:
            bar.close()
    result = {"out": str(args.out), **info}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        types = ", ".join(f"{k} {v}" for k, v in sorted(info["tensor_types"].items()))
        print(f"imported {info['name'] or args.gguf} ({info['architecture']}, {info['tensors']} tensors: {types})")
        print(f"wrote {args.out}")
    return 0
