"""Test helpers: the case builder, runs and error metrics live in ``rlcore.validate`` (one implementation for the
tests and ``python -m rlcore.validate``); here they are bound to the test device."""

from functools import partial

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
