"""The book's worked example of property-testing your own merge (book/examples/property_test_my_merge.py) runs as
the page says: the correct merge passes, the planted bug (α/r for rsLoRA) is caught, and hypothesis shrinks it to
an rsLoRA adapter with r = 2 (with r = 1 the two scalings agree)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("property_test_my_merge",
                                                  ROOT / "book" / "examples" / "property_test_my_merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_correct_merge_passes_and_the_planted_bug_is_caught():
    ex = _example()
    ex.check_merge(ex.my_merge)
    seen = []

    def recording(W, A, B, lora_alpha, r, use_rslora):
        seen.append((r, use_rslora))
        return ex.my_buggy_merge(W, A, B, lora_alpha, r, use_rslora)

    with pytest.raises(AssertionError):
        ex.check_merge(recording)
    r, use_rslora = seen[-1]  # hypothesis replays the shrunk failing example last
    assert use_rslora and r == 2


def test_the_page_shows_the_example():
    page = (ROOT / "book" / "check_your_implementation.md").read_text()
    assert "examples/property_test_my_merge.py" in page and "lora_ref.testing" in page
