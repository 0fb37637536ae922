"""qlora's kernels under the Hugging Face stack: bitsandbytes 4-bit models, PEFT, transformers model folders.

- :mod:`qlora.integrations.bitsandbytes`: adopt ``bitsandbytes.nn.Linear4bit`` (NF4) layers in place, taking over
  their packed bytes and quantization state without requantizing; ``qlora.prepare_model`` uses it for a model loaded
  by transformers with ``BitsAndBytesConfig``. Imports bitsandbytes only when such layers exist.
- :mod:`qlora.integrations.peft`: ``enable(lora_config)`` registers qlora's LoRA layer with PEFT's custom-module
  dispatch, so ``peft.get_peft_model`` builds layers whose forward and backward run ``torch.ops.qlora.*``.
  Imports peft (and bitsandbytes) when imported.
- :mod:`qlora.hf_folder` (not here: it needs neither library) writes the model folder ``qlora quantize MODEL_DIR
  OUT_DIR`` produces.

None of these libraries is a dependency of ``qlora`` itself: install them with the ``integrations`` extra
(``pip install -e ".[integrations]"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["import_hub_kernels_package"]


def import_hub_kernels_package() -> None:
    """Make ``import kernels`` give the Hugging Face ``kernels`` distribution when this repository's own top-level
    ``kernels/`` folder (installed as ``qlora.kernels``) would shadow it.

    transformers >= 5 imports the Hub package ``kernels`` while it is imported itself. In a clone of this repository
    the folder ``kernels/`` sits at the root, and ``python -m pytest`` or ``python -c`` run from there put the root
    first on ``sys.path``, so ``import kernels`` finds the Triton kernels and transformers fails with an ImportError.
    This imports the installed distribution with the repository root left out of the search, once; it does nothing
    when ``kernels`` is already imported, when no distribution is installed, or when the repository folder is not
    what ``import kernels`` would find. ``qlora.kernels`` is unaffected (it is its own module name).
    """
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        return
    repo_kernels = os.path.dirname(os.path.abspath(sys.modules["qlora.kernels"].__file__)) \
        if "qlora.kernels" in sys.modules else None
    if repo_kernels is None or os.path.dirname(os.path.abspath(spec.origin)) != repo_kernels:
        return
    root = os.path.dirname(repo_kernels)
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
        try:
            importlib.import_module("kernels")
        except ImportError:
            # No Hub distribution installed: transformers then finds no `kernels` either (its availability check
            # reads the distribution's metadata), so leave nothing behind.
            sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
