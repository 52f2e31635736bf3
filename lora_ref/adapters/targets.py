"""The ``--targets`` flag, one syntax for every command: ``all-linear`` or comma-separated ``NAME`` / ``NAME=RANK``.

``q_proj,v_proj`` adapts the modules whose names end in ``q_proj`` or ``v_proj`` (PEFT's list rule);
``q_proj=16,v_proj`` gives ``q_proj`` rank 16 and ``v_proj`` the ``--r`` rank; ``all-linear`` is every linear layer
but the output head. ``lora-ref count`` reads it with :func:`lora_ref.analysis.counts.parse_targets`; ``lora-ref finetune``
turns it into a :class:`lora_ref.adapters.lora.LoraConfig` with :func:`lora_config_targets` (per-target ranks become PEFT's
``rank_pattern``, so the saved adapter carries them to PEFT).
"""

from __future__ import annotations

import argparse

ALL_LINEAR = "all-linear"
HELP = "comma-separated module names, NAME=RANK for a rank of its own, or all-linear"


def targets_arg(text: str) -> str:
    """argparse ``type=`` for ``--targets``: the flag normalized (``" q_proj , v_proj=4"`` → ``"q_proj,v_proj=4"``).

    Bad syntax (an empty list, a rank that is not a positive integer, a target given twice with two ranks,
    ``all-linear`` mixed with names) is an ``argparse.ArgumentTypeError``: exit status 2 with one line.
    """
    try:
        entries = parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if entries == ALL_LINEAR:
        return ALL_LINEAR
    return ",".join(n if r is None else f"{n}={r}" for n, r in entries.items())


def parse(text: str) -> str | dict[str, int | None]:
    """``"all-linear"``, or ``{name: rank or None}`` in the order given (``ValueError`` for bad syntax)."""
    if not isinstance(text, str):
        raise ValueError(f"targets must be a string, got {type(text).__name__}")
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("no LoRA targets given (e.g. q_proj,v_proj or all-linear)")
    if any(t.lower() == ALL_LINEAR for t in items):
        if len(items) > 1:
            raise ValueError("'all-linear' cannot be combined with other targets")
        return ALL_LINEAR
    out: dict[str, int | None] = {}
    for t in items:
        name, eq, rank = t.partition("=")
        name = name.strip()
        r = None
        if eq:
            try:
                r = int(rank)
            except ValueError:
                raise ValueError(f"target {t!r}: the rank after '=' must be an integer") from None
            if r < 1:
                raise ValueError(f"target {t!r}: the rank must be >= 1")
        if not name:
            raise ValueError(f"target {t!r} has no module name")
        if name in out and out[name] != r:
            raise ValueError(f"target {name!r} is given twice with different ranks")
        out[name] = r
    return out


def lora_config_targets(text: str) -> tuple[str | list[str], dict[str, int]]:
    """``(target_modules, rank_pattern)`` for :class:`lora_ref.adapters.lora.LoraConfig` from a ``--targets`` value."""
    entries = parse(text)
    if entries == ALL_LINEAR:
        return ALL_LINEAR, {}
    return list(entries), {n: r for n, r in entries.items() if r is not None}
