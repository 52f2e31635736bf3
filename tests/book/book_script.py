"""book/build.py imported as a module, for the book's tests (it is a script beside the book, not part of the package)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_module():
    """The module ``book/build.py``."""
    sys.path.insert(0, str(ROOT / "book"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "book"))
    return build
