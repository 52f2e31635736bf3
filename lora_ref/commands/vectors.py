"""``lora-ref vectors --out DIR``: write the reference vectors (see lora_ref/reference/vectors.py)."""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  lora-ref vectors --out vectors/
  lora-ref check vectors/ my_results.safetensors

The folder must not exist or be empty. The output is byte-identical from run to run; tests/vectors/ in the
repository holds the published set."""


def add_arguments(p):
    p.add_argument("--out", required=True, help="new (or empty) folder to write")
    p.add_argument("--json", action="store_true", help="print the list of cases as one JSON document")


def run(args) -> int:
    import json

    from lora_ref.files.outputs import check_out_dir
    from lora_ref.reference.vectors import write_vectors

    check_out_dir(args.out)
    print(f"writing reference vectors to {args.out} ...", file=sys.stderr)
    cases = write_vectors(args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "cases": [c.manifest_entry() for c in cases]}, indent=1))
    else:
        ops = sorted({c.op for c in cases})
        print(f"wrote {len(cases)} cases over {len(ops)} ops to {args.out}: {', '.join(ops)}")
    return 0
