"""Property-test your own LoRA merge against lora_ref, with the strategies of ``lora_ref.testing``.

``my_merge`` stands for the code you want to check: it folds an adapter into a float32 weight, W + s·(B @ A),
with s = α/r, or α/√r for rsLoRA. ``adapters()`` draws adapters whose math is exercised (independent entries,
full-rank A and B with B ≠ 0, both sides ≥ 2, scales over orders of magnitude, rsLoRA on and off), and
``LoraAdapter.merged_weight()`` is lora_ref's merge, PEFT's rounding included. ``check_merge`` runs the property;
``my_buggy_merge`` is the same code with a planted bug (α/r used for rsLoRA too), which the property catches.

Usage: python property_test_my_merge.py
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings

from lora_ref.testing import adapters


def my_merge(W, A, B, lora_alpha, r, use_rslora):
    """W + s·(B @ A) in float32: the product first, then the scaling, as PEFT's get_delta_weight."""
    s = lora_alpha / (math.sqrt(r) if use_rslora else r)
    return W + (B @ A) * np.float32(s)


def my_buggy_merge(W, A, B, lora_alpha, r, use_rslora):
    """The planted bug: α/r whether or not the adapter uses rsLoRA."""
    return W + (B @ A) * np.float32(lora_alpha / r)


def check_merge(merge, max_examples=100) -> None:
    """Raise AssertionError (with hypothesis' smallest failing adapter) if ``merge`` differs from lora_ref's."""

    @settings(max_examples=max_examples, database=None, deadline=None)
    @given(adapters(dtype=np.float32, use_rslora=None))
    def merges_like_lora_ref(ad):
        got = merge(ad.W, ad.A, ad.B, ad.lora_alpha, ad.r, ad.use_rslora)
        np.testing.assert_array_equal(got, ad.merged_weight())

    merges_like_lora_ref()


if __name__ == "__main__":
    check_merge(my_merge)
    print("my_merge: equal to lora_ref's merge on every drawn adapter")
    try:
        check_merge(my_buggy_merge)
    except AssertionError as e:
        print("my_buggy_merge: caught")
        print("\n".join(getattr(e, "__notes__", [])))  # hypothesis' falsifying example
        print(str(e).strip().splitlines()[0])
