"""``torch.compile(fullgraph=True)`` of the public functions, static and dynamic: no graph break, the eager numbers,
and (dynamic) one graph for every length.

The temperature is a *traced argument* here, not a literal at the call site: that is what a training step compiled
once and called with the run's temperature looks like.
"""

import pytest
import torch

import rlcore
import rlcore.cpp


def _head(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 16, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(37, 16, generator=g).requires_grad_(True)
    t = torch.randint(0, 37, (n,), generator=g)
    t[0] = -100
    return h, w, t


def _logprobs_step(h, w, t, temperature):
    lp, ent = rlcore.linear_logprobs(h, w, t, temperature=temperature, return_entropy=True, backend="torch")
    return (lp * 1.5).sum() + 0.1 * ent.sum()


@pytest.mark.parametrize("dynamic", [False, True])
def test_linear_logprobs_traces_with_a_traced_temperature(dynamic):
    """fullgraph with the temperature an argument: values and both gradients equal eager. Under dynamic=True the
    lengths 5, 7, 9, 13 all run the first graph (a recompile raises); static shapes compile once per length."""
    torch._dynamo.reset()
    step = torch.compile(_logprobs_step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for i, n in enumerate((5, 7, 9, 13, 13)):
        h, w, t = _head(n, i)
        with torch._dynamo.config.patch(error_on_recompile=dynamic and i > 0):
            got = step(h, w, t, 0.7)
        gh, gw = torch.autograd.grad(got, [h, w])
        want = _logprobs_step(h, w, t, 0.7)
        eh, ew = torch.autograd.grad(want, [h, w])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gh, eh)
        torch.testing.assert_close(gw, ew)


def test_fused_loss_traces_before_the_compiled_backend_was_first_used(monkeypatch):
    """backend="auto" on CPU in a process that never used the compiled backend: tracing must not probe it (a lock
    and a possible build), so fullgraph holds; the op decides where it runs."""
    monkeypatch.setenv("RLCORE_CPP", "0")
    rlcore.cpp._reset()
    try:
        torch._dynamo.reset()
        h, w, t, mask, adv, old = _batch(6, 0)
        def auto_step(h, w, t, adv, mask, old):
            return rlcore.fused_policy_loss(h, w, t, adv, mask, old_logp=old, loss_type="gspo").loss

        step = torch.compile(auto_step, fullgraph=True, backend="aot_eager")
        args = (h, w, t, adv, mask, old)
        got = step(*args)
        torch.testing.assert_close(got, auto_step(*args))
    finally:
        rlcore.cpp._reset()


def test_importing_rlcore_imports_neither_dynamo_nor_triton():
    """TRITON_INTERPRET must be settable after ``import rlcore`` (rlcore.validate does so): nothing may import
    triton, or torch._dynamo (which imports it), at import time."""
    import subprocess
    import sys

    code = "import sys, rlcore, rlcore.cpp; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def _batch(T: int, seed: int, H: int = 16, V: int = 37):
    g = torch.Generator().manual_seed(seed)
    B = 3
    h = torch.randn(B, T, H, generator=g).requires_grad_(True)
    w = torch.randn(V, H, generator=g).requires_grad_(True)
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    old = -3.0 + 0.1 * torch.randn(B, T, generator=g)
    return h, w, t, mask, adv, old


def _policy_step(logp, adv, mask, old, eps_high):
    return rlcore.policy_loss(logp, adv, mask, old_logp=old, loss_type="gspo", eps_high=eps_high).loss


def _fused_step(h, w, t, adv, mask, old, eps_high):
    return rlcore.fused_policy_loss(h, w, t, adv, mask, old_logp=old, loss_type="cispo", eps_high=eps_high,
                                    entropy_coef=1e-3, backend="torch").loss


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("which", ["policy_loss", "fused_policy_loss"])
def test_losses_trace_with_traced_options(which, dynamic):
    """fullgraph with a float option (eps_high) an argument: the eager loss and gradients; under dynamic=True new
    lengths and new tensor values reuse the first graph (a recompile raises). A new value of a float option is a
    new graph: Dynamo specialises the Python floats that reach an op's scalar argument."""
    torch._dynamo.reset()
    fn = _policy_step if which == "policy_loss" else _fused_step
    step = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for i, (T, eps) in enumerate(((5, 0.28), (7, 0.28), (9, 0.28), (13, 0.28))):
        h, w, t, mask, adv, old = _batch(T, i)
        if which == "policy_loss":
            logp = (old.detach() + 0.2 * torch.randn(old.shape)).requires_grad_(True)
            args, wrt = (logp, adv, mask, old, eps), [logp]
        else:
            args, wrt = (h, w, t, adv, mask, old, eps), [h, w]
        with torch._dynamo.config.patch(error_on_recompile=dynamic and i > 0):
            got = step(*args)
        grads = torch.autograd.grad(got, wrt)
        want = fn(*args)
        torch.testing.assert_close(got, want)
        for a, b in zip(grads, torch.autograd.grad(want, wrt)):
            torch.testing.assert_close(a, b)
