"""The one place where Triton versions differ for this package (tested: triton 3.6 and the newest).

Triton 3.6's interpreter turns every runtime int argument into a one-element NumPy array and reads a scalar
used as a ``range`` bound with ``int(array)``, which NumPy >= 2.4 refuses for arrays of one dimension (later
Triton squeezes first). Kernels loop ``for d0 in range(0, D, BLOCK_D)`` as the Triton tutorials do, so under
that interpreter the scalar's ``__index__`` is given the later behaviour, inside Triton's own per-launch
patch scope (it is undone with the rest of the launch's patches). Compiled kernels are not touched.
"""

from __future__ import annotations

import numpy as np


def _needs_index_fix(interpreter) -> bool:
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:
        return False
    import inspect

    try:
        source = inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    return "int(self.handle.data)" in source


def install_interpreter_fixes() -> bool:
    """Apply the fixes the running Triton's interpreter needs; True when one was applied. Idempotent."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_qlora_index_fix", False) or not _needs_index_fix(interpreter):
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._qlora_index_fix = True
    return True
