"""lora_ref.heap: importing lora_ref keeps freed memory mapped (glibc's mallopt), so a fresh array lands on pages
already mapped: no page faults. Counted with getrusage's minor faults in fresh processes, with the setting on and with
``LORA_REF_KEEP_MEMORY=0``, with NumPy's huge-page hint off so that every page is a 4 KB page (fault counts do not
then depend on the host's transparent-huge-page setting)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lora_ref import heap

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)
import lora_ref
from lora_ref import heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

out = {"kept": heap.kept(), "settings": heap.settings()}
# above glibc's own largest mmap threshold (32 MiB): with its defaults such an array is a fresh mapping every time
big = np.ones((48 << 20) // 4, np.float32); del big
f0 = faults()
for _ in range(3):
    big = np.ones((48 << 20) // 4, np.float32); del big
out["big"] = (faults() - f0) / 3
# many 8 MB arrays freed at once leave 160 MB free at the top of the heap: trimmed unless the trim threshold is high
arrays = [np.ones((8 << 20) // 4, np.float32) for _ in range(20)]; del arrays
f0 = faults()
arrays = [np.ones((8 << 20) // 4, np.float32) for _ in range(20)]; del arrays
out["trimmed"] = faults() - f0
print(json.dumps(out))
"""


def _probe(keep: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k != "LORA_REF_KEEP_MEMORY" and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if keep is not None:
        env["LORA_REF_KEEP_MEMORY"] = keep
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_stays_mapped():
    on, off = _probe(None), _probe("0")
    assert off["kept"] is False and off["settings"] == {}
    # with glibc's defaults: a 48 MiB array maps 12,288 fresh pages each time; 160 MB trimmed and mapped again
    assert off["big"] > 10_000 and off["trimmed"] > 10_000, off
    if heap._libc() is None:  # not GNU libc: the module does nothing
        assert on["kept"] is False
        return
    assert on["kept"] is True and on["settings"]["trim_threshold"] == heap.TRIM_THRESHOLD
    assert on["trimmed"] < 100, on  # the heap kept its top
    if on["settings"]["mmap_threshold"] == heap.MMAP_THRESHOLD:
        assert on["big"] < 100, on  # the 48 MiB block came from the heap and was reused
    else:  # glibc before 2.35: 32 MiB at most, so 48 MiB arrays are still fresh mappings
        assert on["settings"]["mmap_threshold"] == heap.OLD_GLIBC_MMAP_THRESHOLD and on["big"] > 10_000, on
