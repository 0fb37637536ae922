"""Benchmarks: host (Python) time of a QLoRALinear forward+backward and of one optimizer step over 448 tensors,
with kernel execution stubbed at the Triton boundary (``perf.hosttime.stubbed_triton_launches``), against the
plain-torch equivalents (a frozen ``nn.Linear`` + LoRA under autograd; ``torch.optim.AdamW(foreach=True)``, which
on CPU includes its arithmetic). On a GPU these host times are what a step pays before its kernels run.

Each case reports ``seconds_per_op`` and ``time_ratio_vs_torch`` (its time over the torch case of its family,
measured in the same test). Run: ``.venv/bin/python -m pytest perf/bench_host.py --benchmark-only``.
"""

from __future__ import annotations

import pytest

from perf import benchutil as bu
from perf import hosttime as ht

# On a GPU the workloads live there (compiled kernels refuse CPU tensors); torch's own CUDA kernels then run
# asynchronously, so what is timed is still host time.
DEVICE = str(bu.DEVICE)


@pytest.mark.parametrize("case", ["qlora_QLoRALinear", "torch_LoRA"])
def test_layer_forward_backward_host(benchmark, case):
    qlora_step, torch_step = ht.layer_workloads(device=DEVICE)
    fn = qlora_step if case == "qlora_QLoRALinear" else torch_step
    with ht.stubbed_triton_launches():
        reference = ht.best_seconds(torch_step)
        benchmark.pedantic(fn, rounds=30, iterations=20, warmup_rounds=2)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(seconds_per_op=seconds, time_ratio_vs_torch=seconds / reference,
                                timing="host only: Triton launches stubbed")


@pytest.mark.parametrize("case", list(ht.OPTIMIZERS))
def test_optimizer_step_host(benchmark, case):
    params = ht.optimizer_params(device=DEVICE)
    opt = ht.OPTIMIZERS[case](params)
    torch_opt = ht.OPTIMIZERS["torch_AdamW_foreach"](ht.optimizer_params(device=DEVICE))
    reference = ht.best_seconds(torch_opt.step, rounds=5, inner=2)
    with ht.stubbed_triton_launches() as counter:
        benchmark.pedantic(opt.step, rounds=10, iterations=2, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    report = opt.memory_report() if hasattr(opt, "memory_report") else {}
    moved = {k: sum(d["last_step"][k] for d in report.get("devices", {}).values())
             for k in ("bytes_to_device", "bytes_to_host")}
    benchmark.extra_info.update(seconds_per_op=seconds, time_ratio_vs_torch=seconds / reference,
                                launches=counter["launches"], pcie_bytes_per_step=sum(moved.values()),
                                timing="host only: Triton launches stubbed (torch's step includes its CPU math)")
