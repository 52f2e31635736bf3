"""``lora-ref models``: the known pretrained models and whether they are cached."""

from __future__ import annotations

import json

EXAMPLES = """\
examples:
  lora-ref models
  lora-ref models --json

A known model name works wherever a command takes a model folder; it is fetched on first use (see
'lora-ref fetch'). With --json, stdout is one JSON document: {"cache_root": ..., "models": [{name, description,
license, requirement, cached, path}]}.
"""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run(args) -> int:
    from lora_ref.files.cache import cache_root
    from lora_ref.files.models import known_models

    rows = known_models()
    if args.json:
        print(json.dumps({"cache_root": str(cache_root()), "models": rows}, indent=2))
        return 0
    for r in rows:
        where = r["path"] if r["cached"] else "not cached (fetched on first use)"
        print(f"{r['name']}  [{r['license']}]  {where}")
        print(f"    {r['description']}; from pip {r['requirement']}")
    return 0
