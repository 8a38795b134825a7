"""Peak extra memory of forward + backward is O(N + V H), never O(N V): measured, not assumed.

CPU: PyTorch's allocator events replayed from the profiler (``rlcore.memory.peak_memory``); CUDA: the caching
allocator's peak. The materialised reference is measured in the same way for the ratio.
"""

import functools

import pytest
import torch

import rlcore
from rlcore.memory import peak_memory
from rlcore.reference import linear_logprobs_reference

from .helpers import DEVICE, needs_cpp

FP32 = 4


def _fwd_bwd(fn, N, H, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(DEVICE)

    def run():
        logp, ent = fn(h, w, t)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return None

    peak, _ = peak_memory(run, DEVICE)
    return peak


def _rlcore(backend):
    return lambda h, w, t: rlcore.linear_logprobs(h, w, t, return_entropy=True, backend=backend)


def _reference(h, w, t):
    return linear_logprobs_reference(h, w, t, return_entropy=True, compute_dtype=None)


# (backend, H, V, N small, N large): the interpreter is slow, so its shapes are small.
SHAPES = {"torch": (64, 16000, 512, 4096), "triton": (16, 2000, 64, 256), "cpp": (64, 16000, 512, 4096)}
CPP = pytest.param("cpp", marks=needs_cpp)


@pytest.mark.parametrize("backend", ["torch", "triton", CPP])
def test_peak_grows_with_N_like_N_times_H_not_N_times_V(backend):
    H, V, n1, n2 = SHAPES[backend]
    p1 = _fwd_bwd(_rlcore(backend), n1, H, V)
    p2 = _fwd_bwd(_rlcore(backend), n2, H, V)
    growth = p2 - p1                                     # bytes added by (n2 - n1) more rows
    logits_growth = (n2 - n1) * V * FP32                 # what a single [N, V] fp32 tensor would add
    per_row_budget = 16 * H * FP32 + 64                  # dh (fp32 and output dtype), h grad, per-row stats
    assert growth <= (n2 - n1) * per_row_budget, (
        f"{backend}: {(n2 - n1)} more rows added {growth / 2**20:.1f} MiB; O(N H) allows "
        f"{(n2 - n1) * per_row_budget / 2**20:.1f} MiB, one [N, V] tensor would add {logits_growth / 2**20:.1f} MiB"
    )


@functools.cache
def _reference_peak(N, H, V):
    """Measured once per session: the slowest part of the test, and the same for every backend."""
    return _fwd_bwd(_reference, N, H, V)


@pytest.mark.parametrize("backend", ["torch", CPP])
def test_peak_is_a_small_fraction_of_the_reference(backend):
    """N = 8192, V = 32000, fp32 (H = 64 to keep it quick): the chunked path's (or the compiled backend's) peak
    against the materialised reference's, in the same run."""
    H, V, N = 64, 32000, 8192
    ours = _fwd_bwd(_rlcore(backend), N, H, V)
    ref = _reference_peak(N, H, V)
    assert ref > 3 * N * V * FP32 * 0.9, "the reference should hold several [N, V] tensors"
    assert ours / ref < 0.1, f"rlcore {ours / 2**20:.1f} MiB vs reference {ref / 2**20:.1f} MiB"
