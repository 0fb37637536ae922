"""``python -m perf.profile_linear [M ...]``: where the time of one fused QLoRA layer call goes, on a GPU.

For each M (default 1, 16, 4096; K = N = 4096, r = 16, bf16, NF4 blocksize 64 with double quantization) it times
the forward without grad and the forward + backward with ``torch.profiler`` and prints, per call: the wall time
(synchronized), the summed GPU kernel time, and every kernel launched with its count and time. Wall minus GPU
time is what the host and launch gaps cost.

For each M that takes the decode GEMV (M <= ``SMALL_M``) it then times the GEMV launches that the static model
cannot rank (:func:`decode_variants`: the dispatcher's own, a two-stage software pipeline, other splits over K,
64-row tiles), each beside the model's time for it where the committed baseline has its build
(:func:`model_seconds`) and with its output compared to the dispatcher's. The model charges issue and bytes, not
latency; these timings say which of them bounds the decode on the GPU at hand (perf/README.md, "What the model does
not charge: latency"). A GPU-only tool (the interpreter has no CUDA kernels to profile).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the kernels import torch and triton: only where a function needs them
    from qlora.kernels.linear import MatmulConfig


def decode_variants(m: int, n: int, k: int, sms: int) -> list[tuple[str, MatmulConfig | None]]:
    """``[(label, config), ...]``: the GEMV launches timed side by side for an (m, k) x (n, k)^T decode on ``sms``
    SMs, ``m <= SMALL_M``.

    - The dispatcher's (config None: ``gemv_config(m)``, split S by ``_gemv_split_k``, the epilogue folded into the
      GEMV: the last of a column tile's programs sums the partials).
    - The same launch with the epilogue apart (``fold_epilogue=False``): a second launch reads the partials back,
      as before the fold; the same bits, which the profile prints.
    - Where the dispatcher decodes W in the MMA's fragment order (its 128-row tiles on NVIDIA GPUs): the same launch
      with W in its own column order (``fragment_order=False``), a pass through shared memory per K step (perf
      static, sm_90 / sm_80, 3.9: 542 / 705 against 517 / 578 instructions per K step at M = 1, at 128 against
      157-165 registers); y differs in the order the dot sums its products.
    - The same tiles and split with ``num_stages=2``: the next K step's words, x and scale codes load during this
      step's decode (``load_chain`` 2 -> 1, 16-byte ``cp.async``), for 557 against 517 instructions per K step on
      sm_90 and 606 against 578 on sm_80 at M = 1 by ``perf static`` under triton 3.9 (553 / 604 against 519 / 581
      under 3.6; 0 spills; 688 against 541 on sm_90 before W was decoded in fragment order).
    - The dispatcher's tiles and stages with S / 4, S / 2 and 2 S splits, where that is a split the launcher takes
      (``SPLIT_K_CHOICES``, at least one K step per split): fewer splits write fewer float32 partials of y but
      leave fewer programs per SM to hide each other's load latency, which the model does not see.
    - Where the dispatcher's tile holds 128 rows of W: 64-row tiles with S / 2 splits, the same number of programs
      with half the partials, for 4.59 against 4.23 instructions per weight element on sm_90 (5.59 against 5.45
      on sm_80; ``perf static``, triton 3.9).

    All but the first are explicit :class:`MatmulConfig` s of path "gemv". The two-stage launch runs the same
    operations per K step, so it should give the same bits too (the interpreter ignores stages; on a GPU the profile
    prints whether it did); another split or tile sums the float32 partials of y in another order."""
    from qlora.kernels import linear as L

    if not 1 <= m <= L.SMALL_M:
        raise ValueError(f"m must be in [1, {L.SMALL_M}] (the decode GEMV's rows), got {m}")
    config = L.gemv_config(m)
    split = L._gemv_split_k(n, k, config, sms, m)
    variants: list[tuple[str, MatmulConfig | None]] = [
        (f"dispatcher ({_plural(split, 'split')}, {_plural(config.num_stages, 'stage')})", None),
        ("epilogue launched apart", replace(config, split_k=split, fold_epilogue=False))]
    if L.fragment_tile(config):
        variants.append(("W's own column order", replace(config, split_k=split, fragment_order=False)))
    variants.append(("2 stages", replace(config, num_stages=2, split_k=split)))
    for other in (split // 4, split // 2, split * 2):
        if other in L.SPLIT_K_CHOICES and other * config.block_k <= k:
            variants.append((_plural(other, "split"), replace(config, split_k=other)))
    if config.block_n == 128:
        half = max(split // 2, 1)
        variants.append((f"64-row tiles, {_plural(half, 'split')}", replace(config, block_n=64, split_k=half)))
    return variants


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def model_seconds(m: int, n: int, k: int, r: int, config: MatmulConfig | None, device) -> float | None:
    """The static model's time (``perf/roofline.py``, this Triton's committed baseline) of the GEMV and its
    epilogue for the variant ``config`` of :func:`decode_variants` on ``device``; None where the baseline has no
    build of the variant's tiles, stages and decode order (the two-stage and 64-row launches, W in its own column
    order) or no baseline exists for this Triton. The launch with its epilogue apart is charged the folded build's
    main loop (the baselines hold no unfolded GEMV build; the fold adds its code outside that loop)."""
    import triton

    from perf import roofline as rl
    from qlora.kernels import linear as L

    base = L.gemv_config(m)
    if config is not None and ((config.num_stages, config.block_n) != (base.num_stages, base.block_n)
                               or not config.fragment_order):
        return None
    version = ".".join(triton.__version__.split(".")[:2])
    try:
        rl.static_builds(version)
    except ValueError:  # no committed baseline of this Triton
        return None
    ops = rl.nf4_forward_launches(m, k, n, r, "gemv", triton=version,
                                  gemv_split=None if config is None else config.split_k,
                                  gemv_fold=config is None or config.fold_epilogue)
    return sum(rl.op_roofline(op, device).predicted_s for op in ops)


def _kernel_times(fn, calls: int, on_gpu: bool = True) -> tuple[float, dict[str, tuple[int, float]]]:
    """``(us per call, {kernel: (launches, us)})`` of ``calls`` calls of ``fn``: its CUDA kernels' times under
    ``torch.profiler`` on a GPU; on a CPU (the interpreter) the wall time of the calls, as one entry."""
    import torch

    if not on_gpu:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        total = (time.perf_counter() - start) * 1e6
        return total / calls, {"interpreted_calls": (calls, total)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, tuple[int, float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count, total = kernels.get(event.name, (0, 0.0))
            kernels[event.name] = (count + 1, total + event.device_time)
    return sum(total for _, total in kernels.values()) / calls, kernels


def _compare(got, want) -> str:
    """How a variant's y differs from the dispatcher's: the same bits, or how many elements differ and by how much
    at most, relative to the largest magnitude of y."""
    import torch

    if torch.equal(got, want):
        return "same bits"
    diff = (got.float() - want.float()).abs()
    scale = want.float().abs().max().item() or 1.0
    return f"{int((diff > 0).sum())} of {want.numel()} differ, max {diff.max().item() / scale:.1e} of max|y|"


def profile_decode(m: int, weight, lora_a, lora_b, gen, calls: int = 20) -> None:
    """Print the time per call of each of :func:`decode_variants` at ``m`` rows (no grad; the GEMV and its
    epilogue, nothing else), beside the model's time for it and how its y compares with the dispatcher's. On a GPU
    the kernels' times; on a CPU (the interpreter, which tests walk this with) wall time, no model, and the
    dispatcher's launch takes the interpreter's own tiles."""
    import torch

    from perf.bench import roofline_device
    from qlora.kernels import linear as L
    from qlora.kernels.lora import num_sms

    n, k = weight.shape
    r = lora_a.shape[0]
    on_gpu = weight.packed.is_cuda
    device = roofline_device(torch.cuda.get_device_name(weight.packed.device)) if on_gpu else None
    x = torch.randn(m, k, device=weight.packed.device, generator=gen).to(torch.bfloat16)
    kwargs = weight.kernel_kwargs()
    print(f"M={m} decode GEMV variants (K = {k}, N = {n}, r = {r}, bf16, no grad; time per call; the static "
          f"model's for {device.key if device else 'this device: none (not a modelled GPU)'}):")
    want = None
    for label, config in decode_variants(m, n, k, num_sms() if on_gpu else 132):
        def forward(config=config):
            return L.nf4_lora_forward(x, lora_a=lora_a, lora_b=lora_b, scaling=2.0, config=config, **kwargs)[0]

        try:
            with torch.no_grad():
                y = forward()  # compiles the variant outside the timed calls
                if on_gpu:
                    torch.cuda.synchronize()
                us, kernels = _kernel_times(forward, calls, on_gpu)
        except Exception as err:  # one variant that does not build or run must not cost the others their timings
            print(f"    {label:32s} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        want = y if want is None else want
        parts = " + ".join(f"{total / calls:.1f} {name.split('_kernel')[0].lstrip('_')}"
                           for name, (_, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]))
        predicted = model_seconds(m, n, k, r, config, device) if device else None
        model = "model -" if predicted is None else f"model {predicted * 1e6:.2f} us"
        print(f"    {label:32s} {us:8.1f} us  {model:16s} ({parts})  {_compare(y, want)}")


def main(argv: list[str] | None = None) -> int:
    import torch

    import qlora
    from qlora.functional import qlora_linear
    from qlora.kernels.linear import SMALL_M

    if not torch.cuda.is_available() or qlora.interpreter_active():
        print("perf.profile_linear: needs a CUDA device with the kernels compiled", file=sys.stderr)
        return 2
    ms = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [1, 16, 4096]
    k = n = 4096
    r = 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    weight = qlora.quantize_nf4(dense, blocksize=64, double_quant=True)
    lora_a = (torch.randn(r, k, device="cuda", generator=gen) * 0.01).to(torch.bfloat16).requires_grad_()
    lora_b = (torch.randn(n, r, device="cuda", generator=gen) * 0.01).to(torch.bfloat16).requires_grad_()
    for m in ms:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)

        def forward():
            with torch.no_grad():
                return qlora_linear(x, weight, lora_a, lora_b, 2.0)

        def forward_backward():
            return torch.autograd.grad(qlora_linear(x, weight, lora_a, lora_b, 2.0), (x, lora_a, lora_b), dy)

        for label, fn in (("forward (no grad)", forward), ("forward+backward", forward_backward)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            calls = 10
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / calls
            gpu_us, kernels = _kernel_times(fn, calls)
            print(f"M={m} {label}: wall {wall * 1e6:.1f} us per call, GPU kernels {gpu_us:.1f} us per call")
            for name, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                print(f"    {count / calls:4.1f} x {total / calls:9.1f} us  {name[:100]}")
    for m in ms:
        if m <= SMALL_M:
            with torch.no_grad():
                profile_decode(m, weight, lora_a.detach(), lora_b.detach(), gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
