"""As-launched specialization (perf/specialize.py) equals what Triton's JIT computes for a real launch.

The JIT side is ``JITFunction.run`` itself, on a stand-in driver (no GPU here) whose target is sm_90, with
Triton's ``jit_cache_hook`` recording the compile inputs and skipping the compile. The perf side is
``perf.specialize.specialize_spec`` of a ``KernelSpec`` carrying the same launch. Both run in a fresh process with
the interpreter off (the kernels must be ``JITFunction``s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["QLORA_INTERPRET"] = "0"
    sys.path.insert(0, os.environ["REPO"])
    import qlora  # noqa: F401  (interpreter off before decoration)
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from qlora.kernels import linear
    from qlora.kernels._static import KernelSpec
    from perf.specialize import specialize_spec

    TARGET = GPUTarget("cuda", 90, 32)

    class StandInDriver:  # what JITFunction.run asks of the active driver
        def get_current_device(self): return 0
        def get_current_stream(self, device): return 0
        def get_current_target(self): return TARGET
        def is_active(self): return True

    # A real decode launch of the NF4 GEMV: M = 1 rows, K = 4096, N = 4096, r = 16, bf16, contiguous tensors,
    # 16 K-splits of 256 columns, dropout on (bit-packed keep mask).
    m, k, n, r, split = 1, 4096, 4096, 16, 16
    bf16 = torch.bfloat16
    x = torch.empty((m, k), dtype=bf16)
    lora_a = torch.empty((r, k), dtype=bf16)
    lora_b = torch.empty((n, r), dtype=bf16)
    tensors = dict(x_ptr=x, packed_ptr=torch.empty(n * k // 2, dtype=torch.uint8),
                   absmax_ptr=torch.empty(n * k // 64, dtype=torch.uint8),
                   absmax2_ptr=torch.empty(n * k // 64 // 256, dtype=torch.float32),
                   nested_code_ptr=torch.empty(256, dtype=torch.float32), code_ptr=torch.empty(16, dtype=torch.float32),
                   a_ptr=lora_a, bits_ptr=torch.empty((m, k // 32), dtype=torch.int32),
                   ws_ptr=torch.empty((split, m, n), dtype=torch.float32),
                   u_ws_ptr=torch.empty((split, m, r), dtype=torch.float32),
                   arrivals_ptr=torch.empty(n // 64 + 1, dtype=torch.int32), b_ptr=lora_b,
                   bias_ptr=torch.empty(n, dtype=bf16), y_ptr=torch.empty((m, n), dtype=bf16),
                   u_ptr=torch.empty((m, r), dtype=torch.float32))
    scalars = dict(M=m, N=n, K=k, R=r, offset=0.25, k_per_split=k // split, words_per_row=k // 32, scaling=2.0,
                   u_scale=1.25, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=lora_a.stride(0),
                   stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1))
    consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=256, INDEX_64=False,
                  HAS_DROPOUT=True, EVEN_K=True, EVEN_N=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16,
                  FOLD=True, U_FIRST=True, HAS_BIAS=True, FRAGMENT_ORDER=True)
    options = dict(num_warps=4, num_stages=4, enable_fp_fusion=False)

    captured = {}
    def hook(*, compile, **_):
        captured.update(compile)
        return True  # skip the compile: only the inputs are wanted
    driver.set_active(StandInDriver())
    knobs.runtime.jit_cache_hook = hook
    try:
        args = [tensors[a] if a in tensors else scalars[a] for a in linear._nf4_gemv_kernel.arg_names
                if a not in consts]
        linear._nf4_gemv_kernel[(1,)](*args, **consts, **options)
    finally:
        knobs.runtime.jit_cache_hook = None  # (no reset_active: this machine has no driver to go back to)

    types = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8", torch.int32: "i32"}
    signature = {a: "*" + types[t.dtype] for a, t in tensors.items()}
    signature.update({a: ("fp32" if isinstance(v, float) else "i32") for a, v in scalars.items()})
    signature.update({c: "constexpr" for c in consts})
    spec = KernelSpec("decode", linear._nf4_gemv_kernel, signature, consts, options, launch_args=scalars)
    ours = specialize_spec(spec, TARGET)
    key = lambda d: {str(list(k)): v for k, v in d.items()}
    jit_attrs = {k: v for k, v in captured["configs"][0].items() if v}
    print(json.dumps({
        "jit": {"signature": captured["signature"], "constexprs": key(captured["constants"]),
                "attrs": key(jit_attrs), "num_warps": captured["num_warps"], "num_stages": captured["num_stages"],
                "enable_fp_fusion": captured["enable_fp_fusion"]},
        "perf": {"signature": ours.signature, "constexprs": key(ours.constexprs), "attrs": key(ours.attrs),
                 "num_warps": ours.options.num_warps, "num_stages": ours.options.num_stages,
                 "enable_fp_fusion": ours.options.enable_fp_fusion},
        "summary": ours.summary(),
    }, default=str))
""")


def test_perf_specialization_equals_the_jit_launch(tmp_path):
    script = tmp_path / "specialize_probe.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "QLORA_INTERPRET": "0", "REPO": str(REPO), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["perf"] == out["jit"]
    # And it is the as-launched specialization, not the plain i32 signature: M = 1 and the unit strides became
    # constants, the 4096-sized ints are divisible by 16, R = 16 too, pointers are aligned.
    summary = out["summary"]
    for arg in ("M", "stride_xk", "stride_ak", "stride_br"):
        assert summary[arg] == "constexpr=1", (arg, summary[arg])
    for arg in ("N", "K", "R", "stride_xm", "stride_ar", "stride_bn", "k_per_split", "words_per_row"):
        assert summary[arg] == "i32 div16", (arg, summary[arg])
    assert summary["packed_ptr"] == "*u8 div16" and summary["offset"] == "fp32"
