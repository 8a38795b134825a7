"""What every rlcore Triton kernel module shares: whether Triton interprets them on CPU."""

import os

__all__ = ["is_interpreter"]

# Triton decides between compiling and interpreting when it decorates a kernel, i.e. when the kernel modules are
# first imported; they import this module first, so this reads the same environment.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_interpreter() -> bool:
    """True when rlcore's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were first
    imported; changing the variable later changes nothing)."""
    return _INTERPRETED


def _interpreter_index_compat() -> None:
    """Triton 3.6's interpreter (the one torch 2.11 ships) turns a scalar tensor into a Python index with
    ``int(array)``; its scalars are shape-(1,) arrays, which NumPy >= 2.4 refuses to convert, so any loop whose bound
    is computed in the kernel (``range(0, n)`` with ``n`` a tensor) raises ``TypeError``. Triton 3.7+ converts
    ``array.squeeze()``; this gives 3.6 the same conversion. Interpreter only: compiled kernels never see it."""
    try:
        import numpy as np
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    major_minor = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if major_minor >= (3, 7) or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


if _INTERPRETED:
    _interpreter_index_compat()
