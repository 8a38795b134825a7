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


def test_the_backend_probe_is_a_trace_time_constant(monkeypatch):
    """``cpp.available()`` (a lock and a possible build inside) inside a fullgraph function: answered once while
    tracing, no graph break."""
    monkeypatch.setenv("RLCORE_CPP", "0")
    rlcore.cpp._reset()
    try:
        torch._dynamo.reset()

        def pick(x):
            return x + 1 if rlcore.cpp.available() else x - 1

        assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(torch.ones(3)), torch.zeros(3))
    finally:
        rlcore.cpp._reset()
