"""The fast-path contract (lora_ref.kernels.switch), enumerated: every compiled kernel has a readable NumPy twin with
the same name and signature, is chosen by its module's one chooser, and has a twin test.

The pairs come from the choosers' tables (``switch.TWINS``), not from a list written here; the test fails when a
kernel module gains a public function that is neither a registered twin nor a declared helper, when a module
compiles Numba code without a chooser, and when a registered operation has no twin test below.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from lora_ref.kernels import switch

ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODULES = ("lora_ref.kernels.training", "lora_ref.kernels.matmul", "lora_ref.quant.kernels",
                  "lora_ref.kernels.decode", "lora_ref.kernels.lora_batch")
for _m in KERNEL_MODULES:
    importlib.import_module(_m)

# Modules with Numba code that are not kernels with twins: the intrinsics every kernel module builds on, and the
# chunked BLAS products, whose compiled hand-over makes the same BLAS calls as its Python pool (test_blas.py holds
# the two bit for bit, and both against np.matmul).
NUMBA_HELPER_MODULES = {"lora_ref.kernels.jit", "lora_ref.kernels.blas"}
# Public names of kernel modules that are not twins: constants, the chooser, and helpers of the kernels themselves.
NOT_TWINS = {
    "lora_ref.kernels.training": {"exp32", "pick", "PICK"},  # exp32: a scalar building block, tested against np.exp
    "lora_ref.kernels.matmul": {"MR", "NR", "KC", "VECTOR_FLOATS", "VECTOR_REGISTERS", "EXPLICIT_VECTORS", "matmul_reference",
                                "pack_a", "micro_kernel", "pick", "PICK"},
    "lora_ref.quant.kernels": {"pair_table", "decode_4bit_into", "AUTO_DEQUANTIZE_ROWS", "pick", "PICK"},
    "lora_ref.kernels.decode": {"weight_list", "readonly", "pick", "PICK"},
    "lora_ref.kernels.lora_batch": {"pick", "PICK"},
}
# operation -> the tests that hold its two twins equal (module under tests/kernels, test function names)
TWIN_TESTS = {
    "lora_ref.kernels.training": {
        "swiglu": ("test_fast_paths", ["test_swiglu_twins"]),
        "rms_norm": ("test_fast_paths", ["test_rms_norm_twins"]),
        "rotary": ("test_fast_paths", ["test_rotary_twins_and_gradient_layout"]),
        "attention_softmax": ("test_fast_paths", ["test_attention_twins"]),
        "cross_entropy": ("test_fast_paths", ["test_cross_entropy_twins"]),
        "embedding_grad": ("test_fast_paths", ["test_embedding_gradient_twins_bit_exact"]),
        "adamw_update": ("test_fast_paths", ["test_adamw_fused_update_equals_the_readable_update"]),
    },
    "lora_ref.kernels.matmul": {
        "matmul": ("test_kernels", ["test_matmul_equals_its_twin"]),
    },
    "lora_ref.quant.kernels": {
        "absmax_blocks": ("test_kernels", ["test_absmax_blocks"]),
        "encode_4bit": ("test_kernels", ["test_encode_4bit", "test_encode_4bit_threshold_probes",
                                        "test_encode_4bit_across_work_items",
                                        "test_encode_4bit_cpu_tail_block_divides"]),
        "pack_nibbles": ("test_kernels", ["test_pack_and_unpack_nibbles"]),
        "unpack_nibbles": ("test_kernels", ["test_pack_and_unpack_nibbles"]),
        "decode_4bit": ("test_kernels", ["test_decode_4bit"]),
        "encode_8bit": ("test_kernels", ["test_encode_and_decode_8bit"]),
        "decode_8bit": ("test_kernels", ["test_encode_and_decode_8bit"]),
        "matmul_4bit": ("test_kernels", ["test_matmul_4bit_equals_dequantize_then_matmul",
                                         "test_matmul_4bit_t_equals_dequantize_then_matmul"]),
    },
    "lora_ref.kernels.decode": {
        "layer_step": ("test_decode_kernels", ["test_layer_step_twins",
                                               "test_layer_step_at_position_zero_attends_to_itself_only"]),
        "head_step": ("test_decode_kernels", ["test_head_step_twins"]),
        "decode_step": ("test_decode_kernels", ["test_decode_step_twins"]),
    },
    "lora_ref.kernels.lora_batch": {
        "bgmv": ("test_lora_batch", ["test_bgmv_add_twins"]),
    },
}


def test_every_kernel_module_has_a_chooser():
    assert set(switch.TWINS) >= set(KERNEL_MODULES)
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        assert mod.PICK is switch.TWINS[name] and mod.pick == mod.PICK.pick


def _pairs():
    return [(mod, op, fn, ref) for mod in KERNEL_MODULES for op, fn, ref in switch.TWINS[mod].pairs()]


@pytest.mark.parametrize("mod, op, fn, ref", _pairs(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_pair_is_two_functions_with_one_signature(mod, op, fn, ref):
    fast = getattr(importlib.import_module(mod), fn)
    slow = getattr(ref, fn)
    assert fast is not slow and callable(fast) and callable(slow)
    assert inspect.signature(fast).parameters.keys() == inspect.signature(slow).parameters.keys(), (mod, fn)
    # the readable twin is NumPy: its module compiles nothing and imports neither Numba nor the kernels
    src = ast.parse(Path(inspect.getfile(ref)).read_text())
    imported = {a.name for n in ast.walk(src) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(src) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] in ("numba", "llvmlite") for m in imported), ref.__name__
    assert mod not in imported, ref.__name__


def test_every_public_kernel_function_is_a_registered_twin():
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        registered = {fn for _, fn, _ in switch.TWINS[mod].pairs()}
        public = set(m.__all__) - NOT_TWINS[mod]
        assert public == registered, (mod, public ^ registered)


def test_every_module_with_numba_code_is_a_kernel_module():
    found = set()
    for path in (ROOT / "lora_ref").rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.ImportFrom) and n.module == "numba" and any(a.name == "njit" for a in n.names)
               for n in ast.walk(tree)):
            found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert found == set(KERNEL_MODULES) | NUMBA_HELPER_MODULES


def test_kernels_never_build_graph_nodes():
    """Kernels take and return arrays: no kernel module imports the autograd."""
    for mod in KERNEL_MODULES + ("lora_ref.kernels.reference", "lora_ref.kernels.switch"):
        tree = ast.parse(Path(importlib.import_module(mod).__file__).read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                assert not n.module.startswith("lora_ref.autograd"), (mod, n.module)
                assert not (n.module == "lora_ref" and any(a.name == "autograd" for a in n.names)), mod


def test_every_operation_has_a_twin_test():
    assert set(TWIN_TESTS) == set(KERNEL_MODULES)
    for mod in KERNEL_MODULES:
        ops = set(switch.TWINS[mod].operations)
        assert set(TWIN_TESTS[mod]) == ops, (mod, ops ^ set(TWIN_TESTS[mod]))
        for op, (test_module, names) in TWIN_TESTS[mod].items():
            tree = ast.parse((Path(__file__).parent / f"{test_module}.py").read_text())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            for name in names:
                assert name in defined, f"{op}: no twin test {test_module}.{name}"


@pytest.mark.parametrize("impl", ["auto", "numpy", "numba"])
def test_the_override_routes_through_the_chooser(impl):
    import numpy as np

    from lora_ref.kernels import reference, training

    x = np.ones((2, 4), np.float32)
    want = {"numpy": reference, "numba": training}.get(impl)
    with switch.fast_paths():
        got = training.pick("swiglu", x, x, impl=impl)
        assert got is (want or training)
    with switch.readable():
        assert training.pick("swiglu", x, x, impl=impl) is (want or reference)
    assert training.pick("swiglu", x.astype(np.float64), x.astype(np.float64), impl=impl) is (want or reference)
    with pytest.raises(ValueError, match="unknown impl 'gpu'"):
        training.pick("swiglu", x, x, impl="gpu")
