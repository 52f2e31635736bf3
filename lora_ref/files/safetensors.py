"""Safetensors files read and written by hand, every dtype kept (bfloat16 through ml_dtypes).

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw tensor bytes
(little-endian, C order) with offsets relative to the end of the header. The ``safetensors`` package's NumPy API
cannot read bfloat16, and every reader here must name the file when it is damaged, so lora_ref keeps its own.
Used by the checkpoint I/O of :mod:`lora_ref.modeling.llama`, :mod:`lora_ref.adapters.peft_files` and :mod:`lora_ref.quant.serialize`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors_raw", "write_safetensors", "ST_TO_NP", "NP_TO_ST"]

ST_TO_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "U8": np.dtype("u1"), "I8": np.dtype("i1"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "BOOL": np.dtype("?"),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}


def read_safetensors_raw(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a ``.safetensors`` file keeping each tensor's dtype (F32, F16, BF16, U8, …). Returns (tensors, metadata).

    Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
    "data_offsets"}, "__metadata__": {…}}``, then the raw little-endian C-order bytes. ``ValueError`` naming the file
    for anything inconsistent.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file not found: {p}")
    buf = p.read_bytes()
    if len(buf) < 8:
        raise ValueError(f"corrupt safetensors file (too short for a header): {p}")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError(f"corrupt safetensors file (header length {n} exceeds the file size): {p}")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"corrupt safetensors file (header is not JSON): {p}") from None
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file (header is not a JSON object): {p}")
    data = memoryview(buf)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            st, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"corrupt safetensors file (bad entry for tensor {name!r}): {p}") from None
        if st not in ST_TO_NP:
            raise ValueError(f"tensor {name!r} in {p} has unsupported dtype {st}")
        dt = ST_TO_NP[st]
        if not (0 <= begin <= end <= len(data)) or end - begin != math.prod(shape) * dt.itemsize:
            raise ValueError(f"corrupt safetensors file (tensor {name!r} does not fit its byte range): {p}")
        out[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).copy()
    return out, dict(header.get("__metadata__") or {})


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write ``tensors`` (names sorted, dtypes kept) as a safetensors file, via an atomic rename.

    Metadata defaults to ``{"format": "pt"}``, which transformers expects.
    """
    from lora_ref.files.outputs import atomic_write

    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NP_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors here")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # pad the header to 8 bytes with spaces, as the reference writer does
    atomic_write(path, struct.pack("<Q", len(hbytes)) + hbytes + b"".join(chunks))
