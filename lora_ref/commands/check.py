"""``lora-ref check VECTORS RESULTS``: compare results with reference vectors (see lora_ref/reference/check.py)."""

from __future__ import annotations

EXAMPLES = """examples:
  lora-ref vectors --out vectors/
  lora-ref check vectors/ my_results.safetensors
  python vectors/check.py vectors/ my_results/      # the same checker, without lora_ref installed

RESULTS holds tensors named <case>/outputs/<name>, as in the vector files. One line per matched case:
PASS or FAIL, the case name, max abs and rel error, the tolerance. Exit 1 if any case fails or none matched."""


def add_arguments(p):
    p.add_argument("vectors", help="folder written by 'lora-ref vectors' (manifest.json + safetensors)")
    p.add_argument("results", help="a safetensors file, or a folder of them, with <case>/outputs/<name> tensors")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the lines")


def run(args) -> int:
    from lora_ref.reference.check import check

    rows = check(args.vectors, args.results)
    if not rows:
        raise ValueError("no case of the manifest has outputs in the results (keys must look like <case>/outputs/<name>)")
    failed = sum(not r.passed for r in rows)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps({"passed": len(rows) - failed, "failed": failed,
                          "cases": [asdict(r) for r in rows]}, indent=1))
        return 1 if failed else 0
    for r in rows:
        print(r.line())
    print(f"{len(rows) - failed} of {len(rows)} cases passed")
    return 1 if failed else 0
