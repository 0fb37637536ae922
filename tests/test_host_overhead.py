"""Host (Python) cost of the layer and the optimizer step, and what paging moves, on CPU.

Kernel execution is stubbed at the Triton boundary (``perf.hosttime.stubbed_triton_launches``: the launch objects'
``run`` does nothing), so only host work is timed: argument checks, launch-config choices, allocations, autograd.
Times are the minimum over rounds of the mean of back-to-back calls, and the bounds carry margins well above
the run-to-run spread on a loaded 2-core machine (measured ratios are in perf/README.md).
"""

from __future__ import annotations

import pytest
import torch

import qlora
from perf import hosttime as ht
from qlora import optim as qoptim
from qlora import paging

# Goal of issue 14: <= 1.5x. Measured 1.42x once the eager path called the prechecked launchers (the launchers'
# own checks repeated qlora_linear's); 4.8x before this work. The bound leaves room for a loaded 2-core machine
# and still catches a return of the custom-operator dispatch or of per-call weight validation (1.75x and up).
LAYER_RATIO_BOUND = 1.7
OPTIMIZER_RATIO_BOUND = 1.0  # the goal; measured 0.1x (one launch per step instead of 448)


def test_layer_forward_backward_host_time_against_plain_torch_lora():
    qlora_step, torch_step = ht.layer_workloads()
    with ht.stubbed_triton_launches():
        # Up to three interleaved measurements: a loaded machine only ever inflates a ratio by chance.
        ratio = float("inf")
        for _ in range(3):
            ratio = min(ratio, ht.interleaved_ratio(qlora_step, torch_step))
            if ratio <= LAYER_RATIO_BOUND:
                break
    assert ratio <= LAYER_RATIO_BOUND, f"QLoRALinear forward+backward host time is {ratio:.2f}x plain-torch LoRA"


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_layer_call_builds_no_tensor_from_host_data(monkeypatch, dropout_p):
    """On a GPU a tensor built from Python data (``torch.tensor``) is a pageable host-to-device copy, which blocks
    the host until the stream drains: the H200 profile of the rewritten kernels showed 3-4 per forward+backward,
    from validating an unused seed. A layer call without dropout makes none; with dropout, only the seed draw
    (``torch.randint`` on the device) and no ``torch.tensor``."""
    layer = qlora.QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, lora_alpha=8, lora_dropout=dropout_p)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()  # warm: lazily built tables
    built = []
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def counting(real):
        def build(*args, **kwargs):
            built.append(args[:1])
            return real(*args, **kwargs)
        return build

    monkeypatch.setattr(torch, "tensor", counting(real_tensor))
    monkeypatch.setattr(torch, "as_tensor", counting(real_as_tensor))
    with ht.stubbed_triton_launches():
        layer(x).sum().backward()
    assert built == []


@pytest.mark.parametrize("name", ["qlora_PagedAdamW_32bit_resident", "qlora_AdamW8bit"])
def test_optimizer_step_over_448_tensors_is_one_launch_and_cheaper_than_torch_foreach(name):
    ours_params, torch_params = ht.optimizer_params(), ht.optimizer_params()
    ours = ht.OPTIMIZERS[name](ours_params)
    theirs = ht.OPTIMIZERS["torch_AdamW_foreach"](torch_params)
    with ht.stubbed_triton_launches() as counter:
        ours.step()
        assert counter["launches"] == 1  # one (group, dtype, state kind): one launch for all 448 tensors
        t_ours = ht.best_seconds(ours.step, rounds=5, inner=2)
    t_torch = ht.best_seconds(theirs.step, rounds=5, inner=2)
    assert t_ours <= OPTIMIZER_RATIO_BOUND * t_torch, f"{name}: {t_ours / t_torch:.2f}x torch AdamW(foreach)"


def test_launches_group_by_dtype_and_state_kind():
    """Two parameter dtypes and both state kinds (8-bit above min_8bit_size, 32-bit below): four launches."""
    params = [torch.nn.Parameter(torch.randn(n).to(dt)) for n in (300, 5000) for dt in (torch.float32,
                                                                                       torch.bfloat16)] * 3
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = qoptim.AdamW8bit(params, min_8bit_size=4096)
    with ht.stubbed_triton_launches() as counter:
        opt.step()
    assert counter["launches"] == 4


# --- paging: bytes moved per step ------------------------------------------------------------------------------


def _paged_setup(num_pages, shapes=((3000,), (2500,), (4000,), (1000,)), eight_bit=False):
    kw = dict(min_8bit_size=256) if eight_bit else {}
    cls = qoptim.PagedAdamW8bit if eight_bit else qoptim.PagedAdamW
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(params, lr=1e-2, paging="host", page_size=4096, num_pages=num_pages, min_paged_size=0, **kw)
    resident = cls(ref, lr=1e-2, paging="none", **kw)
    return params, ref, opt, resident


def _step(opt, params, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return opt.memory_report()["devices"].get("cpu")


def _page_bytes(pager):
    """Bytes of every page's segments, independently of the pager's counters."""
    return [sum(seg.nbytes for c in page for seg in c.segments) for page in pager.plan.pages]


@pytest.mark.parametrize("eight_bit", [False, True])
def test_state_that_fits_the_budget_moves_nothing_after_its_first_upload(eight_bit):
    params, ref, opt, resident = _paged_setup(num_pages=64, eight_bit=eight_bit)
    first = _step(opt, params, 0)
    _step(resident, ref, 0)
    total = opt.memory_report()["paged_state_bytes"]
    assert first["last_step"] == {"pages": first["plan_pages"], "bytes_to_device": total, "bytes_to_host": 0}
    for t in (1, 2):
        report = _step(opt, params, t)
        _step(resident, ref, t)
        assert report["last_step"]["bytes_to_device"] == report["last_step"]["bytes_to_host"] == 0
    assert report["cached_pages"] == report["plan_pages"]
    opt.synchronize()  # writes back exactly the pages the steps changed, once
    assert opt.memory_report()["devices"]["cpu"]["bytes_synchronized_to_host"] == total
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        for key, value in resident.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(value)), key


def test_state_over_the_budget_moves_exactly_the_evicted_pages():
    """LRU over a plan of n >= 2 * budget pages: every page is evicted before its turn comes again, so from the
    second step on each step uploads every page and writes every page back; the first uploads all and writes back
    all but the ``budget`` pages still cached at its end."""
    budget = 2
    params, ref, opt, resident = _paged_setup(num_pages=budget)
    first = _step(opt, params, 0)
    pager = opt._pagers[torch.device("cpu")]
    sizes = _page_bytes(pager)
    assert len(sizes) >= 2 * budget
    assert first["last_step"]["bytes_to_device"] == sum(sizes)
    assert first["last_step"]["bytes_to_host"] == sum(sizes[:-budget])
    _step(resident, ref, 0)
    for t in (1, 2):
        report = _step(opt, params, t)
        _step(resident, ref, t)
        assert report["last_step"]["bytes_to_device"] == report["last_step"]["bytes_to_host"] == sum(sizes)
    opt.synchronize()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], resident.state[q]["exp_avg"])


def test_default_budget_follows_free_device_memory(monkeypatch):
    page = 4096
    monkeypatch.setattr(paging, "free_device_bytes", lambda device: 20 * page)
    params, ref, opt, _ = _paged_setup(num_pages=None)
    report = _step(opt, params, 0)
    # BUDGET_FRACTION of (free + nothing cached yet) = 10 pages; the plan has fewer, so all stay.
    assert report["device_budget_bytes"] == int(20 * page * paging.BUDGET_FRACTION)
    assert opt.memory_report()["num_pages"] is None
    cached_before = report["cached_pages"]
    monkeypatch.setattr(paging, "free_device_bytes", lambda device: 0)  # pressure: what the cache holds, halved
    report = _step(opt, params, 1)
    budget_pages = max(2, int(cached_before * page * paging.BUDGET_FRACTION) // page)
    assert report["device_budget_bytes"] == budget_pages * page
    assert report["cached_pages"] == budget_pages < cached_before
    assert report["last_step"]["bytes_to_host"] > 0  # pages went back to make room
