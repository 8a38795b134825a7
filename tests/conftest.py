"""Test setup: on a machine without CUDA, the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before ``rlcore.kernels`` is first imported (Triton reads it when the kernels are
decorated), hence here, at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


def pytest_configure(config):
    # The interpreter evaluates both sides of tl.where in numpy; the discarded side may overflow or be 0 * inf.
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:triton\..*")

# The interpreter runs each Triton program in numpy: examples are kept few and small, and never timed.
settings.register_profile(
    "rlcore", deadline=None, max_examples=int(os.environ.get("RLCORE_HYPOTHESIS_EXAMPLES", "30")),
    suppress_health_check=[HealthCheck.too_slow], derandomize=True, print_blob=True,
)
settings.load_profile("rlcore")


@pytest.fixture(autouse=True)
def _cpp_backend_is_really_built(request):
    """A test of ``backend="cpp"`` that runs (it is skipped where no compiler exists) must run the compiled
    kernels: without this, a broken build would fall back to the chunked path and pass silently."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpp":
        import rlcore.cpp

        assert rlcore.cpp.available(), f"the compiled CPU backend did not build: {rlcore.cpp.unavailable_reason()}"
