"""Test helpers: the case builder, runs and error metrics live in ``rlcore.validate`` (one implementation for the
tests and ``python -m rlcore.validate``); here they are bound to the test device."""

import os
import shutil
from functools import partial
from typing import Optional

import pytest
import torch

from rlcore import validate
from rlcore.validate import (FP32_TOL, HALF, TF32_TOL, Case, compare, norm_err, rel_err, run_reference,  # noqa: F401
                             run_rlcore)

from .conftest import HAS_CUDA

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
make_case = partial(validate.make_case, device=DEVICE)


def errors(out: dict, ref: dict) -> dict:
    return {k: rel_err(out[k], ref[k]) for k in ref}


def norm_errors(out: dict, ref: dict) -> dict:
    return {k: norm_err(out[k], ref[k]) for k in ref}


def cpp_skip_reason() -> Optional[str]:
    """Why the compiled CPU backend cannot be tested here, or ``None``. A machine with a compiler and ninja must build
    it: there, a failed build fails the tests (``conftest.py``) instead of skipping them."""
    from torch.utils.cpp_extension import is_ninja_available

    if DEVICE.type != "cpu":
        return "the compiled backend runs on CPU tensors; this run's test tensors are on CUDA"
    if os.environ.get("RLCORE_CPP") == "0":
        return "the compiled backend is turned off by RLCORE_CPP=0"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler on PATH to build the compiled CPU backend"
    if not is_ninja_available():
        return "torch.utils.cpp_extension needs ninja to build the compiled CPU backend"
    return None


CPP_SKIP = cpp_skip_reason()
needs_cpp = pytest.mark.skipif(CPP_SKIP is not None, reason=CPP_SKIP or "")
# Every backend of linear_logprobs, for parametrisation: "cpp" skips (with the reason) where it cannot build.
BACKENDS = ["torch", "triton", pytest.param("cpp", marks=needs_cpp)]
