"""Rows that carry no gradient contribute exactly nothing, on every backend, even when their hidden state is NaN/inf.

Left padding under some attention masks leaves NaN or inf in the hidden states of positions no loss reads. Those
rows have ``ignore_index`` targets (or a zero upstream gradient); a zero ``dz`` row multiplied into the dW GEMM would
still give ``0 * NaN = NaN`` for the whole of ``dW``. rlcore promises that padding may hold anything: the gradients
of such a case equal those of the same case with the padding rows zeroed (checked against float64), ``dh`` of a
padding row is exactly 0, and nothing is non-finite. The Triton backend is checked with both backward GEMM choices
(``RLCORE_BWD_GEMM``: its own GEMMs, and torch's ``mm``, which is cuBLAS on a GPU).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from .helpers import BACKENDS, DEVICE, compare, make_case  # noqa: F401

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
POISON = (float("nan"), float("inf"), float("-inf"))


def _poisoned(N, H, V, dtype, bias, seed, zero_grad_rows, softcap=0.0):
    """A case with 30% ignored rows whose hidden states hold NaN / +-inf, and (optionally) valid rows with a zero
    upstream gradient that hold NaN too. Returns ``(case, clean hidden, dead-row mask)``."""
    case = make_case(N, H, V, dtype, bias=bias, ignore_frac=0.3, temperature=0.7, seed=seed, softcap=softcap)
    gen = torch.Generator().manual_seed(seed + 1)
    dead = (case.targets == case.ignore_index).cpu()
    if zero_grad_rows:
        quiet = (~dead) & (torch.rand(N, generator=gen) < 0.25)
        case.g_logp[quiet.to(case.g_logp.device)] = 0.0
        case.g_ent[quiet.to(case.g_ent.device)] = 0.0
        dead = dead | quiet
    clean = case.hidden.detach().clone()
    poisoned = case.hidden.detach().clone()
    for i in dead.nonzero().squeeze(1).tolist():
        poisoned[i, i % H] = POISON[i % 3]
        if i % 2:
            poisoned[i] = float("nan")
    case.hidden.data.copy_(poisoned)
    return case, clean, dead


def _grads(case, backend, mask_rows):
    """Gradients of ``sum(g_logp logp + g_ent ent)`` over the rows of ``mask_rows`` only (a masked loss: the
    poisoned rows' forward outputs may be NaN, the loss never reads them)."""
    from rlcore import linear_logprobs

    for x in (case.hidden, case.weight, case.bias):
        if x is not None:
            x.grad = None
    logp, ent = linear_logprobs(case.hidden, case.weight, case.targets, bias=case.bias,
                                temperature=case.temperature, return_entropy=True, backend=backend,
                                softcap=case.softcap)
    keep = mask_rows.to(logp.device)
    loss = (torch.where(keep, logp * case.g_logp, 0.0) + torch.where(keep, ent * case.g_ent, 0.0)).sum()
    loss.backward()
    out = {"dh": case.hidden.grad, "dW": case.weight.grad}
    if case.bias is not None:
        out["db"] = case.bias.grad
    return out


def _reference(case, clean, mask_rows):
    """Float64 gradients of the same masked loss with the poisoned rows zeroed."""
    from rlcore.reference import linear_logprobs_reference

    h = clean.double().requires_grad_()
    w = case.weight.detach().double().requires_grad_()
    b = case.bias.detach().double().requires_grad_() if case.bias is not None else None
    logp, ent = linear_logprobs_reference(h, w, case.targets, bias=b, temperature=case.temperature,
                                          return_entropy=True, compute_dtype=torch.float64, softcap=case.softcap)
    keep = mask_rows.to(logp.device)
    g_lp, g_ent = case.g_logp.double(), case.g_ent.double()
    (torch.where(keep, logp * g_lp, 0.0) + torch.where(keep, ent * g_ent, 0.0)).sum().backward()
    out = {"dh": h.grad, "dW": w.grad}
    if b is not None:
        out["db"] = b.grad
    return out


def _check(case, clean, dead, backend, fp32_tol=2e-5):
    grads = _grads(case, backend, ~dead)
    ref = _reference(case, clean, ~dead)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite entries on backend {backend!r}"
    assert (grads["dh"][dead.to(grads["dh"].device)] == 0).all(), "dh of a row without gradient must be exactly 0"
    tol = fp32_tol if case.hidden.dtype == torch.float32 else 2e-2
    for name, g in grads.items():
        err = (g.double() - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-30)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol} on backend {backend!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bias", [False, True])
def test_padding_rows_holding_nan_contribute_nothing(backend, dtype, bias):
    case, clean, dead = _poisoned(37, 60, 203, DTYPES[dtype], bias, seed=3, zero_grad_rows=False)
    _check(case, clean, dead, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_zero_gradient_holding_nan_contribute_nothing(backend):
    case, clean, dead = _poisoned(29, 33, 150, torch.float32, True, seed=5, zero_grad_rows=True)
    _check(case, clean, dead, backend)


@pytest.mark.parametrize("gemm", ["triton", "torch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_backward_gemm_choices(monkeypatch, gemm, dtype):
    """Both backward GEMM choices of the Triton backend: NaN padding, and (clean inputs) the float64 bar."""
    monkeypatch.setenv("RLCORE_BWD_GEMM", gemm)
    case, clean, dead = _poisoned(41, 64, 260, DTYPES[dtype], True, seed=7, zero_grad_rows=True)
    _check(case, clean, dead, "triton")
    report = compare(make_case(33, 48, 300, DTYPES[dtype], bias=True, ignore_frac=0.3, temperature=0.7, seed=2),
                     "triton", "default")
    assert report.passed, "; ".join(report.failures)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_softcap_rows_holding_nan_contribute_nothing(backend, dtype):
    """With a soft cap too: a dead row's NaN reaches neither its capped logits' slope nor any gradient."""
    case, clean, dead = _poisoned(37, 60, 203, DTYPES[dtype], True, seed=3, zero_grad_rows=True, softcap=2.0)
    _check(case, clean, dead, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_and_poisoned(backend):
    """All rows ignored and NaN: every gradient is exactly zero."""
    case, clean, dead = _poisoned(9, 16, 40, torch.float32, True, seed=11, zero_grad_rows=False)
    case.targets[:] = case.ignore_index
    case.hidden.data[:] = float("nan")
    grads = _grads(case, backend, torch.zeros(9, dtype=torch.bool))
    for name, g in grads.items():
        assert (g == 0).all(), f"{name} must be exactly 0 when no row carries gradient ({backend!r})"


@pytest.mark.parametrize("backend", BACKENDS)
@given(N=st.integers(1, 40), V=st.integers(2, 300), seed=st.integers(0, 2**16), bias=st.booleans())
def test_poisoned_padding_hypothesis(backend, N, V, seed, bias):
    """Random shapes: the NaN-free, zero-``dh`` property exactly, the values at 1e-4 (a tiny vocabulary with one
    dominant entry leaves gradients of ``1 - p`` whose FP32 cancellation alone exceeds the fixed cases' 2e-5 bar;
    V = 1 is left out, every gradient is then 0 up to rounding)."""
    case, clean, dead = _poisoned(N, 24, V, torch.float32, bias, seed=seed, zero_grad_rows=True)
    if bool(dead.all()):
        return
    _check(case, clean, dead, backend, fp32_tol=1e-4)
