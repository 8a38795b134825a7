"""The op is registered with torch.library: opcheck passes, and torch.compile(fullgraph=True) traces through it."""

import pytest
import torch

import rlcore
from rlcore.logprobs import _linear_logprobs_op

from .helpers import BACKENDS, DEVICE, make_case



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck(backend, bias):
    """Schema, fake (meta) implementation, autograd registration and dispatch, checked by PyTorch's own tool."""
    case = make_case(9, 16, 40, torch.float32, bias=bias, ignore_frac=0.2, seed=1)
    args = (case.hidden, case.weight, case.bias, case.targets.view(-1), 0.8, -100, "default", backend, True)
    torch.library.opcheck(_linear_logprobs_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_backward(backend, layout):
    """The backward op on its own, including transposed hidden / weight: its fake must report the contiguous
    gradients the real op returns (a mismatch crashes inductor on a head stored as [H, V] and passed as .T)."""
    from rlcore.logprobs import _linear_logprobs_backward_op

    case = make_case(9, 16, 40, torch.float32, bias=True, ignore_frac=0.2, seed=1)
    h, w = case.hidden.detach(), case.weight.detach()
    if layout == "transposed":
        h, w = h.T.contiguous().T, w.T.contiguous().T
    t = case.targets.view(-1)
    _, _, stats = _linear_logprobs_op(h, w, case.bias.detach(), t, 0.8, -100, "default", backend, True)
    args = (case.g_logp.view(-1), case.g_ent.view(-1), h, w, case.bias.detach(), t, stats, 0.8, -100, "default",
            backend, True, True, True)
    torch.library.opcheck(_linear_logprobs_backward_op, args)


def _loss(h, w, b, t):
    logp, ent = rlcore.linear_logprobs(h, w, t, bias=b, temperature=0.9, return_entropy=True)
    return (logp * 0.5).sum() - 0.01 * ent.mean()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    """No graph break (fullgraph=True raises on one), and the compiled forward and backward match eager."""
    torch._dynamo.reset()
    case = make_case(2 * 7, 32, 90, torch.float32, bias=True, ignore_frac=0.2, seed=2, lead=(2, 7))
    eager = _loss(case.hidden, case.weight, case.bias, case.targets)
    g_eager = torch.autograd.grad(eager, case.leaves)
    # Compile afresh: inductor's on-disk cache keys graphs without the custom op's schema, so a graph cached by an
    # older checkout would be replayed against the current op. (config.patch, not monkeypatch: pytest >= 9.2's undo
    # deletes attributes that torch's config module does not keep in its __dict__.)
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(_loss, fullgraph=True, backend=compiler)
        out = compiled(case.hidden, case.weight, case.bias, case.targets)
        g_out = torch.autograd.grad(out, case.leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b)


def test_compile_inductor_with_a_transposed_head():
    """A head stored as [H, V] and passed as weight.T (tied embeddings, some checkpoints) compiles and matches."""
    torch._dynamo.reset()
    case = make_case(12, 16, 40, torch.float32, bias=True, seed=3)
    w_t = case.weight.detach().T.contiguous().requires_grad_()          # [H, V] storage

    def loss(h, w_t, b, t):
        return _loss(h, w_t.T, b, t)

    eager = torch.autograd.grad(loss(case.hidden, w_t, case.bias, case.targets), [case.hidden, w_t])
    with torch._inductor.config.patch(force_disable_caches=True):  # see test_compile_fullgraph_matches_eager
        compiled = torch.compile(loss, fullgraph=True, backend="inductor")
        out = torch.autograd.grad(compiled(case.hidden, w_t, case.bias, case.targets), [case.hidden, w_t])
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)


def test_internal_stats_output_is_not_differentiable():
    """The op's third output (lse, raw entropy) is bookkeeping for the backward: autograd must not treat it as a
    differentiable result whose gradient would be silently dropped."""
    case = make_case(5, 8, 20, torch.float32, seed=4)
    _, _, stats = _linear_logprobs_op(case.hidden, case.weight, None, case.targets, 1.0, -100, "default", "torch",
                                      True)
    assert not stats.requires_grad


def test_compile_dynamic_shapes_no_recompile_per_length():
    """Sequence lengths vary in RL: with dynamic shapes one graph serves every N."""
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, n in enumerate((5, 9, 17)):
        case = make_case(n, 16, 50, torch.float32, bias=True, seed=n)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(case.hidden, case.weight, case.bias, case.targets)
        torch.testing.assert_close(out, _loss(case.hidden, case.weight, case.bias, case.targets))


def test_fake_tensor_shapes():
    """Meta tensors: the fake implementation gives the right shapes and dtypes without computing anything."""
    h = torch.empty(4, 6, 32, device="meta", dtype=torch.bfloat16)
    w = torch.empty(100, 32, device="meta", dtype=torch.bfloat16)
    t = torch.empty(4, 6, device="meta", dtype=torch.long)
    logp, ent = rlcore.linear_logprobs(h, w, t, return_entropy=True, backend="torch")
    assert logp.shape == (4, 6) and ent.shape == (4, 6) and logp.dtype == torch.float32
    assert DEVICE.type in ("cpu", "cuda")
