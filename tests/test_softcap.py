"""``softcap=``: logit soft-capping ``cap(a) = c tanh(a / c)`` (Gemma 2/3) in ``linear_logprobs`` and
``fused_policy_loss``, against a float64 reference, with every gradient, on the chunked PyTorch and compiled C++
backends (small tiles cross every tile boundary of the latter); the Triton backend refuses it with a clear error."""

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcore
import rlcore.cpp

from .helpers import needs_cpp


def reference(h, w, b, t, temperature, softcap, ignore_index=-100):
    """float64 ``(logp, entropy)`` of ``log_softmax(cap(h w^T + b) / T)``, zero at ignored positions."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    ls = (z / temperature).log_softmax(-1)
    valid = t != ignore_index
    logp = ls.gather(-1, t.clamp(0).long()[..., None]).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


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
    t[::4] = -100
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


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_bf16_no_worse_than_torch_bf16(backend):
    """bf16 inputs: the error against float64 is at most PyTorch's own bf16 ``log_softmax`` of the capped logits."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(64, 32, generator=g).bfloat16()
    w = torch.randn(500, 32, generator=g).bfloat16()
    t = torch.randint(0, 500, (64,), generator=g)
    lp = rlcore.linear_logprobs(h, w, t, softcap=10.0, backend=backend)
    ref, _ = reference(h, w, None, t, 1.0, 10.0)
    z = (h @ w.T)
    torch_bf16 = (10.0 * torch.tanh(z / 10.0)).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)
    ours, theirs = (lp.double() - ref).abs().max(), (torch_bf16.double() - ref).abs().max()
    assert ours <= theirs * 1.01 + 1e-6, (ours, theirs)


def test_large_logits_saturate_at_the_cap():
    """Logits far beyond the cap saturate at +-c (no overflow, finite gradients)."""
    h = torch.full((3, 4), 1e4, requires_grad=True)
    w = torch.randn(10, 4)
    t = torch.tensor([0, 5, 9])
    lp = rlcore.linear_logprobs(h, w, t, softcap=5.0, backend="torch")
    ref, _ = reference(h.detach(), w, None, t, 1.0, 5.0)
    torch.testing.assert_close(lp.double(), ref, atol=1e-6, rtol=0)
    lp.sum().backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("strategy", ["auto", "two_pass"])
def test_fused_policy_loss_with_softcap(strategy):
    """``fused_policy_loss(softcap=c)`` equals ``policy_loss`` of the capped log-probs, values and gradients."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 7, 16, 90
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g)[:, None].expand(B, T)
    old = -torch.rand(B, T, generator=g)
    out = rlcore.fused_policy_loss(h, w, t, adv, mask, old_logp=old, loss_type="ppo", softcap=3.0,
                                   strategy=strategy, backend="torch", temperature=0.8)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    lp = rlcore.linear_logprobs(h, w, t, softcap=3.0, temperature=0.8, backend="torch")
    ref = rlcore.policy_loss(lp * mask, adv, mask, old_logp=old, loss_type="ppo")
    rh, rw = torch.autograd.grad(ref.loss, (h, w))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, rw, rtol=1e-5, atol=1e-7)


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
    with pytest.raises(ValueError, match="softcap is not supported on backend='triton'"):
        rlcore.linear_logprobs(h, w, t, softcap=2.0, backend="triton")
    with pytest.raises(ValueError, match="softcap is not supported on backend='triton'"):
        rlcore.fused_policy_loss(h[None], w, t[None], torch.ones(1, 2), None, softcap=2.0, backend="triton")
    with pytest.raises(ValueError, match="single_pass' does not take softcap"):
        rlcore.fused_policy_loss(h[None], w, t[None], torch.ones(1, 2), None, softcap=2.0, strategy="single_pass",
                                 backend="torch")


def test_zero_softcap_is_the_uncapped_head():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (9,), generator=g)
    assert torch.equal(rlcore.linear_logprobs(h, w, t, backend="torch"),
                       rlcore.linear_logprobs(h, w, t, softcap=0.0, backend="torch"))
