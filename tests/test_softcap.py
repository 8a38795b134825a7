"""``softcap=``: logit soft-capping ``cap(a) = c tanh(a / c)`` (Gemma 2/3) in ``linear_logprobs`` and
``fused_policy_loss``, against a float64 reference, with every gradient, on every backend: the chunked PyTorch path,
the compiled C++ backend (small tiles cross every tile boundary of it) and the Triton kernels' ``SOFTCAP`` variant
(in Triton's CPU interpreter without a GPU: small shapes, few examples). The NaN-padding property with a cap is in
``tests/test_nan_padding.py``."""

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcore
import rlcore.cpp
from rlcore.reference import linear_logprobs_reference

from .helpers import BACKENDS, DEVICE, compare, make_case, needs_cpp

# the interpreter runs each Triton program in numpy: the Triton examples are kept few
FEW = settings(max_examples=min(8, settings.default.max_examples))


def reference(h, w, b, t, temperature, softcap, ignore_index=-100):
    """float64 ``(logp, entropy)`` of ``log_softmax(cap(h w^T + b) / T)``, zero at ignored positions."""
    return linear_logprobs_reference(h, w, t, bias=b, temperature=temperature, ignore_index=ignore_index,
                                     return_entropy=True, compute_dtype=torch.float64, softcap=softcap)


@contextmanager
def tiles(rows, vocab):
    saved = rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB
    rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB = rows, vocab
    try:
        yield
    finally:
        rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB = saved


def check(backend, N, H, V, softcap, temperature, bias, dtype, seed, tol):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[1::4] = -100                                  # N = 1 keeps its one row
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    leaves = [x for x in (h, w, b) if x is not None]
    lp, ent = rlcore.linear_logprobs(h, w, t, bias=b, temperature=temperature, softcap=softcap, return_entropy=True,
                                     backend=backend)
    got = torch.autograd.grad((lp.double() * g_lp + ent.double() * g_ent).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rb = ref_leaves[2] if bias else None
    r_lp, r_ent = reference(ref_leaves[0], ref_leaves[1], rb, t, temperature, softcap)
    want = torch.autograd.grad((r_lp * g_lp + r_ent * g_ent).sum(), ref_leaves)
    for name, x, y in [("logp", lp, r_lp), ("entropy", ent, r_ent)] + [
            (f"d{n}", a, c) for n, a, c in zip(("hidden", "weight", "bias"), got, want)]:
        err = (x.double() - y).abs().max().item() / max(1.0, y.abs().max().item())
        assert err <= tol, f"{name}: error {err:.3g} > {tol} (backend={backend}, softcap={softcap})"


@given(N=st.integers(1, 40), H=st.sampled_from([1, 8, 33]), V=st.integers(1, 200),
       softcap=st.sampled_from([0.5, 2.0, 30.0]), temperature=st.sampled_from([1.0, 0.7]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chunked_float64_and_fp32(N, H, V, softcap, temperature, bias, seed):
    check("torch", N, H, V, softcap, temperature, bias, torch.float64, seed, 1e-12)
    check("torch", N, H, V, softcap, temperature, bias, torch.float32, seed, 2e-5)


@needs_cpp
@given(N=st.integers(1, 40), H=st.sampled_from([1, 16, 33]), V=st.integers(1, 200),
       softcap=st.sampled_from([0.5, 2.0, 30.0]), temperature=st.sampled_from([1.0, 0.7]), bias=st.booleans(),
       tile=st.sampled_from([(1, 7), (5, 64), (17, 1), (2048, 1024)]), seed=st.integers(0, 2**16))
def test_compiled_fp32_across_tiles(N, H, V, softcap, temperature, bias, tile, seed):
    assert rlcore.cpp.available(), rlcore.cpp.unavailable_reason()
    with tiles(*tile):
        check("cpp", N, H, V, softcap, temperature, bias, torch.float32, seed, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_torch_bf16(backend):
    """bf16 inputs: the error against float64 is at most PyTorch's own bf16 ``log_softmax`` of the capped logits."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(64, 32, generator=g).bfloat16().to(DEVICE)
    w = torch.randn(500, 32, generator=g).bfloat16().to(DEVICE)
    t = torch.randint(0, 500, (64,), generator=g).to(DEVICE)
    lp = rlcore.linear_logprobs(h, w, t, softcap=10.0, backend=backend)
    ref, _ = reference(h, w, None, t, 1.0, 10.0)
    z = (h @ w.T)
    torch_bf16 = (10.0 * torch.tanh(z / 10.0)).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)
    ours, theirs = (lp.double() - ref).abs().max(), (torch_bf16.double() - ref).abs().max()
    assert ours <= theirs * 1.01 + 1e-6, (ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_saturate_at_the_cap(backend):
    """Logits of +-1e4 saturate at +-c, and a -inf bias entry becomes -c (the models' own formula): the values and
    entropy match float64, every gradient is finite and matches too (the cap's slope is 0 there, not 0 * inf)."""
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.full((2, 4), 1e4), torch.full((2, 4), -1e4), torch.randn(2, 4, generator=g)])
    w = torch.randn(10, 4, generator=g)
    b = torch.randn(10, generator=g)
    b[3] = float("-inf")
    t = torch.tensor([0, 5, 9, 3, 2, -100])
    leaves = [x.to(DEVICE).requires_grad_() for x in (h, w, b)]
    lp, ent = rlcore.linear_logprobs(*leaves[:2], t.to(DEVICE), bias=leaves[2], softcap=5.0, backend=backend,
                                     return_entropy=True)
    got = torch.autograd.grad((lp.sum() + ent.sum()).double(), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (h, w, b)]
    r_lp, r_ent = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], t, 1.0, 5.0)
    want = torch.autograd.grad(r_lp.sum() + r_ent.sum(), ref_leaves)
    torch.testing.assert_close(lp.double().cpu(), r_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double().cpu(), r_ent, atol=1e-5, rtol=0)
    for name, x, y in zip(("dh", "dW", "db"), got, want):
        assert torch.isfinite(x).all(), f"{name}: non-finite on backend {backend!r}"
        torch.testing.assert_close(x.double().cpu(), y, atol=1e-5, rtol=1e-5, msg=f"{name} on backend {backend!r}")


@pytest.mark.parametrize("backend,strategy", [("torch", "auto"), ("torch", "two_pass"), ("torch", "single_pass"),
                                              ("triton", "two_pass"), ("triton", "single_pass")])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_fused_policy_loss_with_softcap(backend, strategy, entropy_coef):
    """``fused_policy_loss(softcap=c)`` equals ``policy_loss`` of the capped log-probs (the chunked backend's),
    values and gradients, with both strategies (the single pass forms the cap's slope from its slice's logits)."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 7, 16, 90
    h = torch.randn(B, T, H, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(V, H, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).to(DEVICE)
    old = -torch.rand(B, T, generator=g).to(DEVICE)
    head = dict(bias=b, softcap=3.0, temperature=0.8)
    out = rlcore.fused_policy_loss(h, w, t, adv, mask, old_logp=old, loss_type="ppo", strategy=strategy,
                                   backend=backend, entropy_coef=entropy_coef, **head)
    grads = torch.autograd.grad(out.loss, (h, w, b))
    lp, ent = rlcore.linear_logprobs(h, w, t, backend="torch", return_entropy=True, **head)
    ref = rlcore.policy_loss(lp * mask, adv, mask, old_logp=old, loss_type="ppo", entropy=ent,
                             entropy_coef=entropy_coef)
    want = torch.autograd.grad(ref.loss, (h, w, b))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for name, x, y in zip(("dh", "dW", "db"), grads, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=f"{name} ({backend}, {strategy})")


def test_bad_softcap():
    h, w, t = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="softcap must be finite and >= 0"):
        rlcore.linear_logprobs(h, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap must be finite"):
        rlcore.linear_logprobs(h, w, t, softcap=float("inf"))
    with pytest.raises(TypeError, match="softcap must be a Python float"):
        rlcore.linear_logprobs(h, w, t, softcap=True)
    with pytest.raises(TypeError, match="softcap must be a Python float"):
        rlcore.linear_logprobs(h, w, t, softcap=torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"softcap does not take several targets per position \(targets \[..., K\]\)"):
        rlcore.linear_logprobs(h, w, torch.tensor([[0, 1], [2, 3]]), softcap=2.0)
    with pytest.raises(ValueError, match="do not take a soft-capped student head"):   # the divergence has no cap
        rlcore.fused_policy_loss(h[None], w, t[None], torch.ones(1, 2), None, softcap=2.0, loss_type="opd",
                                 teacher_hidden=h[None], teacher_weight=w, backend="torch")


def test_zero_softcap_is_the_uncapped_head():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (9,), generator=g)
    assert torch.equal(rlcore.linear_logprobs(h, w, t, backend="torch"),
                       rlcore.linear_logprobs(h, w, t, softcap=0.0, backend="torch"))


# ---- the Triton kernels' SOFTCAP variant, judged by rlcore.validate's bar (FP32: 2e-5 of the largest value; bf16:
# normwise no worse than PyTorch's own bf16 computation of the capped head) -----------------------------------------


@FEW
@given(N=st.integers(1, 24), H=st.sampled_from([1, 16, 60]), V=st.integers(1, 300),
       dtype=st.sampled_from(["fp32", "bf16"]), precision=st.sampled_from(["default", "fp32"]),
       softcap=st.sampled_from([0.5, 2.0, 30.0]), temperature=st.sampled_from([1.0, 0.7]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_matches_float64(N, H, V, dtype, precision, softcap, temperature, bias, seed):
    case = make_case(N, H, V, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]), bias=bias,
                     ignore_frac=0.3, temperature=temperature, seed=seed, softcap=softcap)
    report = compare(case, "triton", precision)
    assert report.passed, "; ".join(report.failures)


# Hand-picked shapes: one row; H not a multiple of any block; V prime, below one tile, one past a forward span.
GRID = {"N1": dict(N=1, H=64, V=300, ignore_frac=0.0), "H60": dict(N=20, H=60, V=300, ignore_frac=0.2),
        "V509": dict(N=17, H=32, V=509, ignore_frac=0.2), "V5": dict(N=9, H=16, V=5, ignore_frac=0.2),
        "V257": dict(N=3, H=16, V=257, ignore_frac=0.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(GRID))
def test_triton_shape_grid(shape, dtype):
    case = make_case(**GRID[shape], dtype=dtype, bias=True, temperature=0.8, seed=1, softcap=4.0)
    report = compare(case, "triton")
    assert report.passed, "; ".join(report.failures)


def test_triton_entropy_is_the_capped_softmax_entropy():
    """The entropy is that of the capped distribution (a cap this tight flattens the softmax: the uncapped
    entropy differs by far more than the bar)."""
    case = make_case(6, 16, 100, bias=True, logit_scale=8.0, seed=4, softcap=1.0)
    ours = compare(case, "triton")
    assert ours.passed, "; ".join(ours.failures)
    h, w, t = case.hidden.detach(), case.weight.detach(), case.targets
    _, capped = reference(h, w, case.bias.detach(), t, 1.0, 1.0)
    _, uncapped = reference(h, w, case.bias.detach(), t, 1.0, 0.0)
    assert (capped - uncapped).abs().max() > 0.5
