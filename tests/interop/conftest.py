"""Every test in this folder compares lora_ref with torch, transformers, PEFT or bitsandbytes (the interop extra)."""

import os

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.interop)
