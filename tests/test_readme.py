"""The README's Python examples run as written (at a smaller width, so the interpreter finishes quickly)."""

from __future__ import annotations

import re
from pathlib import Path

import qlora  # noqa: F401  (selects the interpreter before any kernel module is decorated)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README lost its usage examples"
    code = "\n".join(blocks).replace("4096", "256")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    layer, q = namespace["layer"], namespace["q"]
    assert q.shape == (256, 256) and abs(q.bits_per_param - 4.127) < 1e-3
    assert namespace["y"].shape == (2, 8, 256)
    # B starts at zero (PEFT's init); the optimizer step moved it, so gradients flowed and the step ran.
    assert layer.lora_B.detach().abs().max() > 0
    assert namespace["dense"].weight.shape == (256, 256)
    # The saved-and-reloaded model computes exactly what the original does.
    import torch

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(namespace["fresh"](x), namespace["model"](x))
