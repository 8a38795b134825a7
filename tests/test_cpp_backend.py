"""The compiled CPU backend (``backend="cpp"``, ``csrc/linear_logprobs_cpu.cpp``) beyond the shared backend tests.

- Its tiling: with tiles of a few rows and vocabulary entries, small cases cross every boundary the default
  2048 x 1024 tiles only cross at real sizes (several vocabulary and row tiles, partial vector lane groups, targets
  and -inf bias in later tiles, a bf16 head's per-tile dW write).
- Both GEMM routes (oneDNN, ``at::mm``), bitwise determinism, and the dispatch: ``"auto"`` runs it on CPU, and
  ``torch.compile`` sees the one op.
- Its absence: a failed build or ``RLCORE_CPP=0`` falls back to the chunked path, with a one-line notice on first use
  (the former) and never an error.
"""

import functools
import os
import subprocess
import sys
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcore
import rlcore.cpp

from rlcore import validate

from .helpers import FP32_TOL, compare, errors, needs_cpp, run_reference, run_rlcore

make_case = functools.partial(validate.make_case, device="cpu")   # this backend's tensors, on any test machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def cpp_built():
    """The extension, built (the tests needing it are skipped where no compiler exists; elsewhere it must build)."""
    assert rlcore.cpp.available(), f"the compiled CPU backend did not build: {rlcore.cpp.unavailable_reason()}"
    return rlcore.cpp.load()


@contextmanager
def small_tiles(rows, vocab):
    """The backend's tile sizes (rows, vocabulary entries) within the block."""
    saved = rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB
    rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB = rows, vocab
    try:
        yield
    finally:
        rlcore.cpp.TILE_ROWS, rlcore.cpp.TILE_VOCAB = saved


@pytest.fixture
def tiles():
    """``tiles(rows, vocab)`` sets the tile sizes until the test ends."""
    stack = ExitStack()
    with stack:
        yield lambda rows, vocab: stack.enter_context(small_tiles(rows, vocab))


@needs_cpp
@given(
    N=st.integers(1, 70),
    H=st.sampled_from([1, 16, 33, 64]),
    V=st.integers(1, 300),
    tile_rows=st.sampled_from([1, 5, 16, 17, 40]),
    tile_vocab=st.sampled_from([1, 7, 64, 100]),
    dtype=st.sampled_from(list(DTYPES)),
    temperature=st.sampled_from([1.0, 0.7]),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_small_tiles_match_float64(cpp_built, N, H, V, tile_rows, tile_vocab, dtype, temperature, bias,
                                   ignore_frac, seed):
    case = make_case(N, H, V, DTYPES[dtype], bias=bias, ignore_frac=ignore_frac, temperature=temperature, seed=seed)
    with small_tiles(tile_rows, tile_vocab):
        report = compare(case, "cpp", "default")
    assert report.passed, "; ".join(report.failures)


@needs_cpp
def test_mixed_half_hidden_fp32_head_across_tiles(cpp_built, tiles):
    """bf16 activations under an FP32 head with precision='fp32': FP32-accurate, dh returned in bf16."""
    tiles(8, 50)
    case = make_case(23, 48, 333, torch.bfloat16, w_dtype=torch.float32, bias=True, temperature=0.9, seed=3)
    report = compare(case, "cpp", "fp32")
    assert report.passed, "; ".join(report.failures)
    assert all(report.bars[k][0] == "rel" for k in ("logp", "ent", "dW", "db"))


@needs_cpp
def test_masked_tiles_and_huge_logits(cpp_built, tiles):
    """-inf bias over whole vocabulary tiles (including the first one a row sees) and logits of 1e4: no NaN,
    masked entries get exactly zero gradient."""
    tiles(5, 32)
    V = 300
    case = make_case(17, 32, V, torch.float32, bias=True, ignore_frac=0.2, logit_scale=1e4, seed=4)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[0:96] = True                 # the first three tiles entirely
    masked[150:300:7] = True
    with torch.no_grad():
        case.bias[masked] = float("-inf")
    keep = (~masked).nonzero().squeeze(1)
    case.targets = torch.where(case.targets == -100, case.targets, keep[case.targets % keep.numel()])
    out = run_rlcore(case, backend="cpp")
    for k, v in out.items():
        assert not torch.isnan(v).any(), f"NaN in {k}"
    err = errors(out, run_reference(case))
    assert err["logp"] <= 1e-6 and err["dh"] <= FP32_TOL["dh"] and err["dW"] <= FP32_TOL["dW"], err
    assert torch.equal(out["dW"][masked], torch.zeros_like(out["dW"][masked]))
    assert torch.equal(out["db"][masked], torch.zeros_like(out["db"][masked]))


@needs_cpp
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
def test_both_gemm_routes_match_float64(cpp_built, tiles, monkeypatch, gemm):
    """oneDNN's GEMM and at::mm (the fallback without MKLDNN, and RLCORE_CPP_GEMM=aten) give the same accuracy."""
    monkeypatch.setenv("RLCORE_CPP_GEMM", gemm)
    tiles(16, 64)
    case = make_case(45, 64, 250, torch.float32, bias=True, ignore_frac=0.2, temperature=0.8, seed=5)
    report = compare(case, "cpp", "default")
    assert report.passed, "; ".join(report.failures)


@needs_cpp
def test_transposed_head_and_strided_hidden(cpp_built, tiles):
    """A head stored [H, V] and passed as .T, and hidden states that are a column slice: copied tile by tile."""
    tiles(7, 40)
    base = make_case(19, 24, 130, torch.float32, bias=True, ignore_frac=0.1, seed=6)
    weight = base.weight.detach().T.contiguous().T.requires_grad_()
    hidden = torch.cat([base.hidden.detach(), torch.randn(19, 5)], 1)[:, :24].requires_grad_()
    assert not weight.is_contiguous() and not hidden.is_contiguous()
    case = type(base)(hidden, weight, base.targets, base.bias, base.g_logp, base.g_ent)
    report = compare(case, "cpp", "default")
    assert report.passed, "; ".join(report.failures)


@needs_cpp
def test_bitwise_deterministic(cpp_built, tiles):
    """Every output element has one owner and the tile order is fixed: two runs agree bit for bit."""
    tiles(32, 96)
    case = make_case(100, 64, 500, torch.float32, bias=True, ignore_frac=0.1, temperature=0.9, seed=7)
    a, b = run_rlcore(case, backend="cpp"), run_rlcore(case, backend="cpp")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_cpp
def test_auto_runs_the_compiled_kernels_on_cpu_and_chunked_for_float64(cpp_built, monkeypatch):
    calls = []
    real = rlcore.cpp.linear_logprobs_fwd
    monkeypatch.setattr(rlcore.cpp, "linear_logprobs_fwd", lambda *a: calls.append(a[0].dtype) or real(*a))
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    rlcore.linear_logprobs(h, w, t)
    rlcore.linear_logprobs(h.double(), w.double(), t)
    rlcore.linear_logprobs(h, w, t, backend="torch")
    assert calls == [torch.float32]


@needs_cpp
def test_compiled_graph_holds_the_one_op(cpp_built):
    """torch.compile(fullgraph=True) on CPU: the forward graph is one rlcore::linear_logprobs call, with the compiled
    backend chosen at trace time, and its backward the one rlcore::linear_logprobs_backward call."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def record(gm, example_inputs):
        def compiler(g, _inputs):
            graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)

    def loss(h, w, t):
        logp, ent = rlcore.linear_logprobs(h, w, t, return_entropy=True)
        return logp.sum() + 0.1 * ent.sum()

    torch._dynamo.reset()
    case = make_case(12, 16, 40, torch.float32, seed=8)
    out = torch.compile(loss, fullgraph=True, backend=record)(case.hidden, case.weight, case.targets)
    (g_compiled,) = torch.autograd.grad(out, [case.hidden])
    (g_eager,) = torch.autograd.grad(loss(case.hidden, case.weight, case.targets), [case.hidden])
    torch.testing.assert_close(g_compiled, g_eager)
    fwd, bwd = graphs
    ops = lambda g: [n for n in g.graph.nodes if n.op == "call_function" and "rlcore" in str(n.target)]  # noqa: E731
    (f,), (b,) = ops(fwd), ops(bwd)
    assert f.target is torch.ops.rlcore.linear_logprobs.default and "cpp" in f.args
    assert b.target is torch.ops.rlcore.linear_logprobs_backward.default and "cpp" in b.args


@pytest.fixture
def fresh_loader():
    """Forget the loaded extension before and after the test, so each sees (and leaves) a first use."""
    rlcore.cpp._reset()
    yield
    rlcore.cpp._reset()


def test_failed_build_falls_back_with_one_notice(fresh_loader, monkeypatch):
    """A build failure (simulated) gives the chunked path's numbers, one one-line RuntimeWarning, and no error."""
    def broken_build():
        raise RuntimeError("Error building extension 'rlcore_cpu'\nc++: fatal error: simulated\n" + "log\n" * 200)

    monkeypatch.setattr(rlcore.cpp, "_build", broken_build)
    case = make_case(9, 16, 40, torch.float32, bias=True, ignore_frac=0.2, seed=9)
    with pytest.warns(RuntimeWarning, match="compiled CPU backend is unavailable") as record:
        out = run_rlcore(case, backend="auto")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the notice comes once per process
        again = run_rlcore(case, backend="cpp")   # an explicit request falls back too
    expected = run_rlcore(case, backend="torch")
    for k in expected:
        torch.testing.assert_close(out[k], expected[k], rtol=0, atol=0)
        torch.testing.assert_close(again[k], expected[k], rtol=0, atol=0)
    assert not rlcore.cpp.available()
    assert rlcore.cpp.unavailable_reason().startswith("RuntimeError: Error building extension")


def test_turned_off_by_env(fresh_loader, monkeypatch):
    """RLCORE_CPP=0: no build, no notice, the chunked path's numbers."""
    monkeypatch.setenv("RLCORE_CPP", "0")
    monkeypatch.setattr(rlcore.cpp, "_build", lambda: pytest.fail("RLCORE_CPP=0 must not build"))
    case = make_case(9, 16, 40, torch.float32, bias=True, ignore_frac=0.2, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_rlcore(case, backend="auto")
    expected = run_rlcore(case, backend="torch")
    for k in expected:
        assert torch.equal(out[k], expected[k]), k
    assert not rlcore.cpp.available() and rlcore.cpp.unavailable_reason() == "turned off by RLCORE_CPP=0"


def test_missing_compiler_falls_back_in_a_fresh_process(tmp_path):
    """A real failed build: a compiler that does not exist and an empty extension cache, in a new process."""
    code = ("import torch, rlcore; h, w = torch.randn(3, 8), torch.randn(11, 8); "
            "lp = rlcore.linear_logprobs(h, w, torch.tensor([1, 2, 3])); "
            "ref = rlcore.linear_logprobs(h, w, torch.tensor([1, 2, 3]), backend='torch'); "
            "assert torch.equal(lp, ref); assert not rlcore.cpp.available(); print('ok')")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("RLCORE_CPP", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    notices = [ln for ln in proc.stderr.splitlines() if "compiled CPU backend is unavailable" in ln]
    assert len(notices) == 1, proc.stderr[-3000:]


@needs_cpp
def test_fused_loss_on_cpu_uses_the_compiled_head(cpp_built, monkeypatch):
    """fused_policy_loss with backend="auto" on CPU: strategy "auto" runs the two-pass composition on the compiled
    backend (measured faster than the chunked single pass), equal to the explicit chunked two pass; an explicit
    single pass still runs on the chunked path."""
    from .test_fused_loss import fused, loss_args, make_batch

    calls = []
    real = rlcore.cpp.linear_logprobs_fwd
    monkeypatch.setattr(rlcore.cpp, "linear_logprobs_fwd", lambda *a: calls.append(1) or real(*a))
    batch = make_batch(3, 6, 16, 50, seed=12)
    _, auto = fused(batch, "gspo", dtype=torch.float32)
    assert calls, "backend='auto' on CPU must run the compiled head"
    _, chunked = fused(batch, "gspo", dtype=torch.float32, strategy="two_pass", backend="torch")
    for x, y in zip(auto, chunked):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-7)
    calls.clear()
    h, w, b = (x.float() for x in (batch["hidden"], batch["weight"], batch["bias"]))
    rlcore.fused_policy_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], bias=b,
                             strategy="single_pass", **loss_args(batch, "gspo"))
    assert not calls
