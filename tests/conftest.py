"""Shared test settings: thread pools pinned, hypothesis profile without deadlines (jitted code compiles once)."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile(
    "lora_ref",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    derandomize=True,
)
settings.load_profile("lora_ref")
