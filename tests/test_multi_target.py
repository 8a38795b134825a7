"""``linear_logprobs`` with ``targets [..., K]``: the K log-probs of each position (and the entropy), values and every
gradient against the float64 materialised reference, on every backend, with repeated and ignored ids."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rlcore
from rlcore.multi_target import _logit_gaps_backward_op, _logit_gaps_op
from rlcore.reference import linear_logprobs_reference
from rlcore.validate import FP32_TOL, norm_err, rel_err

from .helpers import BACKENDS, DEVICE

IGNORE = -100


def _case(lead, H, V, K, dtype=torch.float32, *, bias=True, ignore_frac=0.2, repeat=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    h = torch.randn(*lead, H, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=gen) * 2 / H ** 0.5).to(DEVICE, dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(DEVICE, dtype) if bias else None
    t = torch.randint(0, V, (*lead, K), generator=gen)
    if repeat and K > 1:
        t[..., -1] = t[..., 0]                                   # the same id twice at every position
    t[torch.rand(t.shape, generator=gen) < ignore_frac] = IGNORE
    if t.numel():
        t.view(-1, K)[0] = IGNORE                                # a position whose ids are all ignored
    g = torch.randn(t.shape, generator=gen).to(DEVICE)
    g_ent = torch.randn(lead, generator=gen).to(DEVICE)
    return h, w, b, t.to(DEVICE), g, g_ent


def _grads(h, w, b, t, g, g_ent, fn, dtype=None):
    """Outputs and gradients of ``fn``; ``dtype`` casts the leaves first (float64 for the reference's gradients)."""
    leaves = [x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in (h, w, b) if x is not None]
    hh, ww = leaves[0], leaves[1]
    bb = leaves[2] if b is not None else None
    logp, ent = fn(hh, ww, bb, t)
    grads = torch.autograd.grad((logp * g.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), leaves)
    return [logp.detach(), ent.detach(), *grads]


def _reference(h, w, b, t, compute_dtype=torch.float64):
    """One materialised reference call per slot k; the entropy from the first valid slot of each position."""
    cast = (lambda x: x.to(compute_dtype)) if compute_dtype is not None else (lambda x: x)
    h, w = cast(h), cast(w)
    b = cast(b) if b is not None else None
    K = t.shape[-1]
    logps = [linear_logprobs_reference(h, w, t[..., k], bias=b, temperature=0.8, ignore_index=IGNORE,
                                       compute_dtype=compute_dtype) for k in range(K)]
    any_valid = (t != IGNORE).any(-1)
    _, ent = linear_logprobs_reference(h, w, torch.where(any_valid, 0, IGNORE), bias=b, temperature=0.8,
                                       ignore_index=IGNORE, return_entropy=True, compute_dtype=compute_dtype)
    return torch.stack(logps, -1), ent


def _per_slot(backend, h, w, b, t):
    """What multi-target log-probs replace: one single-target ``linear_logprobs`` call per slot."""
    kw = dict(bias=b, temperature=0.8, ignore_index=IGNORE, backend=backend)
    logp = torch.stack([rlcore.linear_logprobs(h, w, t[..., k], **kw) for k in range(t.shape[-1])], -1)
    _, ent = rlcore.linear_logprobs(h, w, torch.where((t != IGNORE).any(-1), 0, IGNORE), return_entropy=True, **kw)
    return logp, ent


def check(backend, h, w, b, t, g, g_ent):
    def ours(hh, ww, bb, tt):
        return rlcore.linear_logprobs(hh, ww, tt, bias=bb, temperature=0.8, ignore_index=IGNORE,
                                      return_entropy=True, backend=backend)

    def ref64(hh, ww, bb, tt):
        return _reference(hh, ww, bb, tt)

    out = _grads(h, w, b, t, g, g_ent, ours)
    ref = _grads(h, w, b, t, g, g_ent, ref64, torch.float64)
    half = h.dtype in (torch.bfloat16, torch.float16)
    own = _grads(h, w, b, t, g, g_ent, lambda *a: _reference(*a, compute_dtype=None)) if half else None
    per_slot = _grads(h, w, b, t, g, g_ent, lambda *a: _per_slot(backend, *a)) if half else None
    names = ["logp", "ent", "dh", "dW", "db"]
    for i, (x, r) in enumerate(zip(out, ref)):
        assert x.shape == r.shape and torch.isfinite(x).all(), names[i]
        if half:
            # no worse than PyTorch's own bf16, or than K single-target rlcore calls (each already rounds its
            # gradients to the head's dtype before autograd sums them, as the two ops of the multi-target path do)
            bar = max(norm_err(own[i], r), norm_err(per_slot[i], r), 2 * norm_err(r.to(x.dtype), r)) + 1e-7
            assert norm_err(x, r) <= bar, f"{names[i]}: {norm_err(x, r):.3e} > {bar:.3e}"
        else:
            bar = FP32_TOL["logp"] if i < 2 else FP32_TOL["dh"]
            assert rel_err(x, r) <= bar, f"{names[i]}: {rel_err(x, r):.3e} > {bar:.3e}"
    logp = out[0]
    assert (logp[t == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 7, 64])
def test_k_targets_match_float64(backend, K):
    check(backend, *_case(11, 60, 301, K, seed=K))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12)   # K reference calls per example: kept few (the fixed-K test above covers K = 64)
@given(N=st.integers(1, 20), H=st.sampled_from([1, 16, 60]), V=st.integers(1, 300), K=st.integers(1, 9),
       dtype=st.sampled_from(["fp32", "bf16"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64_hypothesis(backend, N, H, V, K, dtype, bias, seed):
    # A bf16/fp16 head's dW and db are the sum of two ops' gradients, each already rounded to the head's dtype (the
    # log-probs kernel's at the row's base id, the gaps op's scatter). Where the two nearly cancel, which takes a base
    # id of probability ~1/2 (a vocabulary of a few entries), that sum can be an ulp off the exact one (seen at V = 3
    # and 5 with H = 1): half-precision examples keep V >= 32. FP32 heads have no such limit.
    assume(dtype == "fp32" or V >= 32)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    check(backend, *_case(N, H, V, K, dt, bias=bias, seed=seed))


def test_leading_dims_and_k1_shapes():
    h, w, b, t, _, _ = _case((3, 4), 16, 50, 5, seed=1)
    logp, ent = rlcore.linear_logprobs(h, w, t, bias=b, ignore_index=IGNORE, return_entropy=True)
    assert logp.shape == (3, 4, 5) and ent.shape == (3, 4)
    plain = rlcore.linear_logprobs(h, w, t[..., 1], bias=b, ignore_index=IGNORE)
    assert plain.shape == (3, 4)                                       # [...] targets: today's shape exactly
    assert torch.allclose(rlcore.linear_logprobs(h, w, t[..., 1:2], bias=b, ignore_index=IGNORE)[..., 0], plain,
                          atol=1e-5)


def test_empty_input():
    h, w, b, t, _, _ = _case(0, 16, 50, 3, seed=1)
    logp, ent = rlcore.linear_logprobs(h, w, t, return_entropy=True, ignore_index=IGNORE)
    assert logp.shape == (0, 3) and ent.shape == (0,)


def test_ignored_rows_holding_nan_carry_no_gradient():
    h, w, b, t, g, g_ent = _case(6, 16, 40, 4, ignore_frac=0.0, seed=2)
    t[2] = IGNORE
    h = h.clone()
    h[2] = float("nan")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp = rlcore.linear_logprobs(hh, ww, t, ignore_index=IGNORE, backend="torch")
    (logp * g).sum().backward()
    assert (logp[2] == 0).all() and torch.isfinite(ww.grad).all() and (hh.grad[2] == 0).all()


@pytest.mark.parametrize("bad, match", [
    (lambda t: t.fill_(50), "targets"), (lambda t: t.fill_(-3), "targets"),
])
def test_ids_out_of_range_raise(bad, match):
    h, w, b, t, _, _ = _case(4, 16, 50, 3, seed=1)
    with pytest.raises(ValueError, match=match):
        rlcore.linear_logprobs(h, w, bad(t.clone()), ignore_index=IGNORE)


def test_bad_shapes_raise():
    h, w, b, t, _, _ = _case(4, 16, 50, 3, seed=1)
    with pytest.raises(ValueError, match="targets"):
        rlcore.linear_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="K >= 1"):
        rlcore.linear_logprobs(h, w, t[:, :0])


def test_opcheck_logit_gaps():
    h, w, b, t, g, _ = _case(7, 16, 40, 5, seed=3)
    valid = t != IGNORE
    ids = torch.where(valid, t, 0)
    base = ids[:, 1]
    torch.library.opcheck(_logit_gaps_op, (h, w, b, ids, base, valid, 0.8, t, IGNORE, True))
    torch.library.opcheck(_logit_gaps_backward_op, (g, h, w, b, ids, base, valid, 0.8, [True, True, True]))


def test_torch_compile_fullgraph():
    h, w, b, t, g, _ = _case(7, 16, 40, 5, seed=4)

    def loss(hh, ww):
        return (rlcore.linear_logprobs(hh, ww, t, bias=b, ignore_index=IGNORE, backend="torch") * g).sum()

    h1, w1, h2, w2 = (x.clone().requires_grad_() for x in (h, w, h, w))
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(h1, w1).backward()
    loss(h2, w2).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6) and torch.allclose(w1.grad, w2.grad, atol=1e-6)
