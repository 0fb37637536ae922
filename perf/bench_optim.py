"""Benchmarks: one AdamW step of the Triton optimizers, against torch and bitsandbytes.

Cases (one float32 parameter with a gradient; lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2):

- ``qlora_PagedAdamW_32bit_resident``: ``qlora.PagedAdamW(paging="none")``, float32 moments in device memory;
- ``qlora_AdamW8bit``: ``qlora.AdamW8bit``, 8-bit blockwise moments (256-element blocks) in device memory;
- ``qlora_PagedAdamW8bit_host``: ``qlora.PagedAdamW8bit(paging="host")``, the 8-bit moments in (pinned) host
  memory, streamed through 4 device pages of 8 MiB each step; reports the bytes moved each way, read from
  ``optimizer.memory_report()``, and their rate;
- ``torch_AdamW``: ``torch.optim.AdamW`` (``fused=True`` on the GPU, ``foreach=True`` on CPU);
- on a GPU with bitsandbytes importable: ``bnb.optim.AdamW8bit``, ``PagedAdamW8bit`` and ``PagedAdamW``.

Every case reports the device bytes one step reads and writes (``adamw_step_bytes``), the achieved bandwidth,
its fraction of the peak, and ``time_ratio_vs_torch`` (its time over the ``torch_AdamW`` case's).

GPU: a 64 Mi-element parameter (8192 x 8192). CPU (Triton interpreter): 1 Mi elements, orientation only.

Run: ``.venv/bin/python -m pytest perf/bench_optim.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from perf import benchutil as bu

import qlora

SHAPE = (8192, 8192) if bu.ON_GPU else (1024, 1024)
QBLOCK = 256  # 8-bit state blocksize (one float32 absmax per 256 elements per moment)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

bnb, BNB_REASON = bu.import_bitsandbytes()


def adamw_step_bytes(n: int, optim_bits: int, param_itemsize: int = 4, grad_itemsize: int = 4,
                     qblock: int = QBLOCK) -> int:
    """Device bytes one AdamW step over ``n`` elements reads and writes: the parameter read and written, the
    gradient read, and each moment read and written: float32 (4 + 4 bytes each) for ``optim_bits=32``; for
    ``optim_bits=8`` a uint8 code (1 + 1) plus one float32 absmax per ``qblock`` elements (4 + 4)."""
    fixed = n * (2 * param_itemsize + grad_itemsize)
    if optim_bits == 32:
        return fixed + 2 * n * (4 + 4)
    if optim_bits == 8:
        return fixed + 2 * n * (1 + 1) + 2 * -(-n // qblock) * (4 + 4)
    raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")


def paged_state_bytes(n: int, optim_bits: int, qblock: int = QBLOCK) -> int:
    """Bytes of the optimizer state of ``n`` elements (both moments), which host paging copies to the device
    and back every step (each field slice of a page starts on a 128-byte boundary, so the copies can be a
    little larger)."""
    if optim_bits == 32:
        return 2 * n * 4
    if optim_bits == 8:
        return 2 * n + 2 * 4 * -(-n // qblock)
    raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")


def _torch_adamw(params):
    if bu.ON_GPU:
        return torch.optim.AdamW(params, fused=True, **HYPER)
    return torch.optim.AdamW(params, foreach=True, **HYPER)


# id -> (factory, optim_bits, host-paged by us)
CASES = {
    "torch_AdamW": (_torch_adamw, 32, False),
    "qlora_PagedAdamW_32bit_resident": (lambda ps: qlora.PagedAdamW(ps, paging="none", **HYPER), 32, False),
    "qlora_AdamW8bit": (lambda ps: qlora.AdamW8bit(ps, **HYPER), 8, False),
    "qlora_PagedAdamW8bit_host": (lambda ps: qlora.PagedAdamW8bit(ps, paging="host", **HYPER), 8, True),
    "bnb_AdamW8bit": (lambda ps: bnb.optim.AdamW8bit(ps, **HYPER), 8, False),
    "bnb_PagedAdamW8bit": (lambda ps: bnb.optim.PagedAdamW8bit(ps, **HYPER), 8, False),
    "bnb_PagedAdamW": (lambda ps: bnb.optim.PagedAdamW(ps, **HYPER), 32, False),
}
_BNB_MARKS = bu.bitsandbytes_marks(BNB_REASON)
PARAMS = [pytest.param(name, marks=_BNB_MARKS if name.startswith("bnb_") else (), id=name) for name in CASES]


def _parameter() -> torch.nn.Parameter:
    gen = torch.Generator(device=bu.DEVICE).manual_seed(0)
    p = torch.nn.Parameter(torch.randn(SHAPE, generator=gen, device=bu.DEVICE).mul_(0.02))
    p.grad = torch.randn(SHAPE, generator=gen, device=bu.DEVICE).mul_(1e-3)
    return p


@pytest.mark.parametrize("case", PARAMS)
def test_adamw_step(benchmark, case):
    where = "GPU" if bu.ON_GPU else "Triton interpreter, orientation only"
    torch_kind = "fused" if bu.ON_GPU else "foreach"
    benchmark.group = f"AdamW step, {SHAPE[0]}x{SHAPE[1]} float32 parameter ({where})"
    factory, bits, host_paged = CASES[case]
    p = _parameter()
    optimizer = factory([p])
    seconds = bu.run_benchmark(benchmark, optimizer.step)
    if case == "torch_AdamW":
        bu.offer_reference("torch_AdamW", seconds)
    reference = bu.reference_seconds("torch_AdamW", lambda: _torch_adamw([_parameter()]).step)
    n = p.numel()
    info = dict(
        optimizer=case,
        torch_reference=f"torch.optim.AdamW({torch_kind}=True)",
        numel=n,
        optim_bits=bits,
        torch_reference_seconds=reference,
        time_ratio_vs_torch=None if seconds is None else seconds / reference,
        **bu.bandwidth_info(adamw_step_bytes(n, bits), seconds),
    )
    if host_paged:
        bu.sync()
        report = optimizer.memory_report()
        (device_report,) = report["devices"].values()
        last = device_report["last_step"]
        moved = last["bytes_to_device"] + last["bytes_to_host"]
        info.update(
            paged_state_bytes=report["paged_state_bytes"],
            expected_state_bytes=paged_state_bytes(n, bits),
            device_budget_bytes=report["device_budget_bytes"],
            pages_per_step=last["pages"],
            pcie_bytes_to_device=last["bytes_to_device"],
            pcie_bytes_to_host=last["bytes_to_host"],
            pcie_bytes_per_step=moved,
            pcie_note=("host<->device copies of the paged state (on CPU, copies within host memory)"),
        )
        if seconds is not None:
            info["pcie_GBps"] = moved / seconds / 1e9
    benchmark.extra_info.update(info)
