"""Shared test settings: thread pools pinned, hypothesis profile without deadlines (jitted code compiles once).

Every health check is on. ``too_slow`` and ``data_too_large`` used to be suppressed, for ``hypothesis.extra.numpy``
arrays drawn element by element; the strategies now draw one seed per array (``lora_ref.testing``), so neither
fires and neither is needed. ``derandomize`` makes every run draw the same examples (so the planted-bug table in
``tests/mutations/`` is reproducible), and with no example database a run does not depend on earlier runs;
``deadline=None`` because the first call of a Numba kernel compiles it.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile(
    "lora_ref",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    derandomize=True,
    database=None,
)
settings.load_profile("lora_ref")
