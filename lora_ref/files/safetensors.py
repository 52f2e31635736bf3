"""Safetensors files read and written by hand, every dtype kept (bfloat16 through ml_dtypes).

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw tensor bytes
(little-endian, C order) with offsets relative to the end of the header. The ``safetensors`` package's NumPy API
cannot read bfloat16, and every reader here must name the file when it is damaged, so lora_ref keeps its own.
Used by the checkpoint I/O of :mod:`lora_ref.modeling.llama`, :mod:`lora_ref.adapters.peft_files` and :mod:`lora_ref.quant.serialize`.

Memory-lean I/O: a checkpoint can be larger than the memory one wants to spend on it, so besides the whole-file
:func:`read_safetensors_raw` / :func:`write_safetensors` there are the streaming forms used by ``lora-ref merge``,
``lora-ref quantize`` and :meth:`lora_ref.modeling.llama.Llama.from_pretrained`:

- :class:`SafetensorsFile` parses only the header and reads one tensor at a time (``seek`` + ``readinto`` straight
  into the destination array: no copy of the file in memory);
- :class:`CheckpointReader` does the same over an HF folder (``model.safetensors`` or the shards listed in
  ``model.safetensors.index.json``);
- :class:`SafetensorsWriter` takes tensors one at a time, in any order, and writes the same bytes as
  :func:`write_safetensors` would for the whole dict. The header (which comes first in the file) is only known
  once every tensor is in, so the tensor bytes go to a temporary file beside the output and are copied behind the
  header at the end through one buffer of :data:`COPY_CHUNK` bytes: the memory used is one tensor, never the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors_raw", "write_safetensors", "ST_TO_NP", "NP_TO_ST", "read_safetensors_header",
           "SafetensorsFile", "SafetensorsWriter", "CheckpointReader", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE",
           "COPY_CHUNK"]

ST_TO_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "U8": np.dtype("u1"), "I8": np.dtype("i1"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "BOOL": np.dtype("?"),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
_DATA_ORDER = {d: i for i, d in enumerate(("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8",
                                           "U8", "BOOL"))}
"""The order tensors' data (and header entries) are written in: by dtype as the ``safetensors`` package orders them
(its ``Dtype`` enum, largest first, which also keeps every tensor aligned to its element size), then by name. With it
our files are byte for byte what ``safetensors.numpy.save`` writes for the same dict
(``tests/files/test_safetensors_bytes.py``)."""


def _write_order(entries) -> list:
    """``(name, st_dtype, ...)`` tuples in the order the data is written (:data:`_DATA_ORDER`, then name)."""
    return sorted(entries, key=lambda e: (_DATA_ORDER[e[1]], e[0]))
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
COPY_CHUNK = 8 << 20
"""Bytes per read when :class:`SafetensorsWriter` copies tensor data behind the header (8 MiB, one reused buffer)."""


def read_safetensors_raw(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a ``.safetensors`` file keeping each tensor's dtype (F32, F16, BF16, U8, …). Returns (tensors, metadata).

    Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
    "data_offsets"}, "__metadata__": {…}}``, then the raw little-endian C-order bytes. ``ValueError`` naming the file
    for anything inconsistent. Each tensor is read straight into its own array (:class:`SafetensorsFile`), so the
    peak memory is the tensors themselves, not the file plus the tensors.
    """
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f.names()}, dict(f.metadata)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict,
                                                                int]:
    """Parse and check only the header of a ``.safetensors`` file.

    Returns ``({name: (dtype code, shape, begin, end)}, metadata, data_start)``: byte offsets relative to
    ``data_start`` (= 8 + header length), in the file's order. ``ValueError`` naming the file for a missing file, a
    header that is not a JSON object, an unknown dtype, or a tensor whose byte range does not fit its shape or lies
    beyond the end of the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file not found: {p}")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"corrupt safetensors file (too short for a header): {p}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"corrupt safetensors file (header length {n} exceeds the file size): {p}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"corrupt safetensors file (header is not JSON): {p}") from None
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file (header is not a JSON object): {p}")
    data_len = size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            st, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"corrupt safetensors file (bad entry for tensor {name!r}): {p}") from None
        if st not in ST_TO_NP:
            raise ValueError(f"tensor {name!r} in {p} has unsupported dtype {st}")
        if not (0 <= begin <= end <= data_len) or end - begin != math.prod(shape) * ST_TO_NP[st].itemsize:
            raise ValueError(f"corrupt safetensors file (tensor {name!r} does not fit its byte range): {p}")
        entries[name] = (st, shape, begin, end)
    return entries, dict(header.get("__metadata__") or {}), 8 + n


class SafetensorsFile:
    """One ``.safetensors`` file opened for reading tensor by tensor (the header is parsed and checked on open).

    ``names()`` lists the tensors (file order), ``shape(name)`` / ``dtype(name)`` / ``nbytes(name)`` describe one
    from the header alone, and ``read(name)`` reads it into a new array in its stored dtype — or, with ``out=``,
    into an existing C-contiguous array of that shape (converting the dtype if ``out`` has another one; without a
    conversion the bytes go straight from the file into ``out``). Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata, self._start = read_safetensors_header(self.path)
        self._fh = open(self.path, "rb")

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str):
        if name not in self.entries:
            raise ValueError(f"tensor {name!r} not found in {self.path}")
        return self.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return ST_TO_NP[self._entry(name)[0]]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entry(name)
        return end - begin

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        st, shape, begin, end = self._entry(name)
        dt = ST_TO_NP[st]
        native = dt.byteorder in ("=", "|") or dt.newbyteorder("=") == dt
        direct = out is not None and out.dtype == dt and native
        if out is not None:
            if tuple(out.shape) != shape:
                raise ValueError(f"tensor {name!r} in {self.path} has shape {shape}, the destination {out.shape}")
            if not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError("read(out=...) needs a writeable C-contiguous array")
        dest = out if direct else np.empty(shape, dtype=dt)
        self._fh.seek(self._start + begin)
        view = memoryview(dest.reshape(-1).view(np.uint8)) if dest.size else memoryview(b"")
        got = self._fh.readinto(view) if dest.size else 0
        if got != end - begin:
            raise ValueError(f"corrupt safetensors file (tensor {name!r} is cut short): {self.path}")
        if out is None or direct:
            return dest
        out[...] = dest  # dtype conversion (e.g. bfloat16 -> float32) into the caller's array
        return out


class CheckpointReader:
    """The tensors of an HF checkpoint folder, read one at a time: ``model.safetensors``, or else the shards listed
    in ``model.safetensors.index.json`` (``{"weight_map": {name: shard file}}``).

    ``names()``, ``shape(name)``, ``dtype(name)``, ``nbytes(name)``, ``source(name)`` (the file, for error messages)
    come from the headers; ``read(name, out=None)`` reads one tensor (see :meth:`SafetensorsFile.read`).
    ``shard_of(name)`` is the file name a tensor is stored in and ``sharded`` whether the folder is sharded.
    ``ValueError`` naming the file for a missing file, a corrupt index or a tensor the index places in a shard
    that does not hold it. Use as a context manager (closes the files).
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        self.folder = folder
        single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if single.is_file():
            self.sharded = False
            f = SafetensorsFile(single)
            self.files[WEIGHTS_FILE] = f
            self._where = {k: WEIGHTS_FILE for k in f.names()}
            return
        if not index.is_file():
            found = sorted(f.name for f in folder.iterdir()) if folder.is_dir() else []
            hint = " (pickle-based .bin checkpoints are not read; convert to safetensors)" \
                if any(f.endswith(".bin") for f in found) else ""
            raise ValueError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {folder}{hint}")
        self.sharded = True
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"corrupt index file (expected JSON with a weight_map of name → file): {index}") from None
        try:
            for fname in sorted(set(weight_map.values())):
                if Path(fname).name != fname or fname in (".", "..") or "\\" in fname:
                    raise ValueError(f"index file {index} names a shard outside its folder: {fname!r}")
                shard = folder / fname
                if not shard.is_file():
                    raise ValueError(f"shard listed in {index} not found: {shard}")
                self.files[fname] = SafetensorsFile(shard)
            for name, fname in weight_map.items():
                if name not in self.files[fname]:
                    raise ValueError(f"tensor {name!r} is listed in {index} under {fname} but not found there")
            for fname, f in self.files.items():  # tensors in a shard but not in the index are read as well
                for name in f.names():
                    self._where.setdefault(name, fname)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} not found in {self.folder}")
        return self.files[self._where[name]]

    def shard_of(self, name: str) -> str:
        self._file(name)
        return self._where[name]

    def source(self, name: str) -> str:
        return str(self._file(name).path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self._file(name).read(name, out)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write ``tensors`` (dtypes kept; the data in :data:`_DATA_ORDER`) as a safetensors file, via an atomic rename.

    Metadata defaults to ``{"format": "pt"}``, which transformers expects. :class:`SafetensorsWriter` writes the
    same bytes from tensors given one at a time.
    """
    from lora_ref.files.outputs import atomic_write

    entries = []
    for name in tensors:
        a = np.asarray(tensors[name], order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        if a.dtype not in NP_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors here")
        entries.append((name, NP_TO_ST[a.dtype], list(a.shape), a.nbytes, a))
    entries = _write_order(entries)
    chunks = [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for *_, a in entries]
    entries = [e[:4] for e in entries]
    atomic_write(path, _header_bytes(entries, metadata) + b"".join(chunks))

def _header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict | None) -> bytes:
    """The 8-byte length and the space-padded JSON header for ``(name, dtype code, shape, nbytes)`` in name order,
    exactly as :func:`write_safetensors` lays them out."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, st, shape, nbytes in entries:
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # pad the header to 8 bytes with spaces, as the reference writer does
    return struct.pack("<Q", len(hbytes)) + hbytes


class SafetensorsWriter:
    """Write a safetensors file from tensors given one at a time, in any order: byte for byte what
    :func:`write_safetensors` writes for the same dict (dtypes kept, data in :data:`_DATA_ORDER`, header padded to 8 bytes).

    ``add(name, array)`` appends the array's bytes to a temporary data file beside ``path`` and keeps only its
    name, dtype, shape and offset; ``close()`` writes the header to a second temporary file, copies every tensor's
    bytes behind it in name order in chunks of :data:`COPY_CHUNK`, and renames the result to ``path``. So the memory
    used is the tensor being added, whatever the file's size. The output appears complete or not at all: leaving the
    ``with`` block by an exception (or calling ``abort()``) removes the temporary files.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None):
        import tempfile

        from lora_ref.files.outputs import _umask

        self.path = Path(path)
        self.metadata = metadata
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, offset, nbytes)
        self._size = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.data-", dir=self.path.parent)
        self._data_path = Path(tmp)
        self._data = os.fdopen(fd, "w+b")
        self._umask = _umask()
        self.closed = False

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, _exc, _tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def nbytes(self) -> int:
        """Tensor bytes added so far (the file will be this plus the header)."""
        return self._size

    def add(self, name: str, array: np.ndarray) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if name in self._entries:
            raise ValueError(f"tensor {name!r} was already added to {self.path}")
        a = np.asarray(array)
        if a.dtype not in NP_TO_ST:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors here")
        le = np.asarray(a.astype(a.dtype.newbyteorder("<"), copy=False), order="C")
        self._data.write(memoryview(le.reshape(-1).view(np.uint8)) if le.size else b"")
        self._entries[name] = (NP_TO_ST[a.dtype], list(a.shape), self._size, le.nbytes)
        self._size += le.nbytes

    def close(self) -> Path:
        """Write the file (header, then the data in :data:`_DATA_ORDER`) and rename it into place; returns its path."""
        import tempfile

        if self.closed:
            return self.path
        names = [e[0] for e in _write_order([(n, e[0]) for n, e in self._entries.items()])]
        head = _header_bytes([(n, self._entries[n][0], self._entries[n][1], self._entries[n][3]) for n in names],
                             self.metadata)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        os.chmod(tmp, 0o666 & ~self._umask)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                self._data.flush()
                buf = memoryview(bytearray(min(COPY_CHUNK, max(self._size, 1))))  # one buffer, reused
                for n in names:
                    _, _, offset, nbytes = self._entries[n]
                    self._data.seek(offset)
                    left = nbytes
                    while left:
                        got = self._data.readinto(buf[:min(left, len(buf))])
                        if not got:
                            raise OSError(f"temporary data file {self._data_path} is shorter than expected")
                        out.write(buf[:got])
                        left -= got
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            self.abort()
            raise
        self._discard()
        return self.path

    def abort(self) -> None:
        """Drop everything: the temporary data file is removed and nothing is written at ``path``."""
        self._discard()

    def _discard(self) -> None:
        if not self._data.closed:
            self._data.close()
        self._data_path.unlink(missing_ok=True)
        self.closed = True
