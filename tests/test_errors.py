"""Bad input gets a clear ValueError / TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import rlcore

from .helpers import BACKENDS, DEVICE

N, H, V = 6, 16, 50


def _args(**over):
    args = dict(
        hidden=torch.randn(N, H, device=DEVICE),
        weight=torch.randn(V, H, device=DEVICE),
        targets=torch.randint(0, V, (N,), device=DEVICE),
    )
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return args, kwargs


BAD = {
    # name: (overrides, exception, message fragment that names the argument)
    "hidden-not-tensor": (dict(hidden=[[1.0] * H] * N), TypeError, "hidden"),
    "hidden-int-dtype": (dict(hidden=torch.ones(N, H, dtype=torch.int32)), TypeError, "hidden"),
    "hidden-0d": (dict(hidden=torch.tensor(1.0), targets=torch.tensor(1)), ValueError, "hidden"),
    "weight-1d": (dict(weight=torch.randn(V)), ValueError, "weight"),
    "weight-H-mismatch": (dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
    "weight-empty-vocab": (dict(weight=torch.randn(0, H)), ValueError, "weight"),
    "targets-float": (dict(targets=torch.zeros(N)), TypeError, "targets"),
    "targets-bool": (dict(targets=torch.zeros(N, dtype=torch.bool)), TypeError, "targets"),
    "targets-shape": (dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, "targets"),
    "target-id-too-large": (dict(targets=torch.tensor([0, 1, V, 2, 3, 4])), ValueError, "targets"),
    "target-id-negative": (dict(targets=torch.tensor([0, 1, -1, 2, 3, 4])), ValueError, "targets"),
    "bias-shape": (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    "bias-int": (dict(bias=torch.zeros(V, dtype=torch.long)), TypeError, "bias"),
    "bias-dtype-not-weight": (dict(bias=torch.zeros(V, dtype=torch.bfloat16)), TypeError, "bias"),
    "precision-unknown": (dict(precision="fp8"), ValueError, "precision"),
    "backend-unknown": (dict(backend="cuda"), ValueError, "backend"),
    "temperature-zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError, "temperature"),
    "temperature-tiny": (dict(temperature=1e-39), ValueError, "temperature"),
    "temperature-tensor": (dict(temperature=torch.tensor(0.7)), TypeError, "temperature"),
    "ignore-index-float": (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    "mixed-dtype-default-precision": (dict(hidden=torch.randn(N, H).bfloat16()), TypeError, "precision='fp32'"),
    "mixed-fp32-hidden-bf16-head": (dict(weight=torch.randn(V, H).bfloat16(), precision="fp32"), TypeError,
                                    "float32 head"),
    "triton-float64": (dict(hidden=torch.randn(N, H, dtype=torch.float64),
                            weight=torch.randn(V, H, dtype=torch.float64), backend="triton"), TypeError, "float64"),
    "cpp-float64": (dict(hidden=torch.randn(N, H, dtype=torch.float64), weight=torch.randn(V, H, dtype=torch.float64),
                         backend="cpp"), TypeError, "float64"),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    over, exc, fragment = BAD[name]
    over = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in over.items()}
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        rlcore.linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_is_caught_on_every_backend(backend):
    """Validated before the kernel on each backend: no out-of-bounds read, the offending id is named."""
    args, _ = _args(targets=torch.tensor([0, 1, 2, 3, 4, 10_000], device=DEVICE))
    with pytest.raises(ValueError, match="10000"):
        rlcore.linear_logprobs(args["hidden"], args["weight"], args["targets"], backend=backend)


def test_custom_ignore_index_is_not_an_error():
    """An id equal to a custom ignore_index passes validation even though it lies outside [0, V)."""
    args, _ = _args(targets=torch.tensor([0, 1, 2, V + 7, 4, 5], device=DEVICE))
    logp = rlcore.linear_logprobs(args["hidden"], args["weight"], args["targets"], ignore_index=V + 7)
    assert logp[3] == 0 and torch.isfinite(logp).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (CPU and CUDA)")
def test_device_mismatch():
    args, _ = _args()
    with pytest.raises(ValueError, match="weight"):
        rlcore.linear_logprobs(args["hidden"].cuda(), args["weight"].cpu(), args["targets"].cuda())


def test_device_mismatch_meta():
    """Device mismatch without a GPU: a meta-device weight against CPU hidden states."""
    with pytest.raises(ValueError, match="weight"):
        rlcore.linear_logprobs(torch.randn(N, H), torch.randn(V, H, device="meta"), torch.zeros(N, dtype=torch.long))


def test_cpp_backend_needs_cpu_tensors():
    """backend='cpp' on another device names the device and the alternatives (meta stands in for CUDA)."""
    h, w = torch.randn(N, H, device="meta"), torch.randn(V, H, device="meta")
    with pytest.raises(ValueError, match="backend='cpp' needs CPU tensors"):
        rlcore.linear_logprobs(h, w, torch.zeros(N, dtype=torch.long, device="meta"), backend="cpp")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    """backend='triton' with CPU tensors outside the interpreter names the fix instead of crashing in a launch."""
    from rlcore.kernels import linear_logprobs as kernels

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setattr(kernels, "is_interpreter", lambda: False)
    args, _ = _args()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rlcore.linear_logprobs(args["hidden"], args["weight"], args["targets"], backend="triton")
