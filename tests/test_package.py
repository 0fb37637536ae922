"""Packaging: one distribution, one import namespace, the interpreter switch, from the repo root and from elsewhere."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, json, os, sys
import qlora, qlora.kernels, qlora.reference
import qlora.kernels.quantize, qlora.reference.quantize
print(json.dumps({
    "qlora": qlora.__file__, "kernels": qlora.kernels.__file__, "reference": qlora.reference.__file__,
    "top_level_kernels": getattr(importlib.util.find_spec("kernels"), "origin", None),
    "top_level_reference": getattr(importlib.util.find_spec("reference"), "origin", None),
    "interpreter": qlora.interpreter_active(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
}))
"""


def _probe(cwd: Path, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("QLORA_INTERPRET", "TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_namespace_maps_kernels_and_reference_onto_the_top_level_folders(where, tmp_path):
    found = _probe(REPO if where == "repo root" else tmp_path)
    assert Path(found["qlora"]).parent == REPO / "qlora"
    assert Path(found["kernels"]).parent == REPO / "kernels"
    assert Path(found["reference"]).parent == REPO / "reference"
    if where == "elsewhere":
        # Nothing generic is installed: `kernels` and `reference` of this repo exist only under `qlora`. (A top-level
        # `kernels` may still be found: the Hugging Face Hub package, which transformers >= 5 depends on.)
        for name in ("top_level_kernels", "top_level_reference"):
            assert found[name] is None or Path(found[name]).resolve().parent not in (REPO / "kernels",
                                                                                    REPO / "reference"), found[name]


def test_interpreter_switch(tmp_path):
    import torch

    default = _probe(tmp_path)
    assert default["interpreter"] is (not torch.cuda.is_available())
    assert default["TRITON_INTERPRET"] == ("1" if default["interpreter"] else "0")
    forced = _probe(tmp_path, QLORA_INTERPRET="1", TRITON_INTERPRET="0")  # QLORA_INTERPRET wins
    assert forced["interpreter"] and forced["TRITON_INTERPRET"] == "1"
    explicit = _probe(tmp_path, TRITON_INTERPRET="1")
    assert explicit["interpreter"]


def test_reference_imports_neither_torch_nor_triton(tmp_path):
    code = ("import sys, importlib.util, pathlib; "
            f"sys.path.insert(0, {str(REPO)!r}); "
            # Load the oracle package as a plain package, without qlora (which imports torch).
            "spec = importlib.util.spec_from_file_location('oracle', "
            f"{str(REPO / 'reference' / '__init__.py')!r}, submodule_search_locations=[{str(REPO / 'reference')!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['oracle'] = m; spec.loader.exec_module(m); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'triton')); "
            "print(bad); assert not bad, bad; assert len(m.__all__) == 12")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pyproject_declares_one_distribution_and_its_dependencies():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"])
    for name in ("torch", "triton", "numpy", "scipy"):
        assert name in deps, name
    test_extra = " ".join(meta["project"]["optional-dependencies"]["test"])
    for name in ("hypothesis", "pytest", "pytest-benchmark"):
        assert name in test_extra, name
    assert meta["project"]["requires-python"].startswith(">=3.10")
    package_dir = meta["tool"]["setuptools"]["package-dir"]
    assert package_dir["qlora.kernels"] == "kernels" and package_dir["qlora.reference"] == "reference"


# Work that reaches every kind of Triton library call the kernels make (tl.max/tl.sum reductions, tl.cdiv, tl.rand for
# dropout, the 8-bit optimizer's blockwise absmax), printed as hex digests so that runs compare bit for bit.
_WORK = """
import hashlib, json, os, sys
import torch
import qlora
import triton.language as tl

def digest(*ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

torch.manual_seed(0)
w = torch.randn(32, 64)
q = qlora.quantize_nf4(w)
layer = qlora.QLoRALinear(q, r=4, lora_alpha=8, lora_dropout=0.25)
torch.nn.init.normal_(layer.lora_B)
x = torch.randn(3, 64, requires_grad=True)
y = layer(x)
y.square().sum().backward()
p = torch.nn.Parameter(torch.randn(4096))
p.grad = torch.randn(4096)
qlora.AdamW8bit([p], lr=1e-2).step()
print(json.dumps({
    "interpreter": qlora.interpreter_active(), "kernels_interpreter": qlora.kernels.interpreter_active(),
    "tl.max": type(tl.max).__name__, "tensor.max": type(tl.tensor.max).__name__,
    "nf4": digest(q.packed, q.absmax, q.absmax2, q.dequantize()), "forward": digest(y),
    "backward": digest(x.grad, layer.lora_A.grad, layer.lora_B.grad), "adamw8bit": digest(p),
}))
"""

# What a trainer may import before qlora: Triton itself, torch.compile's Inductor (imports Triton), a framework that
# sets Triton's switch through its Python API, and the libraries that import Triton when they are installed.
_IMPORTED_FIRST = {
    "qlora first": "",
    "triton first": "import triton",
    "torch._inductor first": "import torch._inductor",
    "triton knob set off in Python first": "import triton; triton.knobs.runtime.interpret = False",
    "bitsandbytes first": "import bitsandbytes",
    "peft first": "import peft",
}


def _run_work(prefix: str, cwd: Path, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("QLORA_INTERPRET", "TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", prefix + "\n" + _WORK], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qlora_first_work(tmp_path_factory):
    return _run_work("", tmp_path_factory.mktemp("work"), QLORA_INTERPRET="1")


@pytest.mark.parametrize("first", [k for k in _IMPORTED_FIRST if k != "qlora first"])
def test_import_order_does_not_change_the_results(first, qlora_first_work, tmp_path):
    """Regression: with Triton imported before qlora (Triton decorates its own tl.max/tl.sum/... then), every
    interpreted kernel failed with "Cannot call @triton.jit'd outside of the scope of a kernel"."""
    module = _IMPORTED_FIRST[first].split(";")[0].split()[-1]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not installed")
    got = _run_work(_IMPORTED_FIRST[first], tmp_path, QLORA_INTERPRET="1")
    assert qlora_first_work["interpreter"] and qlora_first_work["kernels_interpreter"]
    # Triton's own layout under the interpreter: an InterpretedFunction, and a plain forwarding method on tl.tensor.
    assert (qlora_first_work["tl.max"], qlora_first_work["tensor.max"]) == ("InterpretedFunction", "function")
    assert got == qlora_first_work


def test_triton_library_follows_a_compiled_choice_after_an_interpreted_import(tmp_path):
    """The other direction: Triton imported under TRITON_INTERPRET=1, then QLORA_INTERPRET=0 chooses compiled
    kernels; Triton's library functions must then be JITFunctions again (a compiled kernel inlines them)."""
    code = ("import os, json; os.environ['TRITON_INTERPRET'] = '1'; import triton, triton.language as tl; "
            "before = type(tl.sum).__name__; os.environ['QLORA_INTERPRET'] = '0'; import qlora; "
            "import qlora.kernels.quantize as kq; "
            "print(json.dumps([before, type(tl.sum).__name__, type(tl.tensor.sum).__name__, "
            "type(kq.unpack_4bit).__name__, "
            "qlora.interpreter_active(), qlora.kernels.interpreter_active()]))")
    clean = {k: v for k, v in os.environ.items() if k not in ("QLORA_INTERPRET", "TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "InterpretedFunction", "JITFunction", "JITFunction", "JITFunction", False, False]


def test_interpreter_choice_is_decided_once(monkeypatch):
    """interpreter_active() is asked on every launch: it must not re-read (or follow) the environment afterwards."""
    import qlora
    import qlora.kernels

    before = (qlora.interpreter_active(), qlora.kernels.interpreter_active())
    assert before[0] == before[1]
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before[0] else "1")
    monkeypatch.setenv("QLORA_INTERPRET", "0" if before[0] else "1")
    assert (qlora.interpreter_active(), qlora.kernels.interpreter_active()) == before


def _launched_kernels():
    """Every ``*_kernel`` JIT function of the kernel modules: the objects the launchers call ``[grid](...)`` on."""
    import importlib

    found = {}
    for name in ("codebook", "linear", "lora", "optim", "quantize"):
        module = importlib.import_module(f"qlora.kernels.{name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "run") and hasattr(value, "fn"):
                found[f"{name}.{attr}"] = value
    return found


def test_every_kernel_launches_lean_under_the_interpreter():
    """Under the interpreter each launched kernel goes through ``lean_under_interpreter`` (a kernel added
    without it would pay the sanitizer's dead int64 recomputations on every integer add and multiply)."""
    import qlora.kernels

    kernels = _launched_kernels()
    assert len(kernels) >= 17, sorted(kernels)
    if not qlora.kernels.interpreter_active():
        pytest.skip("compiled kernels: the wrapper applies under the interpreter only")
    unwrapped = [name for name, k in kernels.items()
                 if getattr(vars(k).get("run"), "__name__", None) != "run_lean"]
    assert not unwrapped


def test_overflow_sanitizer_is_off_during_a_launch_and_restored_after():
    """The sanitizer's checks are computed and dropped unless the interpreter's options.debug is set: the wrapper
    turns it off for the launch only, and leaves it on when debug is on (where its asserts are real)."""
    import dataclasses

    import torch
    import triton
    import triton.language as tl

    import qlora.kernels
    from qlora.kernels._runtime import lean_under_interpreter

    if not qlora.kernels.interpreter_active():
        pytest.skip("the interpreter's options only exist under the interpreter")
    from triton.runtime import interpreter

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    kernel = lean_under_interpreter(add_one)
    seen = []
    kernel.add_pre_run_hook(lambda *args, **kwargs: seen.append(interpreter.interpreter_builder.options.sanitize_overflow))
    builder = interpreter.interpreter_builder
    original = builder.options
    x = torch.zeros(5, dtype=torch.int32)
    kernel[(1,)](x, 5, BLOCK=8)
    assert seen == [False] and builder.options is original and original.sanitize_overflow
    assert x.tolist() == [1] * 5
    builder.options = dataclasses.replace(original, debug=True)
    try:
        kernel[(1,)](x, 5, BLOCK=8)
    finally:
        debug_options, builder.options = builder.options, original
    assert seen == [False, True] and debug_options.debug
    assert x.tolist() == [2] * 5


def test_fast_numpy_paths_compute_what_the_interpreter_computes_and_only_during_a_launch():
    """The gather, mask-``&``, masked load / store and dot replacements give the builder's own results (values,
    dtype, shape; for stores, the memory written) on every case they take and hand the others to the builder's own
    methods; they are installed for the launch only, and a method already replaced on the builder by someone else
    is left as it is."""
    import numpy as np
    import torch
    import triton
    import triton.language as tl

    import qlora.kernels
    from qlora.kernels._runtime import _fast_numpy_paths, lean_under_interpreter

    if not qlora.kernels.interpreter_active():
        pytest.skip("the interpreter's builder only exists under the interpreter")
    from triton.runtime import interpreter
    from triton.runtime.interpreter import TensorHandle

    builder = interpreter.interpreter_builder
    fast = _fast_numpy_paths(builder)
    assert sorted(fast) == ["create_and", "create_dot", "create_gather", "create_masked_load", "create_masked_store"]
    rng = np.random.default_rng(0)
    table = TensorHandle(rng.standard_normal(256).astype(np.float32), tl.float32)
    for dtype, ty in ((np.uint8, tl.uint8), (np.int32, tl.int32), (np.int64, tl.int64)):
        index = TensorHandle(rng.integers(0, 256, 1000).astype(dtype), ty)
        want = builder.create_gather(table, index, 0)
        got = fast["create_gather"](table, index, 0)
        assert got.data.dtype == want.data.dtype and np.array_equal(got.data, want.data) and got.dtype == want.dtype
    table_2d = TensorHandle(rng.standard_normal((4, 16)).astype(np.float32), tl.float32)
    index_2d = TensorHandle(rng.integers(0, 16, (4, 8)).astype(np.int32), tl.int32)
    assert np.array_equal(fast["create_gather"](table_2d, index_2d, 1).data,
                          builder.create_gather(table_2d, index_2d, 1).data)
    with pytest.raises(IndexError):  # out of range: refused as the builder's take_along_axis refuses it
        fast["create_gather"](table, TensorHandle(np.array([256], dtype=np.int32), tl.int32), 0)
    # Whole rows of a 2-D source (an index broadcast along axis 1, the NF4 word decode's byte pairs), for rows of
    # 1 to 8 bytes and the dtypes of the index; rows of other widths and an index that is not a broadcast go to
    # the builder's own take_along_axis.
    for np_dtype, ty, width in ((np.float32, tl.float32, 2), (np.float32, tl.float32, 1), (np.uint8, tl.uint8, 4),
                                (np.float16, tl.float16, 4), (np.float32, tl.float32, 3), (np.float64, tl.float64, 2)):
        rows = TensorHandle((rng.standard_normal((256, width)) * 50).astype(np_dtype), ty)
        for dtype, ity in ((np.uint8, tl.uint8), (np.int32, tl.int32), (np.int64, tl.int64)):
            column = rng.integers(0, 256, (1000, 1)).astype(dtype)
            for index in (np.broadcast_to(column, (1000, width)), np.repeat(column, width, axis=1)):
                want = builder.create_gather(rows, TensorHandle(index, ity), 0)
                got = fast["create_gather"](rows, TensorHandle(index, ity), 0)
                assert got.data.shape == want.data.shape and got.data.dtype == want.data.dtype
                assert np.array_equal(got.data, want.data) and got.dtype == want.dtype
    with pytest.raises(IndexError):
        fast["create_gather"](TensorHandle(np.zeros((256, 2), np.float32), tl.float32),
                              TensorHandle(np.broadcast_to(np.array([[256]], np.int32), (1, 2)), tl.int32), 0)
    a = np.broadcast_to(rng.random((128, 1)) < 0.5, (128, 64))
    b = np.broadcast_to(rng.random((1, 64)) < 0.5, (128, 64))
    for lhs, rhs, ty in ((a, b, tl.int1), (a.astype(np.int32), b.astype(np.int32), tl.int32)):
        want = builder.create_and(TensorHandle(lhs, ty), TensorHandle(rhs, ty))
        got = fast["create_and"](TensorHandle(lhs, ty), TensorHandle(rhs, ty))
        assert got.data.dtype == want.data.dtype and np.array_equal(got.data, want.data) and got.dtype == want.dtype

    @triton.jit
    def lookup(table_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = (offs < n) & (offs >= 0)
        tl.store(out_ptr + offs, tl.gather(tl.load(table_ptr + offs), tl.load(idx_ptr + offs, mask=mask, other=0), 0),
                 mask=mask)

    kernel = lean_under_interpreter(lookup)
    during = []
    kernel.add_pre_run_hook(lambda *args, **kwargs: during.append(
        {name: vars(builder).get(name) for name in fast}))
    table_t, idx = torch.randn(16), torch.randint(0, 16, (16,), dtype=torch.int32)
    out = torch.zeros(16)
    kernel[(1,)](table_t, idx, out, 12, BLOCK=16)
    assert torch.equal(out[:12], table_t[idx[:12].long()]) and torch.equal(out[12:], torch.zeros(4))
    assert all(callable(f) and f.__name__ == name for name, f in during[0].items())
    assert not any(name in vars(builder) for name in fast)

    def their_and(lhs, rhs):  # another tool's replacement, installed before the launch
        return type(builder).create_and(builder, lhs, rhs)

    builder.create_and = their_and
    try:
        kernel[(1,)](table_t, idx, out, 12, BLOCK=16)
        assert during[1]["create_and"] is their_and and builder.create_and is their_and
        assert during[1]["create_gather"] is not None and "create_gather" not in vars(builder)
    finally:
        del builder.create_and


def test_fast_masked_loads_and_stores_touch_what_the_interpreter_touches():
    """The masked load / store replacements read and write exactly the elements the builder's own C++ loop does:
    the same values for every dtype width, tile layout (rows of a matrix, a permuted gather, repeated addresses,
    one broadcast address), mask and ``other``; the loop itself where they do not apply (an address between two
    elements, boolean elements, nothing unmasked, ``other`` of another dtype). Stores leave masked and unaddressed
    memory as it was, and a repeated address ends with the last value, as in the loop. The dot's in-place
    accumulator gives the builder's sums bit for bit."""
    import numpy as np
    import torch
    import triton.language as tl

    import qlora.kernels
    from qlora.kernels._runtime import _fast_numpy_paths

    if not qlora.kernels.interpreter_active():
        pytest.skip("the interpreter's builder only exists under the interpreter")
    from triton.runtime import interpreter
    from triton.runtime.interpreter import TensorHandle

    builder = interpreter.interpreter_builder
    fast = _fast_numpy_paths(builder)
    # The cache and eviction options after the operands differ in number between Triton versions.
    load_options = (None,) * (len(inspect.signature(builder.create_masked_load).parameters) - 3)
    store_options = (None,) * (len(inspect.signature(builder.create_masked_store).parameters) - 3)
    rng = np.random.default_rng(1)
    memory = torch.from_numpy(rng.integers(0, 256, 1 << 16, dtype=np.uint8))

    def assert_same_load(pointers, mask, other):
        want = builder.create_masked_load(pointers, mask, other, *load_options)
        got = fast["create_masked_load"](pointers, mask, other, *load_options)
        assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape and got.dtype == want.dtype
        bits = f"u{want.data.itemsize}"  # compared as bits: the random bytes hold NaNs
        assert np.array_equal(got.data.view(bits), want.data.view(bits))

    def assert_same_store(pointers, values, mask):
        before = memory.clone()
        builder.create_masked_store(pointers, values, mask, *store_options)
        want = memory.clone()
        memory.copy_(before)
        fast["create_masked_store"](pointers, values, mask, *store_options)
        assert torch.equal(memory, want)
    # Every element type the kernels load, by its NumPy storage type (bfloat16 is held as uint16).
    types = ((tl.float32, np.float32), (tl.bfloat16, np.uint16), (tl.float16, np.float16), (tl.uint8, np.uint8),
             (tl.int32, np.int32), (tl.uint64, np.uint64), (tl.int64, np.int64))
    for ty, np_type in types:
        size = np.dtype(np_type).itemsize
        count = memory.numel() // size
        rows, cols = np.arange(32)[:, None], np.arange(64)[None, :]
        layouts = {
            "matrix": (rows * 80 + cols) % count,
            "permuted": rng.permutation(count)[:2048].reshape(32, 64),
            "repeated": rng.integers(0, 40, (32, 64)),
            "one address": np.broadcast_to(np.array([[7]]), (32, 64)),
        }
        masks = {"all": np.ones((32, 64), bool), "tile edge": (rows < 29) & (cols < 50),
                 "random": rng.random((32, 64)) < 0.5, "one": (rows == 3) & (cols == 5)}
        for layout, index in layouts.items():
            pointers = TensorHandle((memory.data_ptr() + index.astype(np.uint64) * size).astype(np.uint64),
                                    tl.pointer_type(ty))
            for mask_name, mask in masks.items():
                handle = TensorHandle(mask, tl.int1)
                for other in (None, TensorHandle(np.full((32, 64), 9, np_type), ty)):
                    assert_same_load(pointers, handle, other)
                assert_same_store(pointers, TensorHandle(rng.integers(0, 100, (32, 64)).astype(np_type), ty), handle)
    # Where the replacements hand over to the loop, the loop's results.
    every = TensorHandle(np.ones(64, bool), tl.int1)
    floats = (memory.data_ptr() + np.arange(64, dtype=np.uint64) * 4).astype(np.uint64)
    between = floats.copy()
    between[5] += 2  # one address between two elements
    values = TensorHandle(rng.standard_normal(64).astype(np.float32), tl.float32)
    for pointers in (floats + 1, between):  # every address 1 byte past a float; one between two
        assert_same_load(TensorHandle(pointers, tl.pointer_type(tl.float32)), every, None)
        assert_same_store(TensorHandle(pointers, tl.pointer_type(tl.float32)), values, every)
    pointers = TensorHandle(floats, tl.pointer_type(tl.float32))
    assert_same_load(pointers, TensorHandle(np.zeros(64, bool), tl.int1),  # nothing unmasked
                     TensorHandle(np.arange(64, dtype=np.float32), tl.float32))
    assert_same_load(pointers, every, TensorHandle(np.zeros(64, np.float64), tl.float64))  # other of another dtype
    assert_same_load(TensorHandle(floats, tl.pointer_type(tl.int1)), every, None)  # boolean elements
    # Two allocations far apart (a multi-tensor kernel's table of pointers): the span covers the gap between them,
    # of which only the unmasked addresses are touched.
    far = torch.arange(1 << 20, dtype=torch.float32)
    spread = TensorHandle(np.concatenate([floats[:32], far.data_ptr() + np.arange(32, dtype=np.uint64) * 4096]),
                          tl.pointer_type(tl.float32))
    assert_same_load(spread, every, None)
    before_far = far.clone()
    builder.create_masked_store(spread, values, every, *store_options)
    want_far = far.clone()
    far.copy_(before_far)
    assert_same_store(spread, values, every)  # the bytes of `memory`
    assert torch.equal(far, want_far)  # and the 32 addressed floats of `far`
    assert torch.equal(torch.nonzero(far != before_far).flatten(), torch.arange(32) * 1024)  # nothing between
    # The dot: float32 and float16 operands, an accumulator of the product's shape and a broadcast one.
    for np_type, ty in ((np.float32, tl.float32), (np.float16, tl.float16)):
        a = TensorHandle(rng.standard_normal((16, 32)).astype(np_type), ty)
        b = TensorHandle(rng.standard_normal((32, 8)).astype(np_type), ty)
        for acc in (rng.standard_normal((16, 8)).astype(np.float32), np.ones((1, 8), np.float32)):
            d = TensorHandle(acc, tl.float32)
            want = builder.create_dot(a, b, d, None, None)
            got = fast["create_dot"](a, b, d, None, None)
            assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape
            assert np.array_equal(got.data, want.data) and got.dtype == want.dtype
