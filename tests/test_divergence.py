"""``rlcore.linear_divergence`` against the float64 materialised reference: values and every gradient (both heads),
each divergence, full vocabulary and top-k, every backend (the Triton kernels in the interpreter without a GPU; the
compiled CPU backend, skipped with the reason where it cannot be built, also with tiles of a few rows and vocabulary
entries so that small cases cross every tile boundary).

Bars: FP32 inputs within ``rlcore.validate.FP32_TOL`` (max error / max |reference|); bf16 inputs no worse, normwise,
than PyTorch's own bf16 computation (``linear_divergence_reference(compute_dtype=None)``: bf16 logits, FP32 softmax,
bf16 autograd), or twice the rounding of the exact answer to the output dtype, as in ``rlcore.validate.compare``.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcore
import rlcore.cpp
from rlcore.divergence import (_linear_divergence_backward_op, _linear_divergence_op, linear_divergence,
                               linear_divergence_reference)
from rlcore.memory import peak_memory
from rlcore.validate import FP32_TOL, norm_err, rel_err

from .helpers import BACKENDS, DEVICE, needs_cpp

KINDS = ["reverse_kl", "forward_kl", "jsd"]
NAMES = ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias")


@dataclass
class Case:
    tensors: dict          # NAMES -> tensor (bias entries may be None)
    mask: Optional[torch.Tensor]
    grad: torch.Tensor     # upstream gradient of the divergence, [...]
    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: Optional[int] = None
    reduction: str = "none"   # "sum" / "mean": the loss is that 0-d reduction times REDUCED_GRAD


REDUCED_GRAD = 1.7


def reduce(div: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """``linear_divergence(reduction=...)``'s definition, applied to a per-token ``div``."""
    if reduction == "none":
        return div
    count = div.numel() if mask is None else int(mask.sum())
    return div.sum() if reduction == "sum" else div.sum() / max(count, 1)


def make_case(lead, hs, ht, V, dtype=torch.float32, *, bias=False, mask_frac=0.0, kind="reverse_kl", beta=0.5,
              temperature=1.0, top_k=None, scale=1.0, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    lead = (lead,) if isinstance(lead, int) else tuple(lead)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(DEVICE, dtype)

    t = {"hidden": rand(*lead, hs), "weight": rand(V, hs, s=scale / hs ** 0.5 * 2),
         "teacher_hidden": rand(*lead, ht), "teacher_weight": rand(V, ht, s=scale / ht ** 0.5 * 2),
         "bias": rand(V, s=0.5) if bias else None, "teacher_bias": rand(V, s=0.5) if bias else None}
    mask = (torch.rand(lead, generator=gen) >= mask_frac).to(DEVICE) if mask_frac else None
    grad = torch.randn(lead, generator=gen).to(DEVICE)
    return Case(t, mask, grad, kind, beta, temperature, top_k)


def _run(case: Case, fn, tensors: dict) -> dict:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    div = fn(args["hidden"], args["weight"], args["teacher_hidden"], args["teacher_weight"], kind=case.kind,
             beta=case.beta, temperature=case.temperature, bias=args["bias"], teacher_bias=args["teacher_bias"],
             mask=case.mask, top_k=case.top_k)
    loss = (div * case.grad.to(div.dtype)).sum() if case.reduction == "none" else div * REDUCED_GRAD
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {"div": div.detach()}
    out.update({k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)})
    return out


def run_rlcore(case: Case, backend: str, tensors=None) -> dict:
    def fn(*a, **kw):
        return linear_divergence(*a, **kw, teacher_grad=True, reduction=case.reduction, backend=backend)
    return _run(case, fn, tensors or case.tensors)


def run_reference(case: Case, compute_dtype=torch.float64) -> dict:
    tensors = case.tensors
    if compute_dtype is not None:
        tensors = {k: (v.to(compute_dtype) if v is not None else None) for k, v in tensors.items()}

    def fn(*a, **kw):
        return reduce(linear_divergence_reference(*a, **kw, compute_dtype=compute_dtype), kw["mask"], case.reduction)
    return _run(case, fn, tensors)


def check(case: Case, backend: str, tensors=None):
    ref = run_reference(case)
    out = run_rlcore(case, backend, tensors)
    half = case.tensors["hidden"].dtype in (torch.bfloat16, torch.float16)
    own = run_reference(case, compute_dtype=None) if half else None
    failures = []
    for k, r in ref.items():
        x = out[k]
        assert x.shape == r.shape, f"{k}: shape {tuple(x.shape)} != {tuple(r.shape)}"
        if not torch.isfinite(x).all():
            failures.append(f"{k}: non-finite values")
        if half:
            floor = norm_err(r.to(x.dtype), r)
            bar = max(norm_err(own[k], r), 2 * floor) + 1e-7
            err = norm_err(x, r)
        else:
            bar = FP32_TOL["logp"] if k == "div" else FP32_TOL["dh"]
            err = rel_err(x, r)
        if err > bar:
            failures.append(f"{k}: error {err:.3e} > {bar:.3e}")
    assert not failures, "; ".join(failures)


# ----------------------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)   # three kinds, top-k and two dtypes per example: the interpreter makes each one slow
@given(
    N=st.integers(1, 24),
    hs=st.sampled_from([1, 16, 33, 60]),
    ht=st.sampled_from([16, 24, 60]),
    V=st.integers(1, 520),                 # up to 3 vocabulary spans of 256 in the Triton forward
    kind=st.sampled_from(KINDS),
    beta=st.sampled_from([0.1, 0.5, 0.9]),
    dtype=st.sampled_from(["fp32", "bf16"]),
    temperature=st.sampled_from([1.0, 0.7, 1.6]),
    bias=st.booleans(),
    mask_frac=st.sampled_from([0.0, 0.3]),
    top_k=st.sampled_from([None, None, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(backend, N, hs, ht, V, kind, beta, dtype, temperature, bias, mask_frac, top_k, seed):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    case = make_case(N, hs, ht, V, dt, bias=bias, mask_frac=mask_frac, kind=kind, beta=beta,
                     temperature=temperature, top_k=min(top_k, V) if top_k else None, seed=seed)
    check(case, backend)


GRID = {
    "N1": dict(lead=1, hs=64, ht=32, V=300),
    "H60": dict(lead=20, hs=60, ht=60, V=300),
    "V509-prime": dict(lead=17, hs=32, ht=48, V=509),
    "V1": dict(lead=5, hs=16, ht=16, V=1),
    "V5": dict(lead=9, hs=16, ht=24, V=5),
    "lead-3x5": dict(lead=(3, 5), hs=32, ht=16, V=100),
}


# Every shape with every kind, and with both the full vocabulary and the top-3 support (alternating with the kind):
# every pair of (shape, kind, support) values is covered, in half the cartesian product.
SHAPE_CASES = [(shape, kind, [None, 3][(i + k) % 2]) for i, shape in enumerate(GRID) for k, kind in enumerate(KINDS)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, kind, top_k", SHAPE_CASES,
                         ids=[f"{s}-{'top3' if t else 'full'}-{k}" for s, k, t in SHAPE_CASES])
def test_shapes(backend, shape, kind, top_k):
    kw = GRID[shape]
    case = make_case(kw["lead"], kw["hs"], kw["ht"], kw["V"], bias=True, mask_frac=0.25, kind=kind, beta=0.3,
                     temperature=0.8, top_k=min(top_k, kw["V"]) if top_k else None, seed=3)
    check(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_rows_holding_nan_give_zero_and_no_gradient(backend, kind):
    case = make_case(12, 32, 16, 200, bias=True, mask_frac=0.4, kind=kind, seed=5)
    case.mask[0] = False
    poisoned = dict(case.tensors)
    for k in ("hidden", "teacher_hidden"):
        poisoned[k] = torch.where(case.mask[:, None], case.tensors[k], float("nan"))
    check(case, backend, poisoned)
    out = run_rlcore(case, backend, poisoned)
    assert (out["div"][~case.mask] == 0).all()
    assert (out["hidden"][~case.mask] == 0).all() and (out["teacher_hidden"][~case.mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits(backend, kind):
    """Logits of magnitude ~1e4: finite, and within FP32's own resolution at that magnitude (the divergence is a
    difference of quantities of size |z|, so its absolute error is ~1e-7 |z| in any FP32 computation)."""
    case = make_case(6, 16, 16, 100, kind=kind, scale=2e3, seed=7)
    ref, out = run_reference(case), run_rlcore(case, backend)
    zmax = max((case.tensors["hidden"] @ case.tensors["weight"].T).abs().max().item(), 1.0)
    assert zmax > 3e3
    for k, r in ref.items():
        assert torch.isfinite(out[k]).all(), k
        scale = zmax if k == "div" else r.abs().max().item()
        assert (out[k].double() - r).abs().max().item() <= 1e-6 * scale + 1e-6, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_identical_heads_give_zero(backend, kind):
    case = make_case(7, 24, 24, 150, bias=True, kind=kind, seed=2)
    t = case.tensors
    div = linear_divergence(t["hidden"], t["weight"], t["hidden"], t["weight"], bias=t["bias"],
                            teacher_bias=t["bias"], kind=kind, backend=backend)
    assert div.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_masked(backend):
    case = make_case(4, 16, 16, 50, seed=1)
    t = case.tensors
    empty = linear_divergence(t["hidden"][:0], t["weight"], t["teacher_hidden"][:0], t["teacher_weight"],
                              backend=backend)
    assert empty.shape == (0,)
    h = t["hidden"].clone().requires_grad_()
    w = t["weight"].clone().requires_grad_()
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    div = linear_divergence(h, w, t["teacher_hidden"], t["teacher_weight"], mask=mask, backend=backend)
    div.sum().backward()
    assert (div == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


def test_teacher_is_detached_unless_asked():
    case = make_case(5, 16, 8, 40, seed=4)
    t = {k: v.clone().requires_grad_() for k, v in case.tensors.items() if v is not None}
    linear_divergence(t["hidden"], t["weight"], t["teacher_hidden"], t["teacher_weight"]).sum().backward()
    assert t["hidden"].grad is not None and t["weight"].grad is not None
    assert t["teacher_hidden"].grad is None and t["teacher_weight"].grad is None


@pytest.mark.parametrize("other", ["triton", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_with_each_other(other, kind):
    """The Triton kernels and the compiled CPU backend against the chunked path on one shape with every feature on (a
    tighter comparison than each against float64)."""
    case = make_case(19, 40, 24, 333, bias=True, mask_frac=0.2, kind=kind, beta=0.7, temperature=0.9, seed=9)
    a, b = run_rlcore(case, "torch"), run_rlcore(case, other)
    for k in a:
        assert rel_err(b[k], a[k]) < 2e-5, k


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def _args(N=4, V=30, hs=8, ht=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, hs, generator=g), torch.randn(V, hs, generator=g), torch.randn(N, ht, generator=g),
            torch.randn(V, ht, generator=g))


@pytest.mark.parametrize("change, kwargs, match", [
    ("teacher_N", {}, "teacher_hidden"),
    ("teacher_V", {}, "teacher_weight"),
    ("student_H", {}, "weight"),
    (None, {"top_k": 31}, "top_k"),
    (None, {"top_k": 0}, "top_k"),
    (None, {"kind": "kl"}, "kind"),
    (None, {"kind": "jsd", "beta": 1.0}, "beta"),
    (None, {"temperature": 0.0}, "temperature"),
    (None, {"mask": torch.ones(3, dtype=torch.bool)}, "mask"),
    (None, {"bias": torch.zeros(29)}, "bias"),
    (None, {"teacher_bias": torch.zeros(31)}, "teacher_bias"),
    (None, {"backend": "cuda"}, "backend"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, kwargs, match):
    hs, ws, ht, wt = _args()
    if change == "teacher_N":
        ht = ht[:3]
    elif change == "teacher_V":
        wt = wt[:29]
    elif change == "student_H":
        ws = ws[:, :7]
    with pytest.raises(ValueError, match=match):
        linear_divergence(hs, ws, ht, wt, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"mask": torch.ones(4)}, "mask"), ({"top_k": 2.0}, "top_k"), ({"beta": "0.5"}, "beta"),
])
def test_bad_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        linear_divergence(*_args(), **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(backend, kind):
    case = make_case(9, 16, 12, 40, bias=True, mask_frac=0.3, seed=1)
    t = {k: v.detach() for k, v in case.tensors.items()}
    valid = case.mask.reshape(-1)
    args = (t["hidden"], t["weight"], t["bias"], t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"], valid,
            kind, 0.4, 0.8, backend)
    torch.library.opcheck(_linear_divergence_op, args)
    _, stats = _linear_divergence_op(*args)
    bwd_args = (case.grad.reshape(-1), *args[:7], stats, kind, 0.4, 0.8, backend, [True] * 6)
    torch.library.opcheck(_linear_divergence_backward_op, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_torch_compile_fullgraph(backend, reduction):
    case = make_case(8, 16, 12, 64, bias=True, mask_frac=0.25, kind="reverse_kl", seed=6)
    t = case.tensors

    def loss(h, w):
        div = linear_divergence(h, w, t["teacher_hidden"], t["teacher_weight"], bias=t["bias"],
                                teacher_bias=t["teacher_bias"], mask=case.mask, reduction=reduction, backend=backend)
        return (div * case.grad).sum() if reduction == "none" else div * REDUCED_GRAD

    h1, w1 = (t[k].clone().requires_grad_() for k in ("hidden", "weight"))
    h2, w2 = (t[k].clone().requires_grad_() for k in ("hidden", "weight"))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(h1, w1).backward()
    loss(h2, w2).backward()
    assert torch.allclose(h1.grad, h2.grad) and torch.allclose(w1.grad, w2.grad)


# ----------------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------------

FP32 = 4
# cpp: its tiles stop growing at DIVERGENCE_TILE_ROWS rows, so it is measured from there. triton: 1 and 5 row blocks
# of the interpreter's config (measured: ~820 bytes a row, against 2112 allowed and 8000 for one [N, V] tensor).
MEMORY_SHAPES = {"torch": (64, 32, 16000, 256, 2048), "triton": (16, 16, 2000, 16, 80),
                 "cpp": (64, 32, 16000, 2048, 4096)}


def _peak(backend, N, hs, ht, V, reduction="none"):
    case = make_case(N, hs, ht, V, seed=0)
    h = case.tensors["hidden"].clone().requires_grad_()
    w = case.tensors["weight"].clone().requires_grad_()

    def run():
        linear_divergence(h, w, case.tensors["teacher_hidden"], case.tensors["teacher_weight"], reduction=reduction,
                          backend=backend).sum().backward()

    return peak_memory(run, DEVICE)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_grows_like_N_times_H_not_N_times_V(backend):
    """Forward + backward: more rows add O(H) bytes each (gradients, the masked-row copy of h), never O(V)."""
    hs, ht, V, n1, n2 = MEMORY_SHAPES[backend]
    growth = _peak(backend, n2, hs, ht, V) - _peak(backend, n1, hs, ht, V)
    budget = (n2 - n1) * (16 * (hs + ht) * FP32 + 64)
    assert growth <= budget, (f"{n2 - n1} more rows added {growth / 2**20:.2f} MiB; O(N H) allows "
                              f"{budget / 2**20:.2f} MiB; one [N, V] FP32 tensor is "
                              f"{(n2 - n1) * V * FP32 / 2**20:.1f} MiB")


def test_exported():
    assert rlcore.linear_divergence is linear_divergence and "linear_divergence" in rlcore.__all__


# ----------------------------------------------------------------------------------------------------------------------
# The vOPD estimator
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 3], ids=["full", "top3"])
def test_vopd_baseline_keeps_the_expectation_and_lowers_the_variance(top_k):
    """Seeded Monte Carlo on a 6-entry vocabulary: M samples y ~ p_S at one position, the OPD loss through
    ``rlcore.policy_loss(loss_type="reinforce")`` with ``opd_advantages``. Each sample's gradient w.r.t. its hidden
    state is one draw of the estimator. With the full-vocabulary baseline its mean matches the no-baseline one (both
    within 4 standard errors of the exact gradient of KL(p_S || p_T)) and its variance is lower. The top-k baseline
    depends on the position only, not on the sample, so it keeps the expectation as well."""
    from rlcore.divergence import opd_advantages

    gen = torch.Generator().manual_seed(0)
    V, H, M = 6, 4, 20000
    h0, w = torch.randn(1, H, generator=gen), torch.randn(V, H, generator=gen)
    ht, wt = torch.randn(1, H, generator=gen), torch.randn(V, H, generator=gen)
    p = torch.softmax(h0 @ w.T, -1)[0]
    y = torch.multinomial(p, M, replacement=True, generator=gen)
    exact_h = h0.clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(linear_divergence(exact_h, w, ht, wt, backend="torch").sum(), exact_h)

    def per_sample(baseline: bool):
        h = h0.expand(M, H).clone().requires_grad_()
        logp = rlcore.linear_logprobs(h, w, y, backend="torch")
        teacher = rlcore.linear_logprobs(ht.expand(M, H), wt, y, backend="torch")
        kl = linear_divergence(h, w, ht.expand(M, H), wt, top_k=top_k, backend="torch") if baseline else None
        adv = opd_advantages(logp, teacher, kl)
        loss = rlcore.policy_loss(logp[None], adv[None], None, loss_type="reinforce", agg="token-sum").loss
        (dh,) = torch.autograd.grad(loss, h)
        return dh.double()                                       # [M, H]: one estimator draw per row

    plain, vopd = per_sample(False), per_sample(True)
    for draws in (plain, vopd):
        stderr = draws.std(0) / M ** 0.5
        assert ((draws.mean(0) - g_exact[0].double()).abs() <= 4 * stderr + 1e-9).all()
    var_plain, var_vopd = plain.var(0).sum().item(), vopd.var(0).sum().item()
    print(f"top_k={top_k}: estimator variance {var_plain:.4g} without the baseline, {var_vopd:.4g} with it")
    assert var_vopd < var_plain, (var_vopd, var_plain)


# ----------------------------------------------------------------------------------------------------------------------
# The compiled CPU backend (csrc/divergence_cpu.cpp) beyond the shared tests above
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def divergence_tiles(rows, vocab):
    saved = rlcore.cpp.DIVERGENCE_TILE_ROWS, rlcore.cpp.DIVERGENCE_TILE_VOCAB
    rlcore.cpp.DIVERGENCE_TILE_ROWS, rlcore.cpp.DIVERGENCE_TILE_VOCAB = rows, vocab
    try:
        yield
    finally:
        rlcore.cpp.DIVERGENCE_TILE_ROWS, rlcore.cpp.DIVERGENCE_TILE_VOCAB = saved


def _cpu_case(*args, **kwargs) -> Case:
    case = make_case(*args, **kwargs)
    case.tensors = {k: None if v is None else v.cpu() for k, v in case.tensors.items()}
    case.mask = None if case.mask is None else case.mask.cpu()
    case.grad = case.grad.cpu()
    return case


@needs_cpp
@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 40),
    hs=st.sampled_from([1, 16, 60]),
    ht=st.sampled_from([8, 60]),
    V=st.integers(1, 90),
    tile_rows=st.sampled_from([1, 5, 8, 13]),
    tile_vocab=st.sampled_from([1, 7, 16, 33]),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(["fp32", "bf16", "fp16"]),
    temperature=st.sampled_from([1.0, 0.6]),
    bias=st.booleans(),
    mask_frac=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_cpp_small_tiles_match_float64(N, hs, ht, V, tile_rows, tile_vocab, kind, dtype, temperature, bias, mask_frac,
                                       seed):
    """Several vocabulary and row tiles, partial vector lane groups, a rescaled running max in later tiles."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    case = _cpu_case(N, hs, ht, V, dt, bias=bias, mask_frac=mask_frac, kind=kind, beta=0.3, temperature=temperature,
                     seed=seed)
    with divergence_tiles(tile_rows, tile_vocab):
        check(case, "cpp")


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_nan_rows_huge_logits_and_masked_vocabulary_across_tiles(kind):
    """Masked rows holding NaN in every row tile, logits of ~1e4, and a bias of -inf on some entries (both heads):
    finite, the masked entries get zero gradient, the rest matches float64."""
    case = _cpu_case(23, 16, 16, 70, kind=kind, scale=2e3, bias=True, mask_frac=0.3, seed=11)
    for name in ("bias", "teacher_bias"):
        case.tensors[name][::9] = float("-inf")
    poisoned = {k: (torch.where(case.mask[:, None], v, float("nan")) if k.endswith("hidden") else v)
                for k, v in case.tensors.items()}
    with divergence_tiles(4, 16):
        out = run_rlcore(case, "cpp", poisoned)
    # float64 autograd through -inf gives 0 * NaN on those entries: the reference sees -1e30 there instead (p = 0 too)
    finite = Case({k: (v.double().clamp(min=-1e30) if k.endswith("bias") else v) for k, v in case.tensors.items()},
                  case.mask, case.grad, kind)
    ref = run_reference(finite)
    zmax = (case.tensors["hidden"] @ case.tensors["weight"].T).abs().max().item()
    assert zmax > 3e3
    for k, r in ref.items():
        assert torch.isfinite(out[k]).all(), k
        scale = zmax if k == "div" else r.abs().max().item()
        assert (out[k].double() - r).abs().max().item() <= 1e-6 * scale + 1e-6, k
    assert (out["div"][~case.mask] == 0).all() and (out["hidden"][~case.mask] == 0).all()
    assert (out["weight"][::9] == 0).all() and (out["bias"][::9] == 0).all()


@needs_cpp
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
def test_cpp_both_gemm_routes_and_bitwise_determinism(gemm, monkeypatch):
    monkeypatch.setenv("RLCORE_CPP_GEMM", gemm)
    case = _cpu_case(30, 24, 40, 150, bias=True, mask_frac=0.2, kind="jsd", beta=0.6, temperature=0.9, seed=12)
    with divergence_tiles(8, 32):
        check(case, "cpp")
        a, b = run_rlcore(case, "cpp"), run_rlcore(case, "cpp")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_cpp
def test_cpp_auto_on_cpu_and_chunked_for_float64(monkeypatch):
    calls = []
    real = rlcore.cpp.divergence_fwd
    monkeypatch.setattr(rlcore.cpp, "divergence_fwd", lambda *a: calls.append(a[0].dtype) or real(*a))
    hs, ws, ht, wt = _args()
    linear_divergence(hs, ws, ht, wt)
    linear_divergence(hs.double(), ws.double(), ht.double(), wt.double())
    assert calls == [torch.float32]
    with pytest.raises(TypeError, match="float64"):
        linear_divergence(hs.double(), ws.double(), ht.double(), wt.double(), backend="cpp")


def test_cpp_turned_off_runs_the_chunked_path(monkeypatch):
    """RLCORE_CPP=0 (or a failed build): backend="cpp" gives the chunked path's numbers, no error, no build."""
    rlcore.cpp._reset()
    monkeypatch.setenv("RLCORE_CPP", "0")
    monkeypatch.setattr(rlcore.cpp, "_build", lambda: pytest.fail("RLCORE_CPP=0 must not build"))
    try:
        case = _cpu_case(9, 16, 12, 40, bias=True, mask_frac=0.3, kind="jsd", seed=13)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = run_rlcore(case, "cpp")
        expected = run_rlcore(case, "torch")
        for k in expected:
            assert torch.equal(out[k], expected[k]), k
    finally:
        rlcore.cpp._reset()
