"""QUICK mode: every chapter of the book in a couple of minutes on a cold 2-core machine.

``make book QUICK=1`` (or ``LORA_REF_QUICK=1`` in the environment of a notebook, a test or ``lora-ref``) asks the
chapters for their small configuration: fewer training steps, fewer seeds, smaller sweeps. A chapter reads the mode
with :func:`quick` and chooses a setting with :func:`pick`; where the smaller run weakens an assertion, the chapter's
text says why next to it. A quick run caches under its own key (its configuration differs), so it never stands in
for a full one.
"""

from __future__ import annotations

import os

ENV = "LORA_REF_QUICK"
_TRUE = {"1", "true", "yes", "on"}


def quick() -> bool:
    """True when ``$LORA_REF_QUICK`` is set to 1/true/yes/on (case-insensitive)."""
    return os.environ.get(ENV, "").strip().lower() in _TRUE


def pick(full, quick_value):
    """``quick_value`` in QUICK mode, else ``full``: ``steps = pick(2000, 200)``."""
    return quick_value if quick() else full
