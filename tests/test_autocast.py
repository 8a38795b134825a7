"""An enclosing ``torch.autocast`` changes nothing rlcore computes: the ops run the heads in the dtypes their precision
modes state, on every backend. Before the ops turned autocast off, the chunked path's GEMMs ran in bf16 under it
(log-prob errors of ~5e-2 at H = 256), while the Triton and compiled kernels did not: the same call gave different
numbers by backend. Each case runs with and without autocast and must give identical values and gradients."""

import pytest
import torch

import rlcore

from .helpers import BACKENDS, DEVICE

N, H, V = 24, 64, 300


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(h=torch.randn(N, H, generator=g), w=torch.randn(V, H, generator=g) * 0.3,
             ht=torch.randn(N, H, generator=g), wt=torch.randn(V, H, generator=g) * 0.3,
             targets=torch.randint(0, V, (N,), generator=g), adv=torch.randn(N, generator=g),
             old=-torch.rand(N, generator=g) * 5)
    return {k: v.to(DEVICE) for k, v in t.items()}


def _both(fn):
    """``fn()``'s outputs and the gradients of their sum to ``h`` and ``w``: without autocast, then under it."""
    results = []
    for on in (False, True):
        t = _tensors()
        h, w = t["h"].requires_grad_(), t["w"].requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=on):
            outs = fn(h, w, t)
        total = sum(o.float().sum() for o in outs if o.requires_grad)
        grads = torch.autograd.grad(total, (h, w)) if isinstance(total, torch.Tensor) else ()
        results.append([o.detach() for o in outs] + list(grads))
    return results


def _assert_identical(fn):
    plain, autocast = _both(fn)
    for i, (a, b) in enumerate(zip(plain, autocast)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}: max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs(backend):
    _assert_identical(lambda h, w, t: rlcore.linear_logprobs(h, w, t["targets"], return_entropy=True,
                                                             backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_target_logprobs(backend):
    ids = torch.arange(N * 3, device=DEVICE).reshape(N, 3) % V
    _assert_identical(lambda h, w, t: (rlcore.linear_logprobs(h, w, ids, backend=backend),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["per_token", "mean", "top_k"])
def test_linear_divergence(backend, variant):
    kw = dict(reduction="mean") if variant == "mean" else dict(top_k=5) if variant == "top_k" else {}
    _assert_identical(lambda h, w, t: (rlcore.linear_divergence(h, w, t["ht"], t["wt"], kind="jsd", backend=backend,
                                                                **kw),))


@pytest.mark.parametrize("strategy, backend", [("two_pass", "torch"), ("single_pass", "torch"),
                                               ("two_pass", "triton"), ("single_pass", "triton"),
                                               pytest.param("two_pass", "cpp", marks=BACKENDS[2].marks)])
def test_fused_policy_loss(strategy, backend):
    def fn(h, w, t):
        B = (2, N // 2)
        out = rlcore.fused_policy_loss(h.view(*B, H), w, t["targets"].view(B), t["adv"].view(B), None,
                                       old_logp=t["old"].view(B), loss_type="ppo", strategy=strategy,
                                       backend=backend)
        return (out.loss,)
    _assert_identical(fn)
