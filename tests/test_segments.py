"""``rlcore.segments``: sums over packed sequences and their adjoint, the broadcast, on both backends.

Values and gradients (``torch.autograd.grad``) are compared with a plain Python loop over the segments in float64.
The Triton kernels run in the CPU interpreter here, with the small interpreter config of ``kernels/segments.py``
(``BLOCK_K = 2``, ``BLOCK_N = 8``): segments longer than 8 tokens take several loop steps, and ``K = 3`` leaves a
partial row block.

Bars:
- The broadcast copies values, so it (and the sum's gradient, a broadcast) must be exact.
- A sum of ``n`` terms in any order is within ``(n - 1) u sum|x|`` of the exact sum (``u`` the unit roundoff of the
  accumulator: FP32, float64 for float64 input); results returned in bf16 add one rounding of the result (2^-7
  relative: the interpreter's fp32 -> bf16 cast truncates, where the GPU's rounds to nearest).
"""

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlcore.segments import (_segment_broadcast_op, _segment_sum_op, check_cu_seqlens, segment_broadcast,
                             segment_ids, segment_sum)

from .conftest import HAS_CUDA
from .helpers import DEVICE

BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
OFFSETS = {"i32": torch.int32, "i64": torch.int64}
_ACC_EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-24}
_OUT_REL = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-7}


# --- the float64 reference ----------------------------------------------------------------------------------------


def reference_sum(x: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """``x [..., N]`` -> ``[..., B]`` in float64, one segment at a time (differentiable)."""
    return torch.stack([x.double()[..., a:b].sum(-1) for a, b in pairwise(cu)], -1)


def reference_broadcast(s: torch.Tensor, cu: list[int], N: int) -> torch.Tensor:
    """``s [..., B]`` -> ``[..., N]`` in float64, 0 outside every segment (differentiable)."""
    pieces, t = [], 0
    for b, (a, e) in enumerate(pairwise(cu)):
        if a > t:
            pieces.append(s.new_zeros(s.shape[:-1] + (a - t,), dtype=torch.float64))
        pieces.append(s[..., b:b + 1].double().expand(s.shape[:-1] + (e - a,)))
        t = max(t, e)
    pieces.append(s.new_zeros(s.shape[:-1] + (N - t,), dtype=torch.float64))
    return torch.cat(pieces, -1)


def assert_sum_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, cu: list[int]):
    """``out`` (a segment sum of ``x`` in ``out.dtype``) is within the summation bound of the float64 ``ref``."""
    assert out.dtype == x.dtype and out.shape == ref.shape
    n_max = max([b - a for a, b in pairwise(cu)] + [1])
    bound = n_max * _ACC_EPS[x.dtype] * reference_sum(x.detach().abs(), cu) + _OUT_REL[x.dtype] * ref.abs()
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess error {(err - bound).max().item():.3e}"


def make_cu(lengths: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=DEVICE), cu


def run_case(backend, lengths, K, dtype, offsets, seed, transposed=False):
    """Forward and backward of both ops against the reference. ``K=None`` is the 1-D form ``[N] -> [B]``."""
    g = torch.Generator().manual_seed(seed)
    cu_t, cu = make_cu(lengths, offsets)
    N, B = cu[-1], len(lengths)
    lead = () if K is None else (K,)

    def rand(*shape):
        return torch.randn(*lead, *shape, generator=g).to(DEVICE, dtype)

    x = rand(N)
    if transposed and K is not None:  # a [K, N] view of [N, K] storage: strides (1, K)
        x = x.T.contiguous().T
    x.requires_grad_()
    s = rand(B).requires_grad_()
    g_sum, g_bcast = rand(B), rand(N)

    out = segment_sum(x, cu_t, backend=backend)                                  # [K, B] / [B]
    assert_sum_close(out, reference_sum(x.detach(), cu), x, cu)
    (dx,) = torch.autograd.grad(out, x, g_sum)                                   # a broadcast: exact
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference_sum(x64, cu), x64, g_sum.double())
    assert dx.dtype == x.dtype
    torch.testing.assert_close(dx.double(), dx_ref, rtol=0, atol=0)

    out = segment_broadcast(s, cu_t, N, backend=backend)                         # [K, N] / [N]: exact
    assert out.dtype == s.dtype
    torch.testing.assert_close(out.double(), reference_broadcast(s.detach(), cu, N), rtol=0, atol=0)
    (ds,) = torch.autograd.grad(out, s, g_bcast)                                 # a segment sum of g_bcast
    s64 = s.detach().double().requires_grad_()
    (ds_ref,) = torch.autograd.grad(reference_broadcast(s64, cu, N), s64, g_bcast.double())
    assert_sum_close(ds, ds_ref, g_bcast, cu)


# --- values and gradients -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6),   # 0: empty sequences; > 8: several Triton steps
    K=st.sampled_from([None, 1, 3]),                                 # None: the 1-D form; 3: a partial row block
    dtype=st.sampled_from(list(DTYPES)),
    offsets=st.sampled_from(list(OFFSETS)),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(backend, lengths, K, dtype, offsets, transposed, seed):
    run_case(backend, lengths, K, DTYPES[dtype], OFFSETS[offsets], seed, transposed)


# Hand-picked packings, each for a reason.
GRID = {
    "N1-single-token": dict(lengths=[1], K=None),
    "B1-one-sequence": dict(lengths=[13], K=2),
    "all-empty-N0": dict(lengths=[0, 0, 0], K=2),                     # N = 0: sums are 0, broadcast is [K, 0]
    "empty-at-both-ends": dict(lengths=[0, 5, 0, 3, 0], K=None),
    "exact-interpreter-blocks": dict(lengths=[8, 16, 7, 9], K=4),      # multiples of BLOCK_N = 8, and one past
    "K5-three-row-blocks": dict(lengths=[3, 11, 1], K=5),
    "long-segment": dict(lengths=[2, 70, 1], K=1),                     # one program walks 9 chunks
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets", list(OFFSETS))
@pytest.mark.parametrize("case", list(GRID), ids=list(GRID))
def test_packing_grid(backend, offsets, case):
    run_case(backend, dtype=torch.float32, offsets=OFFSETS[offsets], seed=1, **GRID[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_sequences(backend):
    """B = 0 (``cu_seqlens = [0]``): empty sums, and a broadcast of nothing over N = 0 tokens."""
    cu = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    assert segment_sum(torch.zeros(2, 0, device=DEVICE), cu, backend=backend).shape == (2, 0)
    assert segment_broadcast(torch.zeros(0, device=DEVICE), cu, 0, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_outside_the_segments(backend):
    """Unchecked offsets that do not cover ``[0, N)``: tokens outside count nowhere and are broadcast 0, and an end
    past N is clamped (no out-of-bounds read), on both backends alike."""
    x = torch.arange(1.0, 11.0, device=DEVICE)                                  # [10]
    cu = torch.tensor([2, 5, 7], device=DEVICE)
    torch.testing.assert_close(segment_sum(x, cu, backend=backend), torch.tensor([12.0, 13.0], device=DEVICE))
    out = segment_broadcast(torch.tensor([1.0, 2.0], device=DEVICE), cu, 10, backend=backend)
    torch.testing.assert_close(out, torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 0, 0.0], device=DEVICE))
    cu_long = torch.tensor([0, 3, 50], device=DEVICE)                              # ends past N = 10
    torch.testing.assert_close(segment_sum(x, cu_long, backend=backend), torch.tensor([6.0, 49.0], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(backend):
    """Both ops and their double backward (each op's backward is the other op) against finite differences."""
    cu = torch.tensor([0, 3, 3, 7, 12], device=DEVICE)
    x = torch.randn(2, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: segment_sum(x, cu, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda s: segment_broadcast(s, cu, 12, backend=backend), (s,))
    assert torch.autograd.gradgradcheck(lambda x: segment_sum(x, cu, backend=backend) ** 2, (x,))


def test_segment_ids():
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32, device=DEVICE)
    ids = segment_ids(cu, 6)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [0, 0, 2, 2, 2, 3]
    assert segment_ids(cu.long(), 0).shape == (0,)


def test_auto_backend():
    """``backend="auto"`` is Triton for CUDA tensors and PyTorch otherwise: bitwise the same results."""
    cu = torch.tensor([0, 4, 9], device=DEVICE)
    x, s = torch.randn(9, device=DEVICE), torch.randn(2, device=DEVICE)
    expected = "triton" if DEVICE.type == "cuda" else "torch"
    torch.testing.assert_close(segment_sum(x, cu), segment_sum(x, cu, backend=expected), rtol=0, atol=0)
    torch.testing.assert_close(segment_broadcast(s, cu, 9), segment_broadcast(s, cu, 9, backend=expected),
                               rtol=0, atol=0)


# --- cu_seqlens validation and argument checks ----------------------------------------------------------------------

BAD_CU = {
    # name: (cu_seqlens, num_tokens, exception, message fragment)
    "not-a-tensor": ([0, 2, 4], 4, TypeError, "cu_seqlens must be a torch.Tensor"),
    "float-offsets": (torch.tensor([0.0, 2.0]), 2, TypeError, "int32 or int64"),
    "int16-offsets": (torch.tensor([0, 2], dtype=torch.int16), 2, TypeError, "int32 or int64"),
    "2-d": (torch.tensor([[0, 2]]), 2, ValueError, "1-D"),
    "empty": (torch.tensor([], dtype=torch.long), 0, ValueError, "at least one element"),
    "nonzero-start": (torch.tensor([1, 3, 5]), 5, ValueError, "must start at 0"),
    "decreasing": (torch.tensor([0, 4, 3, 6]), 6, ValueError, r"must be non-decreasing, got cu_seqlens\[1\] = 4"),
    "wrong-end": (torch.tensor([0, 2, 4]), 5, ValueError, "must end at N=5"),
    "negative-num-tokens": (torch.tensor([0]), -1, ValueError, "num_tokens must be >= 0"),
    "float-num-tokens": (torch.tensor([0, 2]), 2.0, TypeError, "num_tokens must be an int"),
}


@pytest.mark.parametrize("name", list(BAD_CU), ids=list(BAD_CU))
def test_check_cu_seqlens_rejects(name):
    cu, n, exc, fragment = BAD_CU[name]
    with pytest.raises(exc, match=fragment):
        check_cu_seqlens(cu.to(DEVICE) if isinstance(cu, torch.Tensor) else cu, n)


def test_check_cu_seqlens_names_the_argument():
    with pytest.raises(ValueError, match="my_offsets must end at N=3"):
        check_cu_seqlens(torch.tensor([0, 2], device=DEVICE), 3, name="my_offsets")


@pytest.mark.parametrize("cu, n", [([0], 0), ([0, 0, 0], 0), ([0, 0, 3, 3, 5], 5), ([0, 7], 7)],
                         ids=["B0", "all-empty", "empty-inside", "B1"])
@pytest.mark.parametrize("offsets", list(OFFSETS))
def test_check_cu_seqlens_accepts(cu, n, offsets):
    check_cu_seqlens(torch.tensor(cu, dtype=OFFSETS[offsets], device=DEVICE), n)


BAD_ARGS = {
    "x-int": (lambda cu: segment_sum(torch.ones(4, dtype=torch.long), cu), TypeError, "x must be"),
    "x-3d": (lambda cu: segment_sum(torch.ones(1, 1, 4), cu), ValueError, "x must have shape"),
    "cu-float": (lambda cu: segment_sum(torch.ones(4), cu.float()), TypeError, "cu_seqlens must be an int32"),
    "cu-2d": (lambda cu: segment_sum(torch.ones(4), cu[None]), ValueError, "cu_seqlens must be a 1-D"),
    "backend-unknown": (lambda cu: segment_sum(torch.ones(4), cu, backend="cuda"), ValueError, "backend"),
    "s-wrong-B": (lambda cu: segment_broadcast(torch.ones(3), cu, 4), ValueError, "B = len"),
    "num-tokens-float": (lambda cu: segment_broadcast(torch.ones(2), cu, 4.0), TypeError, "num_tokens"),
    "num-tokens-negative": (lambda cu: segment_broadcast(torch.ones(2), cu, -1), ValueError, "num_tokens"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_bad_arguments_raise(name):
    fn, exc, fragment = BAD_ARGS[name]
    with pytest.raises(exc, match=fragment):
        fn(torch.tensor([0, 1, 4]))


# --- torch.library, torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets", list(OFFSETS))
def test_opcheck(backend, offsets):
    """Schema, fake implementation, autograd registration and dispatch of both ops, by PyTorch's own tool."""
    cu = torch.tensor([0, 3, 3, 10, 12], dtype=OFFSETS[offsets], device=DEVICE)
    x = torch.randn(2, 12, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_segment_sum_op, (x, cu, backend))
    torch.library.opcheck(_segment_broadcast_op, (s, cu, 12, backend))


def _gspo_like(logp, old_logp, adv, cu):
    """A GSPO-shaped use: sequence ratio from the mean token log-ratio, spread back over the tokens."""
    N = logp.shape[-1]
    lengths = (cu[1:] - cu[:-1]).clamp_min(1).to(logp.dtype)                            # [B]
    seq_ratio = torch.exp(segment_sum(logp - old_logp, cu) / lengths)                   # [B]
    return -(segment_broadcast(seq_ratio * adv, cu, N) * logp.exp()).sum()


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    """No graph break (fullgraph=True raises on one), dynamic lengths without recompiling, compiled forward and
    backward equal to eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_gspo_like, fullgraph=True, backend=backend, dynamic=True)
    for i, lengths in enumerate(([3, 0, 5], [4, 9, 1, 2], [7, 7, 7, 7, 2])):
        cu, _ = make_cu(lengths, torch.int32)
        N, B = int(cu[-1]), len(lengths)
        logp = torch.randn(N, device=DEVICE, requires_grad=True)
        old, adv = torch.randn(N, device=DEVICE), torch.randn(B, device=DEVICE)
        eager = _gspo_like(logp, old, adv, cu)
        (g_eager,) = torch.autograd.grad(eager, logp)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(logp, old, adv, cu)
        (g_out,) = torch.autograd.grad(out, logp)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(g_out, g_eager)


def test_fake_tensor_shapes():
    x = torch.empty(3, 40, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(6, device="meta", dtype=torch.int32)
    out = segment_sum(x, cu, backend="torch")
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16
    assert segment_broadcast(out, cu, 40, backend="triton").shape == (3, 40)


@pytest.mark.skipif(not HAS_CUDA, reason="host syncs only exist with a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_on_cuda(backend):
    """Forward and backward of both ops never synchronize with the host (sync debug mode turns one into an error)."""
    cu = torch.tensor([0, 5, 5, 300, 301], dtype=torch.int32, device="cuda")
    x = torch.randn(2, 301, device="cuda", requires_grad=True)
    s = torch.randn(2, 4, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = segment_sum(x, cu, backend=backend)
        z = segment_broadcast(s, cu, 301, backend=backend)
        torch.autograd.backward([y, z], [torch.ones_like(y), torch.ones_like(z)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
