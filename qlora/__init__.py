"""QLoRA kernel suite: NF4 quantization, fused dequant-matmul + LoRA and paged optimizers in Triton.

Importing ``qlora`` first decides how the Triton kernels run (``qlora/_runtime.py``): on a machine
without a CUDA device they run under the Triton interpreter on CPU tensors; ``QLORA_INTERPRET=1``/``0``
forces the choice. The numerical contract is checked against the NumPy/SciPy oracle in
``qlora.reference``.
"""

from . import _runtime  # noqa: F401  (must run before any kernel module is imported)
from ._runtime import interpreter_active
from .nf4 import NF4Weight, quantize_nf4
from . import bnb_format
from . import functional
from .layers import QLoRALinear
from .optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from .model import ParameterReport, prepare_model, trainable_parameters_report
from .interop import load_adapter, load_quantized, save_adapter, save_quantized
from . import ops

__version__ = "0.1.0"

__all__ = [
    "interpreter_active",
    "NF4Weight",
    "quantize_nf4",
    "bnb_format",
    "functional",
    "QLoRALinear",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "prepare_model",
    "trainable_parameters_report",
    "ParameterReport",
    "save_quantized",
    "load_quantized",
    "save_adapter",
    "load_adapter",
    "ops",
    "__version__",
]
