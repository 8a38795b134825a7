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
