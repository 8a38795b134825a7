"""Edge cases give correct numbers, never NaN: empty input, all targets ignored, huge logits, masked vocabulary."""

import pytest
import torch

import rlcore

from .helpers import (BACKENDS, DEVICE, Case, errors, make_case, norm_err, norm_errors, run_reference,
                      run_rlcore)
from .test_linear_logprobs import FP32_TOL



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["N0", "2x0", "0x3"])
def test_empty_input(backend, lead):
    hidden = torch.randn(*lead, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    targets = torch.zeros(lead, dtype=torch.long, device=DEVICE)
    logp, ent = rlcore.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    assert logp.shape == lead and ent.shape == lead and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_targets_ignored(backend, dtype):
    case = make_case(13, 24, 70, dtype, bias=True, ignore_frac=1.0, seed=2)
    assert (case.targets == -100).all()
    out = run_rlcore(case, backend=backend)
    for k, v in out.items():
        assert torch.equal(v, torch.zeros_like(v)), f"{k} must be exactly 0 when every target is ignored"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", [0, 2, 3])
def test_logits_of_1e4(backend, dtype, seed):
    """Logits of magnitude ~1e4: no overflow, no NaN, log-probs exact to FP32.

    An FP32 logit of 1e4 carries ~1e-3 absolute rounding, so the entropy of a nearly one-hot row is ill-conditioned
    for any FP32 computation: its bar is PyTorch computing the same in FP32 (within 1.5x). Seeds 2 and 3 have rows
    with two competing top logits, where that matters; PyTorch in bf16 gives entropies off by up to 1e11 there.
    """
    case = make_case(11, 32, 300, dtype, bias=False, ignore_frac=0.2, logit_scale=1e4, seed=seed)
    ref = run_reference(case)
    assert ref["logp"].abs().max() > 1e3  # the case really has huge logits
    out = run_rlcore(case, backend=backend)
    for k, v in out.items():
        assert torch.isfinite(v).all(), f"non-finite {k}"
    ours = norm_errors(out, ref)
    torch_fp32 = norm_errors(run_reference(case, compute_dtype=torch.float32), ref)
    assert ours["logp"] <= 1e-6
    assert ours["ent"] <= 1.5 * torch_fp32["ent"] + 1e-6
    if dtype == torch.float32:
        assert max(ours["dh"], ours["dW"]) <= 1e-6
    else:
        torch_own = norm_errors(run_reference(case, compute_dtype=None), ref)
        for k in ("dh", "dW"):
            assert ours[k] <= max(torch_own[k], 2 * norm_err(ref[k].to(dtype), ref[k])), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf_bias(backend):
    """-inf bias entries mask vocabulary out: a whole 256-wide forward span, whole tiles and scattered entries.

    Masked entries have probability 0, contribute 0 to the entropy, and get exactly 0 gradient in W and b.
    """
    V = 700
    case = make_case(17, 32, V, torch.float32, bias=True, ignore_frac=0.2, temperature=0.8, seed=4)
    masked = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    masked[0:300] = True                     # spans [0, 256) entirely: a vocabulary split that sees only -inf
    masked[400:700:7] = True
    with torch.no_grad():
        case.bias[masked] = float("-inf")
    keep = (~masked).nonzero().squeeze(1)
    case.targets = torch.where(case.targets == -100, case.targets, keep[case.targets % keep.numel()])
    ref = run_reference(case)
    out = run_rlcore(case, backend=backend)
    for k, v in out.items():
        assert not torch.isnan(v).any(), f"NaN in {k}"
    err = errors(out, ref)
    for k, tol in FP32_TOL.items():
        assert err[k] <= tol, f"{k}: {err[k]:.3e}"
    assert torch.equal(out["dW"][masked], torch.zeros_like(out["dW"][masked]))
    assert torch.equal(out["db"][masked], torch.zeros_like(out["db"][masked]))


def test_int64_scale_on_the_chunked_path():
    """N * V > 2^31 logits (8.6 GB if materialised in FP32) on the chunked path, in bounded memory and exact.

    H = 1 keeps the GEMMs trivial, and the rows are built so that the answer is known in closed form: every row has
    the same hidden state, so every row has the same distribution, and each row's target takes a different id.
    """
    from rlcore.memory import peak_memory

    N, V = 2**16, 2**15 + 1                     # N * V = 2_147_549_184 > 2^31
    assert N * V > 2**31
    hidden = torch.ones(N, 1)
    weight = torch.linspace(-3, 3, V).unsqueeze(1)
    targets = torch.arange(N) % V
    peak, (logp, ent) = peak_memory(lambda: rlcore.linear_logprobs(hidden, weight, targets, return_entropy=True,
                                                                   backend="torch"))
    z = weight.squeeze(1).double()
    ref_logp = torch.log_softmax(z, 0)
    ref_ent = -(ref_logp.exp() * ref_logp).sum()
    torch.testing.assert_close(logp.double(), ref_logp[targets], rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent.expand(N), rtol=0, atol=2e-5)
    from rlcore.chunked import CHUNK_ELEMENTS

    budget = 6 * CHUNK_ELEMENTS * 4 + 64 * N   # a few [C, V] fp32 temporaries plus per-row outputs
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB: the chunked path must not grow with N * V"


def test_case_dataclass_roundtrip():
    """Guard for the helpers: Case.leaves lists hidden, weight and bias in that order."""
    case = make_case(2, 4, 5, bias=True)
    assert isinstance(case, Case) and [x.shape for x in case.leaves] == [(2, 4), (5, 4), (5,)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_targets_and_bias(backend):
    """Targets and bias that are views (every other column of a batch, a stride-0 expansion) give the same numbers
    as their contiguous copies: the kernels index them with unit stride, so the op makes them contiguous first."""
    case = make_case(12, 16, 300, torch.float32, bias=True, ignore_frac=0.2, seed=11)
    wide = torch.stack([case.targets, torch.zeros_like(case.targets)], 1)       # [N, 2]
    strided_t = wide[:, 0]                                                        # stride 2
    strided_b = torch.stack([case.bias.detach(), torch.zeros_like(case.bias)], 1)[:, 0].requires_grad_()
    assert strided_t.stride() == (2,) and strided_b.stride() == (2,)
    ref = run_rlcore(case, backend="torch")
    view_case = Case(case.hidden, case.weight, strided_t, strided_b, case.g_logp, case.g_ent)
    out = run_rlcore(view_case, backend=backend)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)

    bias0 = torch.full((1,), 0.3, device=DEVICE).expand(300)                    # stride 0
    t0 = torch.full((1,), 7, device=DEVICE).expand(12)
    a = rlcore.linear_logprobs(case.hidden, case.weight, t0, bias=bias0, backend=backend)
    b = rlcore.linear_logprobs(case.hidden, case.weight, t0.contiguous(), bias=bias0.contiguous(), backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_may_be_edited_in_place(backend):
    """A loss that masks the returned entropy (or log-probs) in place still backpropagates correctly."""
    case = make_case(10, 16, 50, torch.float32, seed=12)
    mask = (torch.arange(10, device=DEVICE) % 2).float()
    logp, ent = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, return_entropy=True, backend=backend)
    ent.mul_(mask)
    logp.mul_(mask)
    (logp.sum() + ent.sum()).backward()
    h_grad = case.hidden.grad.clone()
    case.hidden.grad = None
    logp, ent = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, return_entropy=True, backend=backend)
    ((logp * mask).sum() + (ent * mask).sum()).backward()
    torch.testing.assert_close(h_grad, case.hidden.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size(backend):
    """H = 0: every logit is the bias, so log-probs are log_softmax(bias) (uniform without one)."""
    V = 6
    hidden = torch.zeros(4, 0, device=DEVICE)
    weight = torch.zeros(V, 0, device=DEVICE)
    targets = torch.tensor([0, 1, 2, 5], device=DEVICE)
    logp = rlcore.linear_logprobs(hidden, weight, targets, backend=backend)
    torch.testing.assert_close(logp, torch.full((4,), -torch.log(torch.tensor(float(V))).item(), device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_targets_off_skips_the_check_without_reading_out_of_bounds(backend):
    """check_targets=False (no host sync) on valid ids gives the same numbers; on a bad id it does not crash."""
    case = make_case(8, 16, 40, torch.float32, seed=13)
    a = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, backend=backend, check_targets=False)
    b = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, backend=backend)
    torch.testing.assert_close(a, b)
    bad = case.targets.clone()
    bad[0] = 10_000
    out = rlcore.linear_logprobs(case.hidden, case.weight, bad, backend=backend, check_targets=False)
    torch.testing.assert_close(out[1:], b[1:])
