"""The one safetensors writer writes what the safetensors package writes, byte for byte (so adapters, checkpoints and
the reference vectors keep their bytes whichever writer made them), whole or streamed tensor by tensor."""

import ml_dtypes
import numpy as np
import safetensors.numpy

from lora_ref.files.safetensors import SafetensorsWriter, read_safetensors_raw, write_safetensors


def _mixed(rng):
    return {"w.f32": rng.normal(size=(3, 5)).astype(np.float32), "codes": rng.integers(0, 255, 7, dtype=np.uint8),
            "ids": rng.integers(-9, 9, 4, dtype=np.int64), "half": rng.normal(size=3).astype(np.float16),
            "bf": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16), "d": rng.normal(size=2),
            "i8": rng.integers(-9, 9, 5, dtype=np.int8), "i32": rng.integers(-9, 9, 3, dtype=np.int32),
            "flag": np.array([True, False]), "a.scalar": np.array(2.5, dtype=np.float32)}


def test_whole_and_streamed_files_equal_the_package(tmp_path):
    tensors = _mixed(np.random.default_rng(0))
    # the package's NumPy API has no bfloat16: compare the other nine dtypes (bfloat16's place in the order: next test)
    tensors_no_bf = {k: v for k, v in tensors.items() if k != "bf"}
    expected = safetensors.numpy.save(tensors_no_bf, metadata={"format": "pt"})
    write_safetensors(tmp_path / "whole.safetensors", tensors_no_bf)
    assert (tmp_path / "whole.safetensors").read_bytes() == expected
    with SafetensorsWriter(tmp_path / "streamed.safetensors") as w:
        for name in reversed(list(tensors_no_bf)):  # any order in, the same bytes out
            w.add(name, tensors_no_bf[name])
    assert (tmp_path / "streamed.safetensors").read_bytes() == expected


def test_bfloat16_round_trips_and_every_tensor_is_aligned(tmp_path):
    tensors = _mixed(np.random.default_rng(1))
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back, meta = read_safetensors_raw(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == v.tobytes(), k
    import json

    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    for k, e in header.items():
        assert e["data_offsets"][0] % np.asarray(tensors[k]).dtype.itemsize == 0, k  # aligned, as the package keeps it
