"""``python -m perf.profile_linear [M ...]``: where the time of one fused QLoRA layer call goes, on a GPU.

For each M (default 1, 16, 4096; K = N = 4096, r = 16, bf16, NF4 blocksize 64 with double quantization) it times
the forward without grad and the forward + backward with ``torch.profiler`` and prints, per call: the wall time
(synchronized), the summed GPU kernel time, and every kernel launched with its count and time. Wall minus GPU
time is what the host and launch gaps cost. A GPU-only tool (the interpreter has no CUDA kernels to profile).
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    import qlora
    from qlora.functional import qlora_linear

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
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            kernels = {}
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    count, total = kernels.get(event.name, (0, 0.0))
                    kernels[event.name] = (count + 1, total + event.device_time)
            gpu_us = sum(total for _, total in kernels.values()) / calls
            print(f"M={m} {label}: wall {wall * 1e6:.1f} us per call, GPU kernels {gpu_us:.1f} us per call")
            for name, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                print(f"    {count / calls:4.1f} x {total / calls:9.1f} us  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
