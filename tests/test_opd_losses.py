"""The distillation losses of ``rlcore.LOSSES`` (``opd``, ``kd``) and ``kl_estimator="exact"``, against the float64
ground truth of ``rlcore.loss_reference`` (materialised float64 logits of every head, each row's sums written out).

Every case checks the loss, the metrics and the gradients of the student's ``hidden``, ``weight`` and ``bias``
(the teacher and reference heads get none), on both layouts, through ``fused_policy_loss`` (which computes the
teacher's and the reference's per-token inputs from their heads) and through ``policy_loss`` (given the inputs).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcore
from rlcore.divergence import linear_divergence, support_divergence
from rlcore.loss_reference import fused_loss_reference, head_inputs_reference

F64 = torch.float64


def make(B=3, T=6, H=12, V=37, *, H_T=9, packed=False, seed=0, bias=True, scale=1.0):
    """Student, teacher and reference heads at O(1) logits (``scale`` multiplies them), prompt tokens masked, the last
    target ignored, a served top-4 of the teacher (ids and its log-probs), per-sequence advantages and old log-probs
    near the truth (so the PPO clip binds on some tokens)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return s * torch.randn(*shape, generator=g, dtype=F64)

    d = dict(hidden=rnd(B, T, H), weight=rnd(V, H, s=scale / H ** 0.5), bias=rnd(V, s=0.2) if bias else None,
             teacher_hidden=rnd(B, T, H_T), teacher_weight=rnd(V, H_T, s=scale / H_T ** 0.5),
             teacher_bias=rnd(V, s=0.2) if bias else None,
             ref_hidden=rnd(B, T, H), ref_weight=rnd(V, H, s=scale / H ** 0.5),
             ref_bias=rnd(V, s=0.2) if bias else None)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(0, T + 1, (B,), generator=g)            # loss tokens per sequence, 0 allowed
    for i in range(B):
        mask[i, : T - int(lengths[i])] = False
    if T > 1:
        targets[:, -1] = -100
    zt = (d["teacher_hidden"] @ d["teacher_weight"].T + (0 if d["teacher_bias"] is None else d["teacher_bias"]))
    K = min(4, V)
    top = zt.log_softmax(-1).topk(K, dim=-1)
    with torch.no_grad():
        lp = rlcore.linear_logprobs(d["hidden"], d["weight"], targets.clamp(min=0), bias=d["bias"], backend="torch")
    d.update(targets=targets, mask=mask, advantages=rnd(B), old_logp=lp + rnd(B, T, s=0.2),
             sampler_logp=lp + rnd(B, T, s=0.5),
             teacher_ids=top.indices, teacher_topk_logp=top.values)
    if packed:
        for k in ("hidden", "teacher_hidden", "ref_hidden"):
            d[k] = d[k].reshape(B * T, -1)
        for k in ("targets", "mask", "old_logp", "sampler_logp"):
            d[k] = d[k].reshape(B * T)
        d["teacher_ids"], d["teacher_topk_logp"] = (d[k].reshape(B * T, K) for k in ("teacher_ids",
                                                                                      "teacher_topk_logp"))
        d["cu_seqlens"] = torch.arange(B + 1, dtype=torch.int32) * T
    return d


# (loss options, the heads fused_policy_loss is given): every baseline, kind, support, and the exact KL
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")
SERVED = ("teacher_ids", "teacher_topk_logp")
REF = ("ref_hidden", "ref_weight", "ref_bias")
CASES = {
    "opd-none": (dict(loss_type="opd"), TEACHER),
    "opd-full": (dict(loss_type="opd", opd_baseline="full"), TEACHER),
    "opd-topk": (dict(loss_type="opd", opd_baseline="topk", top_k=3), TEACHER),
    "opd-topk-served": (dict(loss_type="opd", opd_baseline="topk", agg="seq-mean-token-mean"), TEACHER + SERVED),
    "kd-reverse": (dict(loss_type="kd"), TEACHER),
    "kd-forward": (dict(loss_type="kd", kd_kind="forward_kl", agg="token-sum"), TEACHER),
    "kd-jsd": (dict(loss_type="kd", kd_kind="jsd", jsd_beta=0.3, agg="seq-mean-token-mean"), TEACHER),
    "kd-reverse-top3": (dict(loss_type="kd", top_k=3), TEACHER),
    "kd-forward-top5": (dict(loss_type="kd", kd_kind="forward_kl", top_k=5), TEACHER),
    "kd-jsd-top4": (dict(loss_type="kd", kd_kind="jsd", jsd_beta=0.7, top_k=4), TEACHER),
    "kd-jsd-served": (dict(loss_type="kd", kd_kind="jsd", jsd_beta=0.4), SERVED),
    "kd-forward-served": (dict(loss_type="kd", kd_kind="forward_kl"), SERVED),
    "ppo-exact": (dict(loss_type="ppo", beta=0.1, kl_estimator="exact"), REF),
    "grpo-exact": (dict(loss_type="ppo", beta=0.2, kl_estimator="exact", agg="seq-mean-token-mean"), REF),
    "gspo-exact-weighted": (dict(loss_type="gspo_token", beta=0.1, kl_estimator="exact", kl_is_weighted=True), REF),
    "cispo-exact-clamp": (dict(loss_type="cispo", beta=0.3, kl_estimator="exact", kl_clamp=True), REF),
    "opd-full-exact": (dict(loss_type="opd", opd_baseline="full", beta=0.05, kl_estimator="exact"), TEACHER + REF),
    # the driver's shared options on the distill family: mismatch weights (against sg(l): no old_logp), reject,
    # the entropy bonus, an estimated KL to ref_logp
    "opd-full-is": (dict(loss_type="opd", opd_baseline="full", is_mode="token_truncate"), TEACHER),
    "kd-is-reject": (dict(loss_type="kd", is_mode="sequence_mask", is_cap=1.5, reject=True), TEACHER),
    "kd-entropy-k3": (dict(loss_type="kd", kd_kind="forward_kl", entropy_coef=0.05, beta=0.1), TEACHER),
}
# the single pass takes opd (its teacher inputs are constants); kd and the exact KL carry gradients of their own
SINGLE_PASS_OK = ("opd-none", "opd-full", "opd-topk", "opd-topk-served")


def heads_of(d, names):
    return {k: d[k] for k in names if d.get(k) is not None}


def needs_old(loss):
    return loss["loss_type"] not in ("opd", "kd")


def loss_inputs(d, loss):
    """The per-token loss inputs of this case besides the heads': old, sampler and reference log-probs."""
    out = dict(old_logp=d["old_logp"]) if needs_old(loss) else {}
    if loss.get("is_mode"):
        out["sampler_logp"] = d["sampler_logp"]
    if loss.get("beta") and loss.get("kl_estimator") != "exact":
        out["ref_logp"] = d["sampler_logp"] - 0.1
    return out


def reference(d, loss, names, temperature=1.0):
    """float64 truth: loss, metrics and the student's gradients."""
    h, w, b = (d[k].detach().clone().requires_grad_() if d[k] is not None else None
               for k in ("hidden", "weight", "bias"))
    extra = loss_inputs(d, loss)
    loss_v, metrics = fused_loss_reference(h, w, d["targets"], d["advantages"] if needs_old(loss) else None,
                                           d["mask"], bias=b, temperature=temperature, cu_seqlens=d.get("cu_seqlens"),
                                           heads=heads_of(d, names), **extra, **loss)
    return loss_v, metrics, grads(loss_v, h, w, b)


def grads(loss, *xs):
    xs = [x for x in xs if x is not None]
    return [g.double() for g in torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)]


def fused(d, loss, names, dtype=F64, temperature=1.0, **kw):
    h, w, b = (d[k].detach().to(dtype).requires_grad_() if d[k] is not None else None
               for k in ("hidden", "weight", "bias"))
    others = {k: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v)
              for k, v in heads_of(d, names).items()}
    if "teacher_topk_logp" in others:
        others["teacher_topk_logp"] = d["teacher_topk_logp"].to(dtype)
    extra = loss_inputs(d, loss)
    out = rlcore.fused_policy_loss(h, w, d["targets"], d["advantages"] if needs_old(loss) else None,
                                   d["mask"], bias=b, temperature=temperature, cu_seqlens=d.get("cu_seqlens"),
                                   **others, **extra, **loss, **kw)
    g = grads(out.loss, h, w, b)
    for k, v in others.items():                                   # the teacher and reference heads get nothing
        if v.is_floating_point():
            assert v.grad is None, k
    return out, g


def assert_close(loss, g, want_loss, want_g, rtol, what):
    for name, x, y in zip(["loss", "d hidden", "d weight", "d bias"], [loss] + g, [want_loss] + want_g):
        x, y = x.detach().double(), y.detach().double()
        assert torch.isfinite(x).all(), f"{what}: {name} not finite"
        err = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
        assert err <= rtol, f"{what}: {name} relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_float64(case, layout):
    """Each loss through ``fused_policy_loss`` (two passes; the single pass where it applies, with two sequences a
    slice), float64 on the PyTorch backend: equal to the materialised float64 truth to rounding, metrics included."""
    loss, names = CASES[case]
    d = make(packed=layout == "packed", seed=1)
    want_loss, want_metrics, want_g = reference(d, loss, names)
    for strategy in ("two_pass", "single_pass" if case in SINGLE_PASS_OK else "auto"):
        out, g = fused(d, loss, names, strategy=strategy, backend="torch", chunk_budget=2 * 6 * 37,
                       compute_entropy=True)
        assert_close(out.loss, g, want_loss, want_g, 1e-10, f"{case} {strategy}")
        for k, v in want_metrics.items():
            torch.testing.assert_close(out.metrics[k].double(), v, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("case", ["kd-jsd", "kd-reverse-top3", "kd-jsd-served", "opd-topk-served", "opd-full",
                                  "ppo-exact"])
def test_temperature(case):
    """The temperature divides every head's logits (student, teacher, reference, and the served log-probs)."""
    loss, names = CASES[case]
    d = make(seed=2, scale=2.0)
    want_loss, _, want_g = reference(d, loss, names, temperature=0.6)
    out, g = fused(d, loss, names, backend="torch", temperature=0.6)
    assert_close(out.loss, g, want_loss, want_g, 1e-10, case)


def test_served_top_k_is_linear_divergence_top_k():
    """With the teacher's own top-K ids and log-probs, the served support gives ``linear_divergence(top_k=K)``."""
    d = make(seed=3)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        for T in (1.0, 0.7):
            h = d["hidden"].clone().requires_grad_()
            full = linear_divergence(h, d["weight"], d["teacher_hidden"], d["teacher_weight"], kind=kind, beta=0.3,
                                     bias=d["bias"], teacher_bias=d["teacher_bias"], top_k=4, temperature=T,
                                     backend="torch")
            lp = rlcore.linear_logprobs(h, d["weight"], d["teacher_ids"], bias=d["bias"], temperature=T,
                                        backend="torch")
            served = support_divergence(lp, d["teacher_topk_logp"] / T, kind=kind, beta=0.3)
            torch.testing.assert_close(served, full, rtol=1e-12, atol=1e-12)
            g1, g2 = (torch.autograd.grad(x.sum(), h, retain_graph=True)[0] for x in (full, served))
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_policy_loss_takes_the_inputs_directly():
    """``policy_loss`` on per-token inputs (computed outside, from the reference) gives the truth as well; the
    inputs are token-shaped and flow through ``prepare`` like ``old_logp`` and ``ref_logp``."""
    d = make(seed=4)
    mask = d["mask"] & (d["targets"] != -100)
    h = d["hidden"].clone().requires_grad_()
    lp = rlcore.linear_logprobs(h, d["weight"], d["targets"], bias=d["bias"], backend="torch")
    got = head_inputs_reference(h, d["weight"], d["targets"], mask, bias=d["bias"], **heads_of(d, TEACHER + REF),
                                kind="jsd", beta=0.3)
    cases = [
        (dict(loss_type="opd", opd_baseline="full"), dict(teacher_logp=got["teacher_logp"],
                                                          teacher_kl=got["teacher_kl_full"])),
        (dict(loss_type="kd", kd_kind="jsd", jsd_beta=0.3), dict(divergence=got["divergence"])),
        (dict(loss_type="ppo", beta=0.1, kl_estimator="exact"), dict(ref_kl=got["ref_kl"], old_logp=d["old_logp"])),
    ]
    for loss, inputs in cases:
        adv = d["advantages"] if loss["loss_type"] == "ppo" else None
        out = rlcore.policy_loss(lp, adv, mask, **inputs, **loss)
        want, _ = fused_loss_reference(h, d["weight"], d["targets"], adv, mask, bias=d["bias"],
                                       heads=heads_of(d, TEACHER + REF), **({"old_logp": d["old_logp"]}
                                                                             if adv is not None else {}), **loss)
        torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
        g1, g2 = (torch.autograd.grad(x, h, retain_graph=True)[0] for x in (out.loss, want))
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["opd-full", "kd-jsd", "kd-forward-served", "ppo-exact"])
def test_masked_positions_holding_nan(case):
    """NaN in every input at the masked positions (hidden states of all three heads, the served top-k, old_logp)
    changes nothing: same loss, same gradients, all finite."""
    loss, names = CASES[case]
    d = make(seed=5)
    _, want_g = fused(d, loss, names, backend="torch")
    want_loss = fused(d, loss, names, backend="torch")[0].loss
    off = ~(d["mask"] & (d["targets"] != -100))
    bad = dict(d)
    for k in ("hidden", "teacher_hidden", "ref_hidden", "teacher_topk_logp"):
        bad[k] = d[k].masked_fill(off[..., None], math.nan)
    bad["old_logp"] = d["old_logp"].masked_fill(off, math.nan)
    out, g = fused(bad, loss, names, backend="torch")
    assert_close(out.loss, g, want_loss, want_g, 1e-12, case)


def test_policy_loss_never_reads_masked_inputs():
    d = make(seed=6)
    mask = d["mask"] & (d["targets"] != -100)
    lp = torch.randn(mask.shape, dtype=F64, requires_grad=True)
    nan = torch.full(mask.shape, math.nan, dtype=F64)
    clean = torch.rand(mask.shape, dtype=F64)
    for loss, key in ((dict(loss_type="opd", opd_baseline="full"), "teacher_kl"), (dict(loss_type="kd"), "divergence"),
                      (dict(loss_type="reinforce", beta=0.2, kl_estimator="exact"), "ref_kl")):
        kw = dict(teacher_logp=clean, teacher_kl=clean) if loss["loss_type"] == "opd" else {key: clean}
        adv = d["advantages"] if loss["loss_type"] == "reinforce" else None
        div = clean.clone().requires_grad_()
        if key != "teacher_kl":
            kw[key] = div
        a = rlcore.policy_loss(lp, adv, mask, **kw, **loss).loss
        kw2 = {k: torch.where(mask, v, nan) for k, v in kw.items()}
        b = rlcore.policy_loss(lp, adv, mask, **kw2, **loss).loss
        torch.testing.assert_close(a, b)
        for x in (lp, div) if key != "teacher_kl" else (lp,):
            (g,) = torch.autograd.grad(b, x, retain_graph=True, allow_unused=True, materialize_grads=True)
            assert torch.isfinite(g).all() and (g[~mask] == 0).all(), key


@pytest.mark.parametrize("case", ["opd-full", "opd-topk-served", "kd-jsd-top4", "kd-jsd-served", "grpo-exact"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_all_masked_gives_zero(case, layout):
    loss, names = CASES[case]
    d = make(seed=7, packed=layout == "packed")
    d["mask"] = torch.zeros_like(d["mask"])
    for strategy in ("two_pass", "auto"):
        out, g = fused(d, loss, names, backend="torch", strategy=strategy)
        assert out.loss.item() == 0.0 and all((x == 0).all() for x in g), case
        assert all(torch.isfinite(v).all() for v in out.metrics.values())


def test_huge_logits():
    """Logits of +-1e4 (near one-hot distributions): finite, and equal to the float64 truth."""
    for case in ("opd-full", "kd-reverse", "kd-jsd", "ppo-exact", "kd-forward-top5", "cispo-exact-clamp"):
        loss, names = CASES[case]
        d = make(seed=8, scale=3e3)
        want_loss, _, want_g = reference(d, loss, names)
        out, g = fused(d, loss, names, backend="torch")
        assert_close(out.loss, g, want_loss, want_g, 1e-8, case)


@pytest.mark.parametrize("case", ["kd-reverse", "kd-jsd-top4", "ppo-exact", "opd-full"])
def test_triton_interpreter(case):
    """The Triton kernels (interpreter on CPU) behind the teacher's and the reference's inputs: FP32 vs float64."""
    loss, names = CASES[case]
    d = make(B=2, T=4, H=16, V=70, H_T=16, seed=9)
    want_loss, _, want_g = reference(d, loss, names)
    out, g = fused(d, loss, names, dtype=torch.float32, backend="triton", strategy="two_pass")
    assert_close(out.loss, g, want_loss, want_g, 5e-5, case)


@pytest.mark.parametrize("case", ["kd-reverse", "kd-jsd", "ppo-exact"])
def test_bf16_no_worse_than_pytorch_bf16(case):
    """bf16 heads: the fused loss's error against float64 is no larger than that of PyTorch's own bf16 computation
    (bf16 logits from a bf16 GEMM, FP32 softmax: ``linear_divergence_reference(compute_dtype=None)``)."""
    from rlcore.divergence import linear_divergence_reference

    loss, names = CASES[case]
    d = make(B=4, T=8, H=64, V=300, H_T=48, seed=10)
    d = {k: v.bfloat16().double() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 1
         and k not in ("old_logp", "teacher_topk_logp") else v for k, v in d.items()}   # the heads bf16-exact
    d.update({k: d[k].bfloat16().double() for k in ("bias", "teacher_bias", "ref_bias")})
    want_loss, _, want_g = reference(d, loss, names)
    out, g = fused(d, loss, names, dtype=torch.bfloat16, backend="torch")
    # PyTorch's bf16 path: the same loss with the divergence from materialised bf16 logits
    h, w, b = (d[k].to(torch.bfloat16).requires_grad_() for k in ("hidden", "weight", "bias"))
    mask = d["mask"] & (d["targets"] != -100)
    other = "ref" if "ref_hidden" in names else "teacher"
    div = linear_divergence_reference(h, w, d[f"{other}_hidden"].bfloat16(), d[f"{other}_weight"].bfloat16(),
                                      kind=loss.get("kd_kind", "reverse_kl"), beta=loss.get("jsd_beta", 0.5),
                                      bias=b, teacher_bias=d[f"{other}_bias"].bfloat16(), mask=mask,
                                      compute_dtype=None)
    logits = torch.nn.functional.linear(h, w, b).float()
    lp = logits.log_softmax(-1).gather(-1, d["targets"].clamp(min=0)[..., None])[..., 0]
    key = "ref_kl" if other == "ref" else "divergence"
    extra = dict(old_logp=d["old_logp"]) if needs_old(loss) else {}
    theirs = rlcore.policy_loss(lp, d["advantages"] if needs_old(loss) else None, mask, **{key: div},
                                **extra, **loss).loss
    g_theirs = grads(theirs, h, w, b)

    def err(x, y):
        return ((x.double() - y.double()).abs().max() / y.abs().max()).item()

    for name, ours, pt, y in zip(["loss", "dh", "dW", "db"], [out.loss] + g, [theirs] + g_theirs,
                                 [want_loss] + want_g):
        assert err(ours, y) <= max(err(pt, y), 1e-6) * 1.05, (name, err(ours, y), err(pt, y))


def test_bad_input_names_the_argument():
    d = make(seed=11)
    lp = torch.randn(d["mask"].shape, dtype=F64)
    m = d["mask"]
    with pytest.raises(ValueError, match="teacher_logp is required"):
        rlcore.policy_loss(lp, None, m, loss_type="opd")
    with pytest.raises(ValueError, match="teacher_kl is required.*opd_baseline='full'"):
        rlcore.policy_loss(lp, None, m, teacher_logp=lp, loss_type="opd", opd_baseline="full")
    with pytest.raises(ValueError, match="divergence is required"):
        rlcore.policy_loss(lp, None, m, loss_type="kd")
    with pytest.raises(ValueError, match="ref_kl is required for kl_estimator='exact'"):
        rlcore.policy_loss(lp, d["advantages"], m, old_logp=lp, beta=0.1, kl_estimator="exact")
    with pytest.raises(ValueError, match=r"teacher_logp must have logp's shape"):
        rlcore.policy_loss(lp, None, m, teacher_logp=lp[:, :-1], loss_type="opd")
    with pytest.raises(ValueError, match=r"divergence must have logp's shape"):
        rlcore.policy_loss(lp, None, m, divergence=lp[:1], loss_type="kd")
    with pytest.raises(TypeError, match="ref_kl must be"):
        rlcore.policy_loss(lp, d["advantages"], m, old_logp=lp, beta=0.1, kl_estimator="exact", ref_kl=[1.0])
    for opts, match in ((dict(opd_baseline="mean"), "opd_baseline"), (dict(top_k=0), "top_k"),
                        (dict(top_k=2.5), "top_k"), (dict(opd_baseline="full", top_k=3), "top_k is the support")):
        with pytest.raises(ValueError, match=match):
            rlcore.policy_loss(lp, None, m, teacher_logp=lp, loss_type="opd", **opts)
    for opts, match in ((dict(jsd_beta=1.0), "jsd_beta"), (dict(kd_kind="tvd"), "kd_kind")):
        with pytest.raises(ValueError, match=match):
            rlcore.policy_loss(lp, None, m, divergence=lp, loss_type="kd", **opts)
    with pytest.raises(ValueError, match="does not take 'opd_baseline'"):
        rlcore.policy_loss(lp, d["advantages"], m, old_logp=lp, opd_baseline="full")


def test_fused_bad_input_names_the_argument():
    d = make(seed=12)
    h, w, t, m = d["hidden"], d["weight"], d["targets"], d["mask"]
    th, tw = d["teacher_hidden"], d["teacher_weight"]

    def call(**kw):
        return rlcore.fused_policy_loss(h, w, t, None, m, backend="torch", **kw)

    with pytest.raises(ValueError, match="teacher_logp is required.*teacher_hidden"):
        call(loss_type="opd")
    with pytest.raises(ValueError, match="divergence is required.*teacher_ids"):
        call(loss_type="kd")
    with pytest.raises(ValueError, match="teacher_kl is required.*top_k="):
        call(loss_type="opd", opd_baseline="topk", teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="ref_kl is required.*ref_hidden"):
        rlcore.fused_policy_loss(h, w, t, d["advantages"], m, old_logp=d["old_logp"], beta=0.1,
                                 kl_estimator="exact", backend="torch")
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight go together"):
        call(loss_type="kd", teacher_hidden=th)
    with pytest.raises(ValueError, match="teacher_hidden must have hidden's positions"):
        call(loss_type="kd", teacher_hidden=th[:, :-1], teacher_weight=tw)
    with pytest.raises(ValueError, match="teacher_weight must have"):
        call(loss_type="kd", teacher_hidden=th, teacher_weight=tw[:-1])
    with pytest.raises(ValueError, match="teacher_bias must have shape"):
        call(loss_type="kd", teacher_hidden=th, teacher_weight=tw, teacher_bias=d["teacher_bias"][:-1])
    with pytest.raises(ValueError, match="ref_weight must have shape"):
        call(loss_type="kd", teacher_hidden=th, teacher_weight=tw, ref_hidden=d["ref_hidden"],
             ref_weight=d["ref_weight"][:, :-1])
    with pytest.raises(ValueError, match="teacher_ids and teacher_topk_logp go together"):
        call(loss_type="kd", teacher_ids=d["teacher_ids"])
    with pytest.raises(ValueError, match="teacher_ids must be"):
        call(loss_type="kd", teacher_ids=d["teacher_ids"][:1], teacher_topk_logp=d["teacher_topk_logp"][:1])
    with pytest.raises(ValueError, match="teacher_topk_logp must be"):
        call(loss_type="kd", teacher_ids=d["teacher_ids"], teacher_topk_logp=d["teacher_topk_logp"][..., :2])
    with pytest.raises(ValueError, match="strategy='single_pass' does not take loss_type='kd'"):
        call(loss_type="kd", teacher_hidden=th, teacher_weight=tw, strategy="single_pass")
    with pytest.raises(ValueError, match="single_pass' does not take kl_estimator='exact'"):
        rlcore.fused_policy_loss(h, w, t, d["advantages"], m, old_logp=d["old_logp"], beta=0.1, backend="torch",
                                 kl_estimator="exact", ref_hidden=d["ref_hidden"], ref_weight=d["ref_weight"],
                                 strategy="single_pass")


def test_registry_entries():
    for name in ("opd", "kd"):
        spec = rlcore.LOSSES[name]
        assert spec.family == "distill" and name in rlcore.LOSS_TYPES
        assert "advantages" not in spec.inputs(rlcore.losses.Opts(opd_baseline="none"))
    assert rlcore.LOSSES["opd"].inputs(rlcore.losses.Opts(opd_baseline="topk")) == ("teacher_logp", "teacher_kl")
    assert "exact" not in rlcore.KL_ESTIMATORS                    # not an estimator: the given ref_kl


def test_opd_advantages_is_the_registry_opd():
    """``opd_advantages`` with ``loss_type="reinforce"`` (issue 16's first API) is the registry's ``opd``."""
    from rlcore.divergence import opd_advantages

    d = make(seed=13)
    mask = d["mask"] & (d["targets"] != -100)
    lp = torch.randn(mask.shape, dtype=F64, requires_grad=True)
    tl, kl = torch.randn(mask.shape, dtype=F64), torch.rand(mask.shape, dtype=F64)
    for base in ("none", "full"):
        a = rlcore.policy_loss(lp, opd_advantages(lp, tl, kl if base == "full" else None), mask,
                               loss_type="reinforce").loss
        b = rlcore.policy_loss(lp, None, mask, teacher_logp=tl, teacher_kl=kl, opd_baseline=base,
                               loss_type="opd").loss
        torch.testing.assert_close(a, b)
        ga, gb = (torch.autograd.grad(x, lp)[0] for x in (a, b))
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("baseline", ["full", "topk"])
def test_vopd_baseline_keeps_the_expectation_and_lowers_the_variance(baseline):
    """Seeded Monte Carlo on a 6-entry vocabulary, through the registry's ``opd`` in ``fused_policy_loss``: M samples
    y ~ p_S at one position; each sample's gradient w.r.t. its hidden state is one draw of the estimator. With and
    without the baseline (full vocabulary, or the teacher's top 3) the mean matches the exact gradient of
    ``KL(p_S || p_T)`` within 4 standard errors, and the baseline lowers the variance."""
    gen = torch.Generator().manual_seed(0)
    V, H, M = 6, 4, 20000
    h0, w = torch.randn(1, H, generator=gen), torch.randn(V, H, generator=gen)     # tests/test_divergence.py's draw
    ht, wt = torch.randn(1, H, generator=gen), torch.randn(V, H, generator=gen)
    y = torch.multinomial(torch.softmax(h0 @ w.T, -1)[0], M, replacement=True, generator=gen)
    h0, w, ht, wt = (x.double() for x in (h0, w, ht, wt))
    exact_h = h0.clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(linear_divergence(exact_h, w, ht, wt, backend="torch").sum(), exact_h)

    def draws(opd_baseline):
        h = h0.expand(M, H).clone().requires_grad_()
        extra = dict(top_k=3) if opd_baseline == "topk" else {}
        out = rlcore.fused_policy_loss(h, w, y, None, None, cu_seqlens=torch.tensor([0, M], dtype=torch.int32),
                                       teacher_hidden=ht.expand(M, H), teacher_weight=wt, loss_type="opd",
                                       opd_baseline=opd_baseline, agg="token-sum", backend="torch", **extra)
        (dh,) = torch.autograd.grad(out.loss, h)
        return dh                                                  # [M, H]: one estimator draw per row

    plain, vopd = draws("none"), draws(baseline)
    for x in (plain, vopd):
        stderr = x.std(0) / M ** 0.5
        assert ((x.mean(0) - g_exact[0]).abs() <= 4 * stderr + 1e-12).all()
    var_plain, var_vopd = plain.var(0).sum().item(), vopd.var(0).sum().item()
    print(f"opd_baseline={baseline!r}: estimator variance {var_plain:.4g} without the baseline, {var_vopd:.4g} with it")
    assert var_vopd < var_plain, (var_vopd, var_plain)


@given(
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    H=st.sampled_from([1, 7, 60]),
    V=st.integers(1, 23),
    case=st.sampled_from(list(CASES)),
    packed=st.booleans(),
    temperature=st.sampled_from([1.0, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_property(B, T, H, V, case, packed, temperature, seed):
    """Random shapes (V = 1, one token, empty sequences, H = 60): fused equals the float64 truth."""
    loss, names = CASES[case]
    loss = dict(loss)
    if "top_k" in loss:
        loss["top_k"] = min(loss["top_k"], V)
    d = make(B, T, H, V, H_T=5, packed=packed, seed=seed)
    want_loss, _, want_g = reference(d, loss, names, temperature=temperature)
    out, g = fused(d, loss, names, backend="torch", temperature=temperature)
    assert_close(out.loss, g, want_loss, want_g, 1e-9, case)


def test_readme_distillation_blocks_run_as_written():
    """The README's "On-policy distillation" code blocks, in order, as written (one scope)."""
    import pathlib
    import re
    import textwrap

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## On-policy distillation"):text.index("## Two commands")]
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", section, re.S)]
    assert len(blocks) == 2 and "loss_type=\"opd\"" in blocks[1]
    scope: dict = {}
    for block in blocks:
        exec(block, scope)
    assert scope["out"].loss.dim() == 0 and torch.isfinite(scope["out"].loss)


def test_torch_compile_fullgraph():
    """``fused_policy_loss`` with a teacher head (``kd``, ``opd`` with its baseline) traces with
    ``fullgraph=True`` and gives the eager values and gradients."""
    d = make(seed=14)
    for loss in (dict(loss_type="kd", kd_kind="jsd", jsd_beta=0.3), dict(loss_type="opd", opd_baseline="full")):
        def run(h, w, b, th, tw, tb):
            return rlcore.fused_policy_loss(h, w, d["targets"], None, d["mask"], bias=b, teacher_hidden=th,
                                            teacher_weight=tw, teacher_bias=tb, backend="torch",
                                            strategy="two_pass", **loss).loss

        args = [d[k] for k in ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias")]
        outs = []
        for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
            leaves = [a.detach().clone().requires_grad_(i < 3) for i, a in enumerate(args)]
            value = fn(*leaves)
            outs.append([value] + list(torch.autograd.grad(value, leaves[:3])))
        for x, y in zip(*outs):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
