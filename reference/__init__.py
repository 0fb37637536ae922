"""The oracle: the numerical contract of ``SPEC.md`` written as plain NumPy/SciPy, installed as
``qlora.reference``. It shares no code with ``qlora.kernels`` and imports neither torch nor triton.
"""

from .codebook import dynamic_map, normal_float_codebook
from .linear import qlora_linear_backward, qlora_linear_forward
from .optim import adamw8bit_step, adamw_step
from .quantize import (
    dequantize_4bit,
    dequantize_8bit,
    double_dequantize,
    double_quantize,
    quantize_4bit,
    quantize_8bit,
)

__all__ = [
    "normal_float_codebook",
    "dynamic_map",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_8bit",
    "dequantize_8bit",
    "double_quantize",
    "double_dequantize",
    "qlora_linear_forward",
    "qlora_linear_backward",
    "adamw_step",
    "adamw8bit_step",
]
