"""``rlcore.linear_divergence(reduction="sum" | "mean")``: the 0-d loss whose gradients the forward forms (one pass over
each block of rows on the chunked and compiled CPU backends, four head GEMMs), against the float64 reference of the
same reduction: the value and all six gradients, every backend, each kind, odd shapes, masked rows holding NaN, logits
of +-1e4, bf16 no worse than PyTorch's own bf16 computation. Bars and helpers: ``tests/test_divergence.py``."""

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcore.cpp
from rlcore.divergence import _linear_divergence_reduced_op, linear_divergence

from .helpers import BACKENDS, DEVICE, needs_cpp
from .test_divergence import GRID, KINDS, _args, _cpu_case, _peak, check, make_case, run_reference, \
    run_rlcore

REDUCTIONS = ["sum", "mean"]


def reduced_case(*args, reduction="mean", **kwargs):
    case = make_case(*args, **kwargs)
    case.reduction = reduction
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)   # the interpreter makes each Triton example slow
@given(
    N=st.integers(1, 24),
    hs=st.sampled_from([1, 16, 33, 60]),
    ht=st.sampled_from([16, 24, 60]),
    V=st.integers(1, 520),
    kind=st.sampled_from(KINDS),
    beta=st.sampled_from([0.1, 0.5, 0.9]),
    dtype=st.sampled_from(["fp32", "bf16"]),
    temperature=st.sampled_from([1.0, 0.7, 1.6]),
    bias=st.booleans(),
    mask_frac=st.sampled_from([0.0, 0.3, 0.9]),
    reduction=st.sampled_from(REDUCTIONS),
    top_k=st.sampled_from([None, None, None, 3]),
    seed=st.integers(0, 2**16),
)
def test_reduced_matches_float64(backend, N, hs, ht, V, kind, beta, dtype, temperature, bias, mask_frac, reduction,
                                 top_k, seed):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    case = reduced_case(N, hs, ht, V, dt, bias=bias, mask_frac=mask_frac, kind=kind, beta=beta,
                        temperature=temperature, top_k=min(top_k, V) if top_k else None, seed=seed,
                        reduction=reduction)
    check(case, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])   # Triton: the per-token op
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(GRID), ids=list(GRID))
def test_reduced_shapes(backend, kind, shape):
    kw = GRID[shape]
    case = reduced_case(kw["lead"], kw["hs"], kw["ht"], kw["V"], bias=True, mask_frac=0.25, kind=kind, beta=0.3,
                        temperature=0.8, seed=3, reduction="sum" if kind == "jsd" else "mean")
    check(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_reduced_masked_rows_holding_nan_and_huge_logits(backend, kind):
    """Masked rows holding NaN contribute nothing; logits of ~1e4 stay finite and within FP32's resolution there."""
    case = reduced_case(14, 16, 16, 100, kind=kind, scale=2e3, mask_frac=0.4, seed=7, reduction="sum")
    case.mask[0] = False
    poisoned = {k: (torch.where(case.mask[:, None], v, float("nan")) if k.endswith("hidden") else v)
                for k, v in case.tensors.items()}
    ref, out = run_reference(case), run_rlcore(case, backend, poisoned)
    zmax = (case.tensors["hidden"] @ case.tensors["weight"].T).abs().max().item()
    assert zmax > 3e3
    for k, r in ref.items():
        assert torch.isfinite(out[k]).all(), k
        scale = zmax * case.mask.sum().item() if k == "div" else r.abs().max().item()
        assert (out[k].double() - r).abs().max().item() <= 1e-6 * scale + 1e-6, k
    assert (out["hidden"][~case.mask] == 0).all() and (out["teacher_hidden"][~case.mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reduced_empty_all_masked_and_no_grad(backend, reduction):
    t = make_case(6, 16, 16, 50, bias=True, seed=1).tensors
    heads = (t["weight"], t["teacher_weight"])
    empty = linear_divergence(t["hidden"][:0], heads[0], t["teacher_hidden"][:0], heads[1], reduction=reduction,
                              backend=backend)
    assert empty.shape == () and empty.item() == 0
    h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
    none = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    loss = linear_divergence(h, w, t["teacher_hidden"], heads[1], mask=none, reduction=reduction, backend=backend)
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all() and (w.grad == 0).all()
    with torch.no_grad():            # the value alone: no gradient is formed
        value = linear_divergence(h, w, t["teacher_hidden"], heads[1], reduction=reduction, backend=backend)
    per_token = linear_divergence(h, w, t["teacher_hidden"], heads[1], backend=backend).detach()
    expected = per_token.sum() if reduction == "sum" else per_token.mean()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


@needs_cpp
@settings(max_examples=20, deadline=None)
@given(
    N=st.integers(1, 40),
    V=st.integers(1, 90),
    budget_rows=st.sampled_from([1, 5, 13, 16, 32]),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(["fp32", "bf16"]),
    bias=st.booleans(),
    mask_frac=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_cpp_fused_blocks_of_rows_match_float64(N, V, budget_rows, kind, dtype, bias, mask_frac, seed):
    """The compiled single pass with blocks of a few rows: partial blocks and vector lane groups, bf16 weights
    converted once for the whole vocabulary."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    case = _cpu_case(N, 24, 40, V, dt, bias=bias, mask_frac=mask_frac, kind=kind, beta=0.3, temperature=0.9,
                     seed=seed)
    case.reduction = "mean"
    with fused_rows(budget_rows, V):
        check(case, "cpp")


@contextmanager
def fused_rows(rows, V):
    saved = rlcore.cpp.FUSED_DIVERGENCE_ELEMENTS
    rlcore.cpp.FUSED_DIVERGENCE_ELEMENTS = 2 * rows * V
    try:
        yield
    finally:
        rlcore.cpp.FUSED_DIVERGENCE_ELEMENTS = saved


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise")


def _gemm_calls(fn) -> int:
    """The number of GEMM calls ``fn`` makes, from the profiler (the compiled backend's ATen and oneDNN calls too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in GEMMS)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_reduced_forms_each_block_of_logits_once(backend, monkeypatch):
    """Reduced forward + backward: 4 GEMMs per block of rows (both heads' logits, dh, dW), where the per-token op
    makes 6 (its backward forms the logits again); equal results. Three blocks of 10 rows, one vocabulary tile."""
    monkeypatch.setattr(rlcore.divergence, "CHUNK_ELEMENTS", 40 * 10)
    monkeypatch.setattr(rlcore.cpp, "FUSED_DIVERGENCE_ELEMENTS", 2 * 40 * 10)
    monkeypatch.setattr(rlcore.cpp, "DIVERGENCE_TILE_ROWS", 10)
    monkeypatch.setattr(rlcore.cpp, "DIVERGENCE_TILE_VOCAB", 40)
    t = _cpu_case(30, 16, 12, 40, seed=2).tensors
    grads = {}

    def run(reduction):
        h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
        loss = linear_divergence(h, w, t["teacher_hidden"], t["teacher_weight"], reduction=reduction,
                                 backend=backend)
        (loss.sum() if reduction == "none" else loss).backward()
        grads[reduction] = h.grad, w.grad

    rlcore.cpp.load()                                       # the build is not counted
    assert (_gemm_calls(lambda: run("sum")), _gemm_calls(lambda: run("none"))) == (3 * 4, 3 * 6)
    for fused, per_token in zip(grads["sum"], grads["none"]):
        torch.testing.assert_close(fused, per_token, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_reduced_opcheck(backend):
    case = make_case(9, 16, 12, 40, bias=True, mask_frac=0.3, seed=1)
    t = {k: v.detach() for k, v in case.tensors.items()}
    valid = case.mask.reshape(-1)
    weights = valid.float() / valid.sum()
    args = (t["hidden"], t["weight"], t["bias"], t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"], valid,
            weights, "jsd", 0.4, 0.8, backend, [True, True, True, False, False, False])
    torch.library.opcheck(_linear_divergence_reduced_op, args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_reduced_peak_memory_grows_like_N_times_H(backend):
    """Forward + backward of the reduced loss: the gradients formed in the forward are O(N H + V H); more rows add
    O(H) bytes each, never O(V) (the blocks of rows are bounded: RLCORE's chunk and FUSED_DIVERGENCE_ELEMENTS)."""
    hs, ht, V, n1, n2 = 32, 16, 16000, 1024, 3072
    growth = _peak(backend, n2, hs, ht, V, reduction="sum") - _peak(backend, n1, hs, ht, V, reduction="sum")
    budget = (n2 - n1) * (16 * (hs + ht) * 4 + 64)
    assert growth <= budget, f"{n2 - n1} more rows added {growth / 2**20:.2f} MiB; O(N H) allows {budget / 2**20:.2f}"


def test_bad_reduction_raises_value_error():
    hs, ws, ht, wt = _args()
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_divergence(hs, ws, ht, wt, reduction="avg")
