"""Values and every gradient of ``rlcore.linear_logprobs`` against the float64 materialised reference.

Every backend runs here: the chunked PyTorch path, the Triton kernels (compiled on a GPU, in Triton's CPU
interpreter otherwise; see conftest.py), and the compiled CPU backend (``rlcore.cpp``, on CPU tensors; its multi-tile
paths are exercised with small tiles in test_cpp_backend.py). Upstream gradients reach ``logp`` and ``entropy`` at once, so one backward
checks both terms of the kernel's ``dz``.

Bars:
The bar is ``rlcore.validate.compare``, shared with ``python -m rlcore.validate``:
- FP32-accurate modes (fp32 inputs, ``precision="fp32"``, float64): relative error ~1e-5 of the largest value.
- Half-precision inputs: the normwise error against float64 must be no worse than PyTorch's own computation in the
  same dtype (``rlcore.reference`` with ``compute_dtype=None``: bf16 logits, FP32 log-softmax, bf16 autograd).
  Normwise (||x - ref|| / ||ref||), because a max over a few elements of two bf16-rounded results is a coin toss.
  Results returned in a half dtype cannot beat the rounding of the exact answer to that dtype; within twice that
  floor (one rounding step of slack) a tiny case passes even where PyTorch happens to round luckier.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import BACKENDS, FP32_TOL, compare, errors, make_case, run_reference, run_rlcore

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def check_against_float64(case, backend, precision):
    report = compare(case, backend, precision)
    assert report.passed, "; ".join(report.failures)


RANDOM_CASES = dict(
    N=st.integers(1, 48),
    H=st.sampled_from([1, 16, 33, 60, 64, 72]),
    V=st.integers(1, 520),                         # up to 3 vocabulary spans of 256 in the Triton forward
    dtype=st.sampled_from(list(DTYPES)),
    precision=st.sampled_from(["default", "tf32", "fp32"]),
    temperature=st.sampled_from([1.0, 0.7, 1.6]),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)


def check_random_case(backend, N, H, V, dtype, precision, temperature, bias, ignore_frac, seed):
    case = make_case(N, H, V, DTYPES[dtype], bias=bias, ignore_frac=ignore_frac, temperature=temperature, seed=seed)
    check_against_float64(case, backend, precision)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@given(**RANDOM_CASES)
def test_matches_float64(backend, **case):
    check_random_case(backend, **case)


# the interpreter runs each Triton program in numpy (about 1.4 s an example): half the examples of the others
@settings(max_examples=(settings.default.max_examples + 1) // 2)
@given(**RANDOM_CASES)
def test_triton_matches_float64(**case):
    check_random_case("triton", **case)


# Hand-picked shapes, each for a reason.
GRID = {
    "N1-single-token": dict(N=1, H=64, V=300),
    "H60-not-a-block-multiple": dict(N=20, H=60, V=300),
    "V509-prime": dict(N=17, H=32, V=509),
    "V5-below-one-tile": dict(N=9, H=16, V=5),
    "V257-span-plus-one": dict(N=3, H=16, V=257),   # a second forward span holding a single vocabulary entry
    "leading-dims-3x5": dict(N=None, H=32, V=100, lead=(3, 5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(GRID), ids=list(GRID))
def test_shape_grid(backend, dtype, shape):
    case = make_case(**GRID[shape], dtype=DTYPES[dtype], bias=True, ignore_frac=0.2, temperature=0.8, seed=1)
    check_against_float64(case, backend, "default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_dtype", ["bf16", "fp16"])
def test_fp32_head_with_half_activations(backend, h_dtype):
    """precision="fp32" with bf16/fp16 hidden states and an FP32 head (the MiniMax-M1 fix) is FP32-accurate."""
    case = make_case(23, 48, 333, DTYPES[h_dtype], w_dtype=torch.float32, bias=True, temperature=0.9, seed=3)
    report = compare(case, backend, "fp32")
    assert report.passed, "; ".join(report.failures)
    # Everything returned in FP32 met the FP32 bar (dh, in the activations' dtype, met the half-precision one)...
    assert all(report.bars[k][0] == "rel" for k in ("logp", "ent", "dW", "db"))
    # ...and is far more accurate than PyTorch computing the head in the activations' dtype.
    ref = run_reference(case)
    torch_own = errors(run_reference(case, compute_dtype=None), ref)
    assert report.rel["logp"] < torch_own["logp"] / 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outputs", ["logp-only", "entropy-only"])
def test_gradient_from_one_output(backend, outputs):
    """Only one output reaches the loss: the other's gradient arrives as None and its term must vanish."""
    use_logp, use_ent = outputs == "logp-only", outputs == "entropy-only"
    case = make_case(21, 40, 300, torch.float32, bias=True, ignore_frac=0.2, temperature=0.7, seed=4)
    ref = run_reference(case, use_logp=use_logp, use_ent=use_ent)
    out = run_rlcore(case, backend=backend, use_logp=use_logp, use_ent=use_ent)
    err = errors(out, ref)
    for k, tol in FP32_TOL.items():
        assert err[k] <= tol, f"{k}: {err[k]:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided hidden (a transposed view) and weight (a column slice) go through the kernels' strides."""
    base = make_case(19, 70, 260, torch.float32, bias=True, ignore_frac=0.1, seed=5)
    hidden = base.hidden.detach().T.contiguous().T.requires_grad_()     # stride (1, N)
    weight = torch.cat([base.weight.detach(), torch.randn_like(base.weight)], 1)[:, :70].requires_grad_()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    case = type(base)(hidden, weight, base.targets, base.bias, base.g_logp, base.g_ent)
    check_against_float64(case, backend, "default")


def test_float64_gradcheck():
    """The custom autograd formula (torch backend, float64) against finite differences, both outputs."""
    case = make_case(5, 6, 11, torch.float64, bias=True, temperature=0.7, seed=6)
    targets = case.targets.clone()
    targets[1] = -100

    def fn(h, w, b):
        import rlcore

        return rlcore.linear_logprobs(h, w, targets, bias=b, temperature=0.7, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (case.hidden, case.weight, case.bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    """Every backend gives the chunked path's numbers on FP32 inputs (a cross-check independent of the reference)."""
    import rlcore

    case = make_case(33, 64, 400, torch.float32, bias=True, ignore_frac=0.2, temperature=1.3, seed=7)
    a = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, bias=case.bias, temperature=1.3,
                               return_entropy=True, backend=backend)
    b = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, bias=case.bias, temperature=1.3,
                               return_entropy=True, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_gradient_and_the_other_is_exact(backend, frozen):
    """A frozen LM head (LoRA-style RL) skips the dW GEMM; frozen hidden states skip dh. The other stays exact."""
    import rlcore

    case = make_case(19, 40, 300, torch.float32, bias=False, ignore_frac=0.2, temperature=0.9, seed=8)
    ref = run_reference(case)
    getattr(case, frozen).requires_grad_(False)
    live = case.hidden if frozen == "weight" else case.weight
    logp, ent = rlcore.linear_logprobs(case.hidden, case.weight, case.targets, temperature=0.9, return_entropy=True,
                                       backend=backend)
    (grad,) = torch.autograd.grad((logp * case.g_logp).sum() + (ent * case.g_ent).sum(), [live])
    expected = ref["dh"] if frozen == "weight" else ref["dW"]
    assert errors({"g": grad}, {"g": expected})["g"] <= 5e-5
    assert getattr(case, frozen).grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_precision_backward_of_half_inputs_keeps_dz_in_fp32(backend):
    """precision="fp32" with bf16 inputs: gradients limited by the final bf16 rounding alone (dz is not rounded)."""
    case = make_case(29, 64, 400, torch.bfloat16, bias=True, ignore_frac=0.1, temperature=0.8, seed=9)
    report = compare(case, backend, "fp32")
    assert report.passed, report.failures
    from rlcore.validate import norm_err
    ref = run_reference(case)
    for k in ("dh", "dW"):
        floor = norm_err(ref[k].to(torch.bfloat16), ref[k])   # rounding the exact gradient to bf16
        assert report.norm[k] <= 1.2 * floor, f"{k}: {report.norm[k]:.3e} vs rounding floor {floor:.3e}"
