"""``rlcore.policy_loss`` and ``rlcore.vstar`` against the float64 reference ``rlcore.loss_reference``.

The reference is a per-sequence, per-token Python loop that writes each formula of the contract literally; its own
numbers are pinned first, against small cases worked out by hand with ``math``. Then the fast path must match it:

- values, gradients (w.r.t. ``logp`` and ``entropy``) and metrics, in float64, to ~1e-10 relative;
- on both layouts: padded ``[B, T]`` with a mask, and packed ``[N]`` with ``cu_seqlens``;
- for every loss type x aggregation x mismatch-correction mode, every KL estimator, and each option on its own.

Then properties that need no reference: garbage at masked positions changes nothing; padded == packed; with
``old_logp = sg(logp)`` every clipped loss has the REINFORCE gradient; gspo and gspo_token agree on per-sequence
advantages; ``vstar`` tends to the mean / max; an all-masked batch gives 0 and zero gradients; a multi-turn agent
trajectory with its tool tokens masked out equals the same trajectory with them deleted. Bad input raises a
``ValueError`` naming the argument.

Every batch is small (a few dozen tokens): the reference is slow by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlcore import policy_loss, vstar
from rlcore.loss_reference import (AGGS, CLIPPED, IS_MODES, KL_ESTIMATORS, PPO_FORMS, REGRESSION,
                                   policy_loss_reference, vstar_reference)

LOSS_TYPES = CLIPPED + REGRESSION     # the losses of sections 1-5 (the newer ones: tests/test_loss_zoo.py)

F64 = torch.float64
RTOL = 1e-10
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e300, -1e300, -3e38)
TOKEN_FIELDS = ("logp", "old_logp", "ref_logp", "sampler_logp", "entropy", "token_weights", "adv_tok")
CLIPPED_WITH_OLD = tuple(t for t in CLIPPED if t != "reinforce")      # the losses that need old_logp


# ----------------------------------------------------------------------------------------------------------------------
# Batches, layouts, runs, comparisons
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Per-sequence data, independent of the layout. ``tok[f][i]`` is field f of sequence i, ``[L_i]``."""

    lengths: list
    mask: list                                       # per sequence, bool [L_i]
    tok: dict                                        # field -> per sequence float64 [L_i]
    adv_seq: torch.Tensor                            # [B]
    rewards: torch.Tensor                            # [B]
    baseline: torch.Tensor                           # [B]


def make_batch(lengths, seed, *, mask_p=0.75, ratio_scale=0.3, kl_scale=0.6, is_scale=0.4, masked_seqs=()):
    """Random float64 batch: log-probs in (-3.05, -0.05), old = logp + N(0, ratio_scale), ref = logp +
    U(-kl_scale, kl_scale), sampler = old + N(0, is_scale), entropy in (0, 3), token weights in (0, 2)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    def rand(*s):
        return torch.rand(*s, generator=g, dtype=F64)

    tok = {f: [] for f in TOKEN_FIELDS}
    masks = []
    for i, L in enumerate(lengths):
        masks.append(torch.zeros(L, dtype=torch.bool) if i in masked_seqs else rand(L) < mask_p)
        lp = -(3 * rand(L) + 0.05)
        old = lp + ratio_scale * randn(L)
        tok["logp"].append(lp)
        tok["old_logp"].append(old)
        tok["ref_logp"].append(lp + kl_scale * (2 * rand(L) - 1))
        tok["sampler_logp"].append(old + is_scale * randn(L))
        tok["entropy"].append(3 * rand(L))
        tok["token_weights"].append(2 * rand(L))
        tok["adv_tok"].append(randn(L))
    B = len(lengths)
    return Batch(list(lengths), masks, tok, randn(B), rand(B), 0.5 + 0.1 * randn(B))


@dataclass
class Layout:
    kind: str                                        # "padded" or "packed"
    mask: torch.Tensor                               # [B, T] or [N], bool
    cu_seqlens: object                               # [B + 1] int32 (packed) or None
    x: dict = field(default_factory=dict)            # field -> [B, T] or [N]; logp and entropy are float64 leaves


def layout(batch: Batch, kind: str, garbage: bool = False) -> Layout:
    """The batch as ``policy_loss`` arguments. Padded rows get at least one padding column. Masked positions hold a
    harmless 0.3, or with ``garbage`` cycle through nan, +-inf and huge values (a different phase per field)."""
    B = len(batch.lengths)
    if kind == "padded":
        T = max(batch.lengths, default=0) + 1
        mask = torch.zeros(B, T, dtype=torch.bool)
        xs = {f: torch.full((B, T), 0.3, dtype=F64) for f in TOKEN_FIELDS}
        for i, L in enumerate(batch.lengths):
            mask[i, :L] = batch.mask[i]
            for f in TOKEN_FIELDS:
                xs[f][i, :L] = batch.tok[f][i]
        cu = None
    else:
        mask = torch.cat(batch.mask) if B else torch.zeros(0, dtype=torch.bool)
        xs = {f: torch.cat(batch.tok[f]) for f in TOKEN_FIELDS}
        cu = torch.tensor([0] + list(torch.tensor(batch.lengths).cumsum(0).tolist()), dtype=torch.int32)
    if garbage:
        off = (~mask).reshape(-1).nonzero().flatten()
        for k, f in enumerate(TOKEN_FIELDS):
            vals = torch.tensor([GARBAGE[(k + n) % len(GARBAGE)] for n in range(len(off))], dtype=F64)
            xs[f].view(-1)[off] = vals
    xs["logp"].requires_grad_()
    xs["entropy"].requires_grad_()
    return Layout(kind, mask, cu, xs)


@dataclass
class Result:
    loss: torch.Tensor
    g_logp: torch.Tensor
    g_ent: torch.Tensor
    metrics: dict
    requires_grad: bool


def run(fn, lay: Layout, batch: Batch, loss_type: str, *, adv=None, token_weights=False, drop=(), **kw) -> Result:
    """Call ``fn`` (the fast path or the reference) on ``lay`` and take gradients w.r.t. logp and entropy.

    ``adv``: "tok" (per token), "seq" ([B]) or None; by default "seq" for gspo, none for the regression family and
    "tok" otherwise. All of old/ref/sampler log-probs and the entropy are passed unless named in ``drop``; the
    regression family gets the rewards, apo the baseline, oapl/kimi ``group_size=2`` (override through ``kw``).
    """
    if adv is None:
        adv = "seq" if loss_type == "gspo" else (None if loss_type in REGRESSION else "tok")
    A = {"tok": lay.x["adv_tok"], "seq": batch.adv_seq, None: None}[adv]
    args = dict(old_logp=lay.x["old_logp"], ref_logp=lay.x["ref_logp"], sampler_logp=lay.x["sampler_logp"],
                entropy=lay.x["entropy"], loss_type=loss_type)
    if lay.cu_seqlens is not None:
        args["cu_seqlens"] = lay.cu_seqlens
    if token_weights:
        args["token_weights"] = lay.x["token_weights"]
    if loss_type in REGRESSION:
        args["rewards"] = batch.rewards
    if loss_type == "apo":
        args["baseline"] = batch.baseline
    if loss_type in ("oapl", "kimi"):
        args["group_size"] = 2
    if loss_type == "dr_grpo":
        args["agg_constant"] = 7.0                    # its default agg is "constant"
    for name in drop:
        args.pop(name, None)
    mask = kw.pop("mask", lay.mask)
    args.update(kw)
    loss, metrics = fn(lay.x["logp"], A, mask, **args)
    leaves = [lay.x["logp"], lay.x["entropy"]]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    else:
        grads = (None, None)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return Result(loss.detach(), grads[0], grads[1], metrics, loss.requires_grad)


def assert_close(actual, expected, what, rtol=RTOL):
    """max |actual - expected| <= rtol * max(max |expected|, 1), and actual finite."""
    actual = torch.as_tensor(actual, dtype=F64).detach()
    expected = torch.as_tensor(expected, dtype=F64).detach()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite\n{actual}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, \
        f"{what}: max error {err:.3e} > {rtol:.0e} x {scale:.3g}\n got {actual}\nwant {expected}"


def required_metrics(loss_type, kw, entropy=True):
    keys = {"num_tokens", "num_seqs"}
    if loss_type in CLIPPED_WITH_OLD:
        keys |= {"ratio_mean", "ratio_min", "ratio_max", "clip_frac_low", "clip_frac_high"}
    if kw.get("is_mode"):
        keys |= {"is_weight_mean", "is_frac_truncated" if kw["is_mode"].endswith("truncate") else "is_frac_masked"}
    if entropy:
        keys.add("entropy_mean")
    if kw.get("beta", 0.0) != 0:
        keys.add("kl_ref_mean")
    return keys


def check_metrics(out: Result, ref: Result, what, required=()):
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0, f"{what}: metric {k} is not a 0-d tensor: {v!r}"
        assert not v.requires_grad, f"{what}: metric {k} is not detached"
    missing = set(required) - set(out.metrics)
    assert not missing, f"{what}: metrics missing {sorted(missing)} (has {sorted(out.metrics)})"
    for k in sorted(set(ref.metrics) & set(out.metrics)):
        assert_close(out.metrics[k], ref.metrics[k], f"{what}: metric {k}")


def check_same(out: Result, ref: Result, what, required=()):
    assert out.loss.dtype == F64 and out.loss.dim() == 0, f"{what}: loss {out.loss!r} is not a 0-d float64 tensor"
    assert_close(out.loss, ref.loss, f"{what}: loss")
    assert_close(out.g_logp, ref.g_logp, f"{what}: d loss / d logp")
    assert_close(out.g_ent, ref.g_ent, f"{what}: d loss / d entropy")
    check_metrics(out, ref, what, required)


def check_against_reference(batch, loss_type, kinds=("padded", "packed"), **kw):
    """The fast path matches the reference on each layout: loss, both gradients, metrics."""
    for kind in kinds:
        out = run(policy_loss, layout(batch, kind), batch, loss_type, **kw)
        ref = run(policy_loss_reference, layout(batch, kind), batch, loss_type, **kw)
        check_same(out, ref, f"{loss_type} {kind} {kw}", required_metrics(loss_type, kw, "entropy" not in kw.get(
            "drop", ())))


def canonical(g: torch.Tensor, batch: Batch, kind: str) -> torch.Tensor:
    """A per-token tensor in packed order; a padded one must be exactly 0 in its padding."""
    if kind == "packed":
        return g
    parts = []
    for i, L in enumerate(batch.lengths):
        assert torch.all(g[i, L:] == 0), f"nonzero gradient in padding: {g[i, L:]}"
        parts.append(g[i, :L])
    return torch.cat(parts) if parts else g.new_zeros(0)


# The grid batch: B=6 (groups of 2 or 3, 3 rebel pairs), sequence 5 fully masked (so pair (4, 5) is empty) and
# sequence 4 of length 0 (an empty packed segment). 25 tokens; in the packed layout N != B. The seed is one where
# every clip side and every mismatch mode binds on some tokens but not all (test_grid_batch_exercises_every_branch).
GRID_LENGTHS = (6, 4, 7, 5, 0, 3)
GRID_BATCH = make_batch(GRID_LENGTHS, seed=13, masked_seqs=(5,))


# ----------------------------------------------------------------------------------------------------------------------
# 0. The reference itself, against small cases worked out by hand
# ----------------------------------------------------------------------------------------------------------------------

def t64(x, grad=False):
    return torch.tensor(x, dtype=F64, requires_grad=grad)


def ref_grad(loss, x):
    (g,) = torch.autograd.grad(loss, [x])
    return g


@pytest.mark.parametrize("A", [1.0, -1.0], ids=["A+1", "A-1"])
def test_reference_ppo_by_hand(A):
    l_ = [-1.0, -2.0, -0.5, -0.3]
    old = [-1.1, -1.5, -0.5, -0.9]       # rho = e^0.1 (inside), e^-0.5 (< 0.8), 1, e^0.6 (> 1.2)
    rho = [math.exp(a - b) for a, b in zip(l_, old)]
    c, g = [], []
    for r in rho:
        cl = min(max(r, 0.8), 1.2)
        unclipped = r * A <= cl * A
        c.append(-min(r * A, cl * A))
        g.append(-A * r / 4 if unclipped else 0.0)
    logp = t64([l_], grad=True)
    loss, m = policy_loss_reference(logp, t64([A]), None, old_logp=t64([old]))
    assert_close(loss, sum(c) / 4, "loss")
    assert_close(ref_grad(loss, logp), [g], "grad")
    assert_close(m["ratio_mean"], sum(rho) / 4, "ratio_mean")
    assert_close(m["ratio_min"], rho[1], "ratio_min")
    assert_close(m["ratio_max"], rho[3], "ratio_max")
    assert m["clip_frac_low"] == (0.25 if A < 0 else 0.0) and m["clip_frac_high"] == (0.25 if A > 0 else 0.0)
    assert m["num_tokens"] == 4 and m["num_seqs"] == 1


def test_reference_dual_clip_and_log_ratio_clamp_by_hand():
    # A = -1, rho = e^1.5 = 4.48: ppo c = rho = 4.48, dual clip 3 -> c = 3, no gradient.
    logp = t64([[-0.5, -1.0]], grad=True)
    old = t64([[-2.0, -1.2]])                      # second token: rho = e^0.2 = 1.2214, c = rho (unclipped side)
    loss, _ = policy_loss_reference(logp, t64([-1.0]), None, old_logp=old, dual_clip=3.0, agg="token-sum")
    assert_close(loss, 3.0 + math.exp(0.2), "loss")
    assert_close(ref_grad(loss, logp), [[0.0, math.exp(0.2)]], "grad")
    # log_ratio_clamp = 1: rho = e^1 for the first token, below the dual clip; the clamp kills its gradient.
    loss, _ = policy_loss_reference(logp, t64([-1.0]), None, old_logp=old, dual_clip=3.0, agg="token-sum",
                                    log_ratio_clamp=1.0)
    assert_close(loss, math.e + math.exp(0.2), "loss")
    assert_close(ref_grad(loss, logp), [[0.0, math.exp(0.2)]], "grad")


def test_reference_cispo_by_hand():
    # rho = e^0.5 > 1.28 (weight 1.28), e^-0.5 (no lower bound by default: weight e^-0.5)
    logp = t64([-1.0, -2.0], grad=True)
    A = t64([1.0, -2.0])
    loss, m = policy_loss_reference(logp, A, None, cu_seqlens=torch.tensor([0, 2]), old_logp=t64([-1.5, -1.5]),
                                    loss_type="cispo")
    w = [1.28, math.exp(-0.5)]
    assert_close(loss, (-w[0] * 1.0 * -1.0 - w[1] * -2.0 * -2.0) / 2, "loss")
    assert_close(ref_grad(loss, logp), [-w[0] * 1.0 / 2, -w[1] * -2.0 / 2], "grad")
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.0
    loss, m = policy_loss_reference(logp, A, None, cu_seqlens=torch.tensor([0, 2]), old_logp=t64([-1.5, -1.5]),
                                    loss_type="cispo", eps_low=0.2)
    assert_close(ref_grad(loss, logp), [-1.28 / 2, 0.8 * 2.0 / 2], "grad, lower bound 0.8")
    assert m["clip_frac_low"] == 0.5


def test_reference_gspo_and_gspo_token_by_hand():
    # one sequence, log-ratios 0.1 and 0.3 (and a masked token): s = e^0.2, inside [0.7, 1.3]
    logp = t64([[-1.0, -2.0, 5.0]], grad=True)
    old = t64([[-1.1, -2.3, 0.0]])
    mask = torch.tensor([[True, True, False]])
    s = math.exp(0.2)
    for lt, A in (("gspo", t64([2.0])), ("gspo_token", t64([[2.0, 2.0, 9.0]]))):
        loss, m = policy_loss_reference(logp, A, mask, old_logp=old, loss_type=lt, eps_low=0.3, eps_high=0.3)
        assert_close(loss, -s * 2.0, f"{lt} loss")
        assert_close(ref_grad(loss, logp), [[-2.0 * s / 2, -2.0 * s / 2, 0.0]], f"{lt} grad")
        assert_close(m["ratio_mean"], s, f"{lt} ratio")
    # default eps (3e-4, 4e-4): s > 1.0004 with A > 0 is clipped: value -1.0004 A, no gradient
    loss, m = policy_loss_reference(logp, t64([2.0]), mask, old_logp=old, loss_type="gspo")
    assert_close(loss, -1.0004 * 2.0, "clipped loss")
    assert_close(ref_grad(loss, logp), [[0.0, 0.0, 0.0]], "clipped grad")
    assert m["clip_frac_high"] == 1.0


def test_reference_aggregations_by_hand():
    # reinforce, c = -A l; sequence 0 has 2 loss tokens, sequence 1 one, sequence 2 none (B = 3)
    logp = t64([[-1.0, -2.0, 7.0], [-0.5, 7.0, 7.0], [7.0, 7.0, 7.0]], grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=F64)
    A = t64([1.0, 3.0, 5.0])
    c0, c1 = [1.0, 2.0], [1.5]
    S = sum(c0) + sum(c1)
    expected = {
        "token-mean": (S / 3, [[-1 / 3, -1 / 3, 0], [-1.0, 0, 0], [0, 0, 0]]),
        "token-sum": (S, [[-1.0, -1.0, 0], [-3.0, 0, 0], [0, 0, 0]]),
        "seq-mean-token-mean": ((sum(c0) / 2 + sum(c1)) / 2, [[-0.25, -0.25, 0], [-1.5, 0, 0], [0, 0, 0]]),
        "seq-mean-token-sum": (S / 3, [[-1 / 3, -1 / 3, 0], [-1.0, 0, 0], [0, 0, 0]]),
        "constant": (S / (3 * 4.0), [[-1 / 12, -1 / 12, 0], [-0.25, 0, 0], [0, 0, 0]]),
    }
    for agg, (value, grad) in expected.items():
        loss, m = policy_loss_reference(logp, A, mask, loss_type="reinforce", agg=agg, agg_constant=4.0)
        assert_close(loss, value, agg)
        assert_close(ref_grad(loss, logp), grad, f"{agg} grad")
        assert m["num_tokens"] == 3 and m["num_seqs"] == 2
    loss, _ = policy_loss_reference(logp, A, mask, loss_type="reinforce", num_tokens=10)
    assert_close(loss, S / 10, "token-mean with num_tokens=10")


def test_reference_mismatch_weights_by_hand():
    # delta = old - smp = (0.9, -0.9, 0.1); C = 2 (log 0.693), C_min = 0.5
    logp = t64([[-1.0, -1.0, -1.0]], grad=True)
    old = t64([[-1.0, -1.0, -1.0]])                 # rho = 1: reinforce-like c = -A = -1 per token
    smp = t64([[-1.9, -0.1, -1.1]])
    A = t64([1.0])
    e = [math.exp(0.9), math.exp(-0.9), math.exp(0.1)]
    cases = {
        "token_truncate": ([2.0, e[1], e[2]], "is_frac_truncated", 1 / 3),
        "token_mask": ([0.0, 0.0, e[2]], "is_frac_masked", 2 / 3),
        "sequence_truncate": ([math.exp(0.1)] * 3, "is_frac_truncated", 0.0),
        "sequence_mask": ([math.exp(0.1)] * 3, "is_frac_masked", 0.0),
    }
    for mode, (w, key, frac) in cases.items():
        loss, m = policy_loss_reference(logp, A, None, old_logp=old, sampler_logp=smp, is_mode=mode)
        assert_close(loss, -sum(w) / 3, mode)
        assert_close(ref_grad(loss, logp), [[-x / 3 for x in w]], f"{mode} grad")
        assert_close(m["is_weight_mean"], sum(w) / 3, f"{mode} weight mean")
        assert_close(m[key], frac, f"{mode} {key}")
    # reject: the two masked tokens leave the mask, so the token-mean divides by 1
    loss, m = policy_loss_reference(logp, A, None, old_logp=old, sampler_logp=smp, is_mode="token_mask", reject=True)
    assert_close(loss, -e[2], "reject")
    assert m["num_tokens"] == 1
    # no old_logp: delta = sg(l) - smp = (0.9, -0.9, 0.1) as well
    loss, _ = policy_loss_reference(logp, A, None, sampler_logp=smp, is_mode="token_truncate", loss_type="reinforce")
    assert_close(loss, (2.0 + e[1] + e[2]) / 3, "reinforce without old_logp: c = -A l = +1 per token")


def test_reference_kl_by_hand():
    D = [0.5, -3.0]
    logp = t64([[-1.0, -1.0]], grad=True)
    ref = t64([[-1.0 - D[0], -1.0 - D[1]]])
    A = t64([0.0])
    k = {"k1": (lambda d: d, lambda d: 1.0), "k2": (lambda d: d * d / 2, lambda d: d),
         "k3": (lambda d: math.exp(-d) - 1 + d, lambda d: 1 - math.exp(-d)),
         "abs": (lambda d: abs(d), lambda d: math.copysign(1.0, d))}
    for name, (v, dv) in k.items():
        for st_ in ("", "+"):
            for clamp in (False, True):
                val = [v(d) for d in D]
                grad = [d if st_ else dv(d) for d in D]
                if clamp:
                    grad = [g if (st_ or -10 < x < 10) else 0.0 for g, x in zip(grad, val)]
                    val = [min(max(x, -10.0), 10.0) for x in val]
                loss, m = policy_loss_reference(logp, A, None, loss_type="reinforce", ref_logp=ref, beta=0.5,
                                                kl_estimator=name + st_, kl_clamp=clamp, agg="token-sum")
                what = f"{name}{st_} clamp={clamp}"
                assert_close(loss, 0.5 * sum(val), what)
                assert_close(ref_grad(loss, logp), [[0.5 * g for g in grad]], f"{what} grad")
                assert_close(m["kl_ref_mean"], sum(val) / 2, f"{what} metric")
    # D = -800: exp(800) overflows unless -D is clamped inside the exp; clamped, the value is 10, the gradient 0
    ref = t64([[-1.0 + 800.0, -1.0]])
    loss, _ = policy_loss_reference(logp, A, None, loss_type="reinforce", ref_logp=ref, beta=1.0, kl_clamp=True)
    g = ref_grad(loss, logp)
    assert_close(loss, 10.0 / 2, "k3 at D=-800")
    assert_close(g, [[0.0, 0.0]], "k3 grad at D=-800")


def test_reference_regression_by_hand():
    # two sequences, Lam = (-0.2 + 0.3, 0.5) against the anchor; rewards (1, 0)
    logp = t64([[-1.0, -2.0], [-1.0, 9.0]], grad=True)
    anchor = t64([[-0.8, -2.3], [-1.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    r = t64([1.0, 0.0])
    Lam = [0.1, 0.5]
    b2 = 1e-3
    # apo: b given
    b = t64([0.3, 0.4])
    L = [(b2 * Lam[i] - (float(r[i]) - float(b[i]))) ** 2 for i in range(2)]
    dL = [2 * (b2 * Lam[i] - (float(r[i]) - float(b[i]))) * b2 for i in range(2)]
    loss, _ = policy_loss_reference(logp, None, mask, ref_logp=anchor, rewards=r, baseline=b, loss_type="apo")
    assert_close(loss, sum(L) / 2, "apo")
    assert_close(ref_grad(loss, logp), [[dL[0] / 2, dL[0] / 2], [dL[1] / 2, 0.0]], "apo grad")
    # oapl: b = V* of the group (1, 0) with beta1 = 0.5 = 0.5 log((e^2 + 1) / 2)
    v = 0.5 * math.log((math.exp(2.0) + 1) / 2)
    loss, _ = policy_loss_reference(logp, None, mask, sampler_logp=anchor, rewards=r, loss_type="oapl", group_size=2)
    assert_close(loss, ((b2 * Lam[0] - (1 - v)) ** 2 + (b2 * Lam[1] - (0 - v)) ** 2) / 2, "oapl")
    # kimi: tau = 0.01, group mean 0.5
    loss, _ = policy_loss_reference(logp, None, mask, old_logp=anchor, rewards=r, loss_type="kimi", group_size=2)
    assert_close(loss, ((0.01 * Lam[0] - 0.5) ** 2 + (0.01 * Lam[1] + 0.5) ** 2) / 2, "kimi")
    # rebel: one pair, eta = 0.5
    loss, _ = policy_loss_reference(logp, None, mask, old_logp=anchor, rewards=r, loss_type="rebel", eta=0.5)
    x = (Lam[0] - Lam[1]) - 0.5 * (1.0 - 0.0)
    assert_close(loss, x * x, "rebel")
    assert_close(ref_grad(loss, logp), [[2 * x, 2 * x], [-2 * x, 0.0]], "rebel grad")


def test_reference_vstar_by_hand():
    assert_close(vstar_reference(t64([0.0, 1.0]), 1.0), math.log((1 + math.e) / 2), "vstar")
    assert_close(vstar_reference(t64([[3.0, 3.0, 3.0]]), 1e-3), [3.0], "vstar of equal rewards")
    assert_close(vstar_reference(t64([1e3, 0.0]), 1e-3), 1e3 - 1e-3 * math.log(2), "vstar, no overflow")


def test_reference_ignores_masked_garbage_and_all_masked_is_zero():
    for lt in LOSS_TYPES:
        for kind in ("padded", "packed"):
            kw = dict(beta=0.1, entropy_coef=0.01, agg_constant=7.0)
            clean = run(policy_loss_reference, layout(GRID_BATCH, kind), GRID_BATCH, lt, **kw)
            dirty = run(policy_loss_reference, layout(GRID_BATCH, kind, garbage=True), GRID_BATCH, lt, **kw)
            check_same(dirty, clean, f"reference {lt} {kind}")
    empty = make_batch((3, 0, 2, 4), seed=1, masked_seqs=(0, 1, 2, 3))
    for lt in LOSS_TYPES:
        res = run(policy_loss_reference, layout(empty, "packed", garbage=True), empty, lt, beta=0.1,
                  entropy_coef=0.01)
        assert res.loss == 0 and res.requires_grad
        assert torch.equal(res.g_logp, torch.zeros_like(res.g_logp))


# ----------------------------------------------------------------------------------------------------------------------
# 1. The fast path against the reference: the grids
# ----------------------------------------------------------------------------------------------------------------------

IS_OPTIONS = (None,) + IS_MODES


def test_grid_batch_exercises_every_branch():
    """On the grid batch, the reference's metrics show each clip side and each mismatch rule binding somewhere."""
    def metrics(loss_type, **kw):
        res = run(policy_loss_reference, layout(GRID_BATCH, "packed"), GRID_BATCH, loss_type, **kw)
        return {k: float(v) for k, v in res.metrics.items()}

    for lt, kw in (("ppo", {}), ("gspo", {}), ("gspo_token", {}), ("cispo", dict(eps_low=0.2))):
        m = metrics(lt, **kw)
        assert 0 < m["clip_frac_low"] < 1 and 0 < m["clip_frac_high"] < 1, (lt, m)
    for mode in IS_MODES:
        key = "is_frac_truncated" if mode.endswith("truncate") else "is_frac_masked"
        assert 0 < metrics("ppo", is_mode=mode)[key] < 1, mode


@pytest.mark.parametrize("is_mode", IS_OPTIONS, ids=[f"is-{m}" for m in IS_OPTIONS])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss_type", CLIPPED)
def test_clipped_family(loss_type, agg, is_mode):
    """Every clipped loss x aggregation x mismatch mode; token-level advantages (per sequence for gspo)."""
    kw = dict(agg=agg, is_mode=is_mode)
    if agg in ("constant", "seq-mean-token-sum-norm"):
        kw["agg_constant"] = 7.0
    check_against_reference(GRID_BATCH, loss_type, **kw)


BASELINES = {
    "apo": {"given": {}},
    "oapl": {"vstar-g2": {}, "vstar-g3-beta1-0.2": dict(group_size=3, beta1=0.2), "given": "baseline"},
    "kimi": {"mean-g2": {}, "mean-g3": dict(group_size=3), "given": "baseline"},
    "rebel": {"pairs": {}, "eta-0.5": dict(eta=0.5)},
}
REG_CASES = [(lt, name) for lt in REGRESSION for name in BASELINES[lt]]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss_type,variant", REG_CASES, ids=[f"{lt}-{v}" for lt, v in REG_CASES])
def test_regression_family(loss_type, variant, agg):
    """Every regression loss and baseline source; a KL term and an entropy bonus, so that ``agg`` matters."""
    kw = dict(agg=agg, beta=0.05, entropy_coef=0.01)
    spec = BASELINES[loss_type][variant]
    if spec == "baseline":
        kw.update(baseline=GRID_BATCH.baseline, group_size=None)
    else:
        kw.update(spec)
    if agg in ("constant", "seq-mean-token-sum-norm"):
        kw["agg_constant"] = 7.0
    check_against_reference(GRID_BATCH, loss_type, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_defaults(loss_type):
    """Nothing but the required arguments: the per-loss defaults (agg, eps, beta2) resolve as the spec says."""
    kw = dict(agg_constant=7.0) if loss_type == "dr_grpo" else {}
    check_against_reference(GRID_BATCH, loss_type, **kw)


# D = l - l_ref uniform in [-3.4, 3.4]: k3's clamp to [-10, 10] binds (D < -2.6), k2's never does (D^2 / 2 < 5.8).
KL_BATCH = make_batch(GRID_LENGTHS, seed=12, masked_seqs=(5,), kl_scale=3.4)
KL_LOSSES = ("ppo", "reinforce", "gspo_token", "kimi")


@pytest.mark.parametrize("kl_clamp", [False, True], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("loss_type", KL_LOSSES)
def test_kl_estimators(loss_type, kl_estimator, kl_clamp):
    kw = dict(beta=0.1, kl_estimator=kl_estimator, kl_clamp=kl_clamp)
    check_against_reference(KL_BATCH, loss_type, **kw)


def test_kl_batch_exercises_the_clamp():
    D = torch.cat([(lp - r)[m] for lp, r, m in zip(KL_BATCH.tok["logp"], KL_BATCH.tok["ref_logp"], KL_BATCH.mask)])
    k3 = torch.exp(-D) - 1 + D
    assert (k3 > 10).any() and (k3 < 10).any() and (D * D / 2 < 10).all()


def test_kl_clamp_keeps_an_extreme_log_ratio_finite():
    """D = -800 overflows exp(-D) unless -D is clamped inside the exp (spec: kl_clamp)."""
    batch = make_batch((4, 3), seed=13)
    batch.mask = [torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    batch.tok["ref_logp"][0] = batch.tok["logp"][0] + 800.0
    for lt in ("ppo", "kimi"):
        check_against_reference(batch, lt, beta=0.1, kl_clamp=True)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss_type", ("ppo", "gspo", "cispo", "apo", "rebel"))
def test_entropy_bonus(loss_type, agg):
    kw = dict(agg=agg, entropy_coef=0.03)
    if agg in ("constant", "seq-mean-token-sum-norm"):
        kw["agg_constant"] = 5.0
    check_against_reference(GRID_BATCH, loss_type, **kw)


# Options one at a time. Values: (loss_type, kwargs for run()).
DUAL_BATCH = make_batch(GRID_LENGTHS, seed=14, masked_seqs=(5,), ratio_scale=1.5)   # large ratios, A < 0 often
FEATURES = {
    **{f"{lt}-dual_clip-1.2": (lt, dict(dual_clip=1.2)) for lt in PPO_FORMS},
    "ppo-dual_clip-3": ("ppo", dict(dual_clip=3.0)),
    "ppo-eps_low-None": ("ppo", dict(eps_low=None)),
    "dapo-eps_low-None": ("dapo", dict(eps_low=None)),
    "gspo-eps_low-None": ("gspo", dict(eps_low=None, eps_high=0.1)),
    "gspo_token-eps_low-None": ("gspo_token", dict(eps_low=None, eps_high=0.1)),
    "ppo-eps-0.1-0.3": ("ppo", dict(eps_low=0.1, eps_high=0.3)),
    "gspo-eps-0.05": ("gspo", dict(eps_low=0.05, eps_high=0.05)),
    "cispo-eps_low-0.2": ("cispo", dict(eps_low=0.2)),
    "cispo-eps_high-0.1": ("cispo", dict(eps_high=0.1)),
    **{f"{lt}-token_weights": (lt, dict(token_weights=True)) for lt in CLIPPED},
    "ppo-token_weights-token_truncate-kl": ("ppo", dict(token_weights=True, is_mode="token_truncate", beta=0.1)),
    **{f"{lt}-reject-{m}": (lt, dict(is_mode=m, reject=True, agg=a, beta=0.1, entropy_coef=0.02))
       for lt, a in (("ppo", "token-mean"), ("gspo", "seq-mean-token-mean"), ("cispo", "seq-mean-token-sum"),
                     ("reinforce", "token-mean"), ("gspo_token", "token-sum"))
       for m in ("token_mask", "sequence_mask")},
    "ppo-token_mask-cap3-min0.7": ("ppo", dict(is_mode="token_mask", is_cap=3.0, is_min=0.7)),
    "ppo-sequence_mask-cap4-min0.1": ("ppo", dict(is_mode="sequence_mask", is_cap=4.0, is_min=0.1)),
    "ppo-token_truncate-cap1.2": ("ppo", dict(is_mode="token_truncate", is_cap=1.2)),
    "gspo-sequence_truncate-cap1.5": ("gspo", dict(is_mode="sequence_truncate", is_cap=1.5)),
    "reinforce-no-old_logp": ("reinforce", dict(drop=("old_logp",))),
    "reinforce-no-old_logp-token_truncate": ("reinforce", dict(drop=("old_logp",), is_mode="token_truncate")),
    "reinforce-no-old_logp-sequence_mask": ("reinforce", dict(drop=("old_logp",), is_mode="sequence_mask")),
    "ppo-num_tokens-50": ("ppo", dict(num_tokens=50)),
    "reinforce-num_tokens-50-entropy": ("reinforce", dict(num_tokens=50, entropy_coef=0.1)),
    "gspo-token-mean-num_tokens-3": ("gspo", dict(num_tokens=3, agg="token-mean")),
    "ppo-num_tokens-50-reject": ("ppo", dict(num_tokens=50, is_mode="token_mask", reject=True)),
    "kimi-num_tokens-50-kl": ("kimi", dict(num_tokens=50, beta=0.1, entropy_coef=0.1)),
    "ppo-num_tokens-0.5": ("ppo", dict(num_tokens=0.5)),
    **{f"{lt}-log_ratio_clamp-None": (lt, dict(log_ratio_clamp=None)) for lt in CLIPPED_WITH_OLD},
    "ppo-log_ratio_clamp-0.15": ("ppo", dict(log_ratio_clamp=0.15)),
    "dapo-log_ratio_clamp-0.1-dual": ("dapo", dict(log_ratio_clamp=0.1, dual_clip=1.05)),
    "gspo-log_ratio_clamp-0.05": ("gspo", dict(log_ratio_clamp=0.05, eps_low=0.1, eps_high=0.1)),
    "gspo_token-log_ratio_clamp-0.05": ("gspo_token", dict(log_ratio_clamp=0.05, eps_low=0.1, eps_high=0.1)),
    "cispo-log_ratio_clamp-0.1": ("cispo", dict(log_ratio_clamp=0.1)),
    **{f"{lt}-adv-seq": (lt, dict(adv="seq")) for lt in CLIPPED if lt != "gspo"},
    "ppo-mask-None": ("ppo", dict(mask=None)),
    "gspo-mask-None": ("gspo", dict(mask=None)),
    "kimi-mask-None": ("kimi", dict(mask=None, beta=0.1)),
    "apo-beta2-0.01": ("apo", dict(beta2=0.01)),
    "oapl-beta2-0.1": ("oapl", dict(beta2=0.1)),
    "kimi-beta2-0.05": ("kimi", dict(beta2=0.05)),
    "oapl-group1": ("oapl", dict(group_size=1)),
    "kimi-group6": ("kimi", dict(group_size=6)),
    "everything-ppo": ("ppo", dict(dual_clip=2.0, token_weights=True, is_mode="sequence_truncate", beta=0.2,
                                   kl_estimator="k2+", entropy_coef=0.05, agg="seq-mean-token-mean")),
    "everything-cispo": ("cispo", dict(token_weights=True, is_mode="token_mask", reject=True, beta=0.2,
                                       kl_estimator="abs", kl_clamp=True, entropy_coef=0.05, agg="token-sum")),
}


@pytest.mark.parametrize("name", list(FEATURES), ids=list(FEATURES))
def test_options(name):
    loss_type, kw = FEATURES[name]
    kw = dict(kw)
    batch = DUAL_BATCH if "dual" in name else GRID_BATCH
    if "dual" in name:           # make sure the option is exercised: the reference changes without it
        no_dual = {k: v for k, v in kw.items() if k != "dual_clip"}
        with_, without = (run(policy_loss_reference, layout(batch, "packed"), batch, loss_type, **k).loss
                          for k in (kw, no_dual))
        assert with_ != without
    check_against_reference(batch, loss_type, **kw)


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_rebel_pair_with_one_empty_sequence(kind):
    """A pair counts when n_2k + n_2k+1 > 0, and its loss uses both rewards even if one sequence has no loss token:
    L = ((Lam_0 - Lam_1) - eta (r_0 - r_1))^2 with Lam_0 = 0."""
    batch = make_batch((3, 2, 4, 2), seed=15)
    batch.mask = [torch.zeros(3, dtype=torch.bool), torch.tensor([True, True]), torch.ones(4, dtype=torch.bool),
                  torch.tensor([True, False])]
    lay = layout(batch, kind)
    out = run(policy_loss, lay, batch, "rebel", eta=0.7)
    r = batch.rewards.tolist()
    lam = [float((lp - old)[m].sum()) for lp, old, m in zip(batch.tok["logp"], batch.tok["old_logp"], batch.mask)]
    x = [(lam[0] - lam[1]) - 0.7 * (r[0] - r[1]), (lam[2] - lam[3]) - 0.7 * (r[2] - r[3])]
    assert_close(out.loss, (x[0] ** 2 + x[1] ** 2) / 2, "rebel loss, half-empty pair")
    check_same(out, run(policy_loss_reference, lay, batch, "rebel", eta=0.7), f"rebel {kind}")


def test_float_mask_and_int64_cu_seqlens():
    """A 0/1 float mask is the same as a bool one; int64 cu_seqlens the same as int32."""
    for kind in ("padded", "packed"):
        lay = layout(GRID_BATCH, kind)
        ref = run(policy_loss_reference, lay, GRID_BATCH, "ppo")
        check_same(run(policy_loss, lay, GRID_BATCH, "ppo", mask=lay.mask.to(F64)), ref, f"float mask {kind}")
    lay = layout(GRID_BATCH, "packed")
    lay.cu_seqlens = lay.cu_seqlens.long()
    ref = run(policy_loss_reference, lay, GRID_BATCH, "gspo")
    check_same(run(policy_loss, lay, GRID_BATCH, "gspo"), ref, "int64 cu_seqlens")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Garbage at masked positions changes nothing
# ----------------------------------------------------------------------------------------------------------------------

GARBAGE_CASES = [(lt, m) for lt in CLIPPED for m in ("token_mask", "sequence_truncate")] + \
                [(lt, None) for lt in REGRESSION]


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("loss_type,is_mode", GARBAGE_CASES, ids=[f"{lt}-{m}" for lt, m in GARBAGE_CASES])
def test_masked_garbage_changes_nothing(loss_type, is_mode, kind):
    """nan, +-inf and 1e300 at every masked position of every per-token input (logp, old/ref/sampler log-probs,
    entropy, token weights, token advantages): bitwise the same loss, gradients and metrics."""
    kw = dict(beta=0.1, entropy_coef=0.01, agg="seq-mean-token-mean")
    if loss_type in CLIPPED:
        kw.update(is_mode=is_mode, token_weights=True)
        if loss_type != "gspo":
            kw["adv"] = "tok"
    clean = run(policy_loss, layout(GRID_BATCH, kind), GRID_BATCH, loss_type, **kw)
    dirty = run(policy_loss, layout(GRID_BATCH, kind, garbage=True), GRID_BATCH, loss_type, **kw)
    what = f"{loss_type} {kind} with garbage"
    for name, a, b in (("loss", dirty.loss, clean.loss), ("d logp", dirty.g_logp, clean.g_logp),
                       ("d entropy", dirty.g_ent, clean.g_ent)):
        assert torch.isfinite(a).all(), f"{what}: non-finite {name}\n{a}"
        assert torch.equal(a, b), f"{what}: {name} changed\n{a}\nvs\n{b}"
    for k, v in clean.metrics.items():
        assert torch.equal(dirty.metrics[k], v), f"{what}: metric {k} changed: {dirty.metrics[k]} vs {v}"
    ref = run(policy_loss_reference, layout(GRID_BATCH, kind), GRID_BATCH, loss_type, **kw)
    check_same(dirty, ref, what, required_metrics(loss_type, kw))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Properties (hypothesis)
# ----------------------------------------------------------------------------------------------------------------------

@st.composite
def batches(draw, even=False, all_masked=False):
    """1-4 sequences (2 or 4 when ``even``) of 0-6 tokens, at various mask densities; in packed form N != B."""
    B = draw(st.sampled_from([2, 4])) if even else draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 6), min_size=B, max_size=B))
    if sum(lengths) == B:                         # [B] and [N] advantages would be ambiguous
        lengths[0] += 1
    seed = draw(st.integers(0, 2**16))
    mask_p = draw(st.sampled_from([0.4, 0.8, 1.0]))
    masked = tuple(range(B)) if all_masked else ()
    return make_batch(lengths, seed, mask_p=mask_p, ratio_scale=draw(st.sampled_from([0.05, 0.3, 1.0])),
                      masked_seqs=masked)


@st.composite
def loss_options(draw, loss_type):
    """Random options valid for ``loss_type``."""
    kw = dict(agg=draw(st.sampled_from(AGGS)))
    if kw["agg"] in ("constant", "seq-mean-token-sum-norm"):
        kw["agg_constant"] = draw(st.sampled_from([1.0, 6.0]))
    if draw(st.booleans()):
        kw.update(beta=draw(st.sampled_from([0.05, -0.1])), kl_estimator=draw(st.sampled_from(KL_ESTIMATORS)),
                  kl_clamp=draw(st.booleans()))
    if draw(st.booleans()):
        kw["entropy_coef"] = 0.02
    if loss_type in CLIPPED:
        kw["is_mode"] = draw(st.sampled_from(IS_OPTIONS))
        if kw["is_mode"] and kw["is_mode"].endswith("mask"):
            kw["reject"] = draw(st.booleans())
        kw["token_weights"] = draw(st.booleans())
        if loss_type != "gspo":
            kw["adv"] = draw(st.sampled_from(["tok", "seq"]))
    if loss_type in PPO_FORMS and draw(st.booleans()):
        kw["dual_clip"] = 1.5
    if loss_type in CLIPPED_WITH_OLD and draw(st.booleans()):
        kw.update(eps_low=draw(st.sampled_from([None, 0.1, 0.2])), eps_high=draw(st.sampled_from([0.05, 0.28])))
    return kw


def draw_case(data, loss_type):
    batch = data.draw(batches(even=loss_type in REGRESSION))
    kw = data.draw(loss_options(loss_type))
    if loss_type in ("oapl", "kimi"):
        kw["group_size"] = data.draw(st.sampled_from([1, 2]))
    return batch, kw


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(data=st.data())
def test_padded_equals_packed(loss_type, data):
    """The same batch in both layouts: same loss, same gradients token for token, same metrics; both = reference."""
    batch, kw = draw_case(data, loss_type)
    res = {}
    for kind in ("padded", "packed"):
        out = run(policy_loss, layout(batch, kind), batch, loss_type, **kw)
        ref = run(policy_loss_reference, layout(batch, kind), batch, loss_type, **kw)
        check_same(out, ref, f"{loss_type} {kind} {kw}")
        res[kind] = out
    a, b = res["padded"], res["packed"]
    assert_close(a.loss, b.loss, "padded vs packed loss")
    assert_close(canonical(a.g_logp, batch, "padded"), b.g_logp, "padded vs packed d logp")
    assert_close(canonical(a.g_ent, batch, "padded"), b.g_ent, "padded vs packed d entropy")
    for k in set(a.metrics) | set(b.metrics):
        assert_close(a.metrics[k], b.metrics[k], f"padded vs packed metric {k}")


@pytest.mark.parametrize("loss_type", CLIPPED_WITH_OLD)
@given(data=st.data())
def test_first_pass_gradient_is_reinforce(loss_type, data):
    """With old_logp = sg(logp) every ratio is 1 and every clipped loss has the REINFORCE gradient (same agg).

    gspo's gradient spreads evenly over a sequence's tokens, so for gspo the mismatch weights must be per sequence.
    """
    batch = data.draw(batches())
    batch.tok["old_logp"] = [x.clone() for x in batch.tok["logp"]]
    modes = [None, "sequence_truncate", "sequence_mask"] + ([] if loss_type == "gspo" else ["token_truncate"])
    kw = dict(agg=data.draw(st.sampled_from(AGGS)), agg_constant=3.0, is_mode=data.draw(st.sampled_from(modes)),
              beta=data.draw(st.sampled_from([0.0, 0.1])), entropy_coef=data.draw(st.sampled_from([0.0, 0.1])))
    adv = "seq" if loss_type == "gspo" else data.draw(st.sampled_from(["tok", "seq"]))
    kind = data.draw(st.sampled_from(["padded", "packed"]))
    lay = layout(batch, kind)
    lay.x["old_logp"] = lay.x["logp"].detach()
    out = run(policy_loss, lay, batch, loss_type, adv=adv, **kw)
    rf = run(policy_loss, lay, batch, "reinforce", adv=adv, **kw)
    assert_close(out.g_logp, rf.g_logp, f"{loss_type} vs reinforce d logp ({kind}, {kw})")
    assert_close(out.g_ent, rf.g_ent, f"{loss_type} vs reinforce d entropy")
    ref = run(policy_loss_reference, lay, batch, "reinforce", adv=adv, **kw)
    assert_close(rf.g_logp, ref.g_logp, "reinforce vs reference")


@given(data=st.data())
def test_gspo_token_equals_gspo_on_sequence_advantages(data):
    """Same loss and gradient with A per sequence [B], given no per-token multiplier (token weights or token-level
    mismatch weights): gspo spreads its gradient evenly over a sequence, gspo_token weights it per token."""
    batch = data.draw(batches())
    kw = data.draw(loss_options("gspo"))
    kw["token_weights"] = False
    if kw["is_mode"] and kw["is_mode"].startswith("token"):
        kw["is_mode"] = "sequence" + kw["is_mode"][len("token"):]
    eps = data.draw(st.sampled_from([None, 0.05, 0.3]))
    if eps is not None:
        kw.update(eps_low=eps, eps_high=eps)
    kind = data.draw(st.sampled_from(["padded", "packed"]))
    a = run(policy_loss, layout(batch, kind), batch, "gspo", **kw)
    b = run(policy_loss, layout(batch, kind), batch, "gspo_token", adv="seq", **kw)
    assert_close(b.loss, a.loss, f"gspo_token vs gspo loss ({kind}, {kw})")
    assert_close(b.g_logp, a.g_logp, f"gspo_token vs gspo d logp ({kind}, {kw})")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(data=st.data())
def test_all_masked_is_zero(loss_type, data):
    """m == 0 everywhere: loss exactly 0, gradients exactly 0 (and present: backward works), no NaN."""
    batch = data.draw(batches(even=loss_type in REGRESSION, all_masked=True))
    kw = data.draw(loss_options(loss_type))
    if loss_type in ("oapl", "kimi"):
        kw["group_size"] = 2
    kind = data.draw(st.sampled_from(["padded", "packed"]))
    out = run(policy_loss, layout(batch, kind, garbage=data.draw(st.booleans())), batch, loss_type, **kw)
    assert out.loss == 0, f"{kind} {kw}: loss {out.loss}"
    assert out.requires_grad, "the all-masked loss must still be differentiable (backward on every rank)"
    assert torch.equal(out.g_logp, torch.zeros_like(out.g_logp)), out.g_logp
    assert torch.equal(out.g_ent, torch.zeros_like(out.g_ent)), out.g_ent
    for k, v in out.metrics.items():
        assert torch.isfinite(v), f"metric {k} = {v}"


def test_packed_batch_of_only_empty_segments():
    """N = 0: every segment empty."""
    batch = make_batch((0, 0), seed=3)
    for lt in ("ppo", "gspo", "kimi"):
        out = run(policy_loss, layout(batch, "packed"), batch, lt, beta=0.1, entropy_coef=0.1)
        assert out.loss == 0 and out.g_logp.shape == (0,)


# ----------------------------------------------------------------------------------------------------------------------
# 4. vstar
# ----------------------------------------------------------------------------------------------------------------------

@given(K=st.integers(1, 3), G=st.integers(1, 9), scale=st.sampled_from([1.0, 30.0]),
       beta1=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_vstar_matches_reference(K, G, scale, beta1, seed):
    r = scale * torch.randn(K, G, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert_close(vstar(r, beta1), vstar_reference(r, beta1), f"vstar beta1={beta1}")


@given(G=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_vstar_limits(G, seed):
    r = torch.rand(2, 3, G, generator=torch.Generator().manual_seed(seed), dtype=F64)     # rewards in [0, 1)
    assert vstar(r, 0.5).shape == (2, 3)
    assert_close(vstar(r, 1e6), r.mean(-1), "beta1 -> inf gives the mean", rtol=1e-6)
    assert_close(vstar(r, 1e-4), r.max(-1).values, "beta1 -> 0 gives the max", rtol=1e-3)
    big = 1e3 * r                                                                          # r / beta1 up to 1e6
    v = vstar(big, 1e-3)
    assert torch.isfinite(v).all()
    assert_close(v, big.max(-1).values, "no overflow at beta1=1e-3, rewards 1e3", rtol=1e-5)
    lo, hi = r.mean(-1), r.max(-1).values
    for b1 in (1e-2, 0.5, 10.0):
        v = vstar(r, b1)
        assert (v >= lo - 1e-12).all() and (v <= hi + 1e-12).all(), "mean <= V* <= max"


# ----------------------------------------------------------------------------------------------------------------------
# 5. A multi-turn agent trajectory
# ----------------------------------------------------------------------------------------------------------------------

# Segments of each trajectory: (kind, length); "prompt", "tool" and "obs" tokens are not the policy's.
TRAJECTORIES = [
    [("prompt", 4), ("asst", 5), ("tool", 3), ("asst", 4), ("obs", 6), ("asst", 3)],
    [("prompt", 2), ("asst", 2), ("tool", 7), ("asst", 1)],
    [("prompt", 5), ("asst", 6)],
    [("prompt", 3), ("asst", 3), ("tool", 2), ("asst", 2), ("tool", 1), ("asst", 4)],
]
AGENT_CASES = {
    "ppo": dict(is_mode="token_truncate", beta=0.05, entropy_coef=0.01),
    "dapo": dict(agg="seq-mean-token-sum", dual_clip=2.0),
    "dr_grpo": dict(agg_constant=16.0),
    "gspo": dict(is_mode="sequence_mask", eps_low=0.2, eps_high=0.2),
    "gspo_token": dict(is_mode="sequence_truncate", beta=0.1, kl_estimator="k3+"),
    "cispo": dict(is_mode="token_mask", reject=True),
    "reinforce": dict(agg="seq-mean-token-mean", entropy_coef=0.05),
    "apo": dict(beta=0.1),
    "oapl": dict(),
    "kimi": dict(entropy_coef=0.02),
    "rebel": dict(beta=0.1, kl_estimator="k2"),
}


@pytest.mark.parametrize("loss_type", list(AGENT_CASES))
def test_agent_trajectory_masking_equals_deleting(loss_type):
    """Tool/observation tokens masked out == the same trajectories with those tokens deleted (packed layout)."""
    kw = dict(AGENT_CASES[loss_type])
    lengths = [sum(n for _, n in traj) for traj in TRAJECTORIES]
    full = make_batch(lengths, seed=21)
    full.mask = [torch.cat([torch.full((n,), kind == "asst") for kind, n in traj]) for traj in TRAJECTORIES]
    kept = [m.nonzero().flatten() for m in full.mask]
    short = replace(full, lengths=[len(k) for k in kept], mask=[torch.ones(len(k), dtype=torch.bool) for k in kept],
                    tok={f: [x[k] for x, k in zip(full.tok[f], kept)] for f in TOKEN_FIELDS})
    a = run(policy_loss, layout(full, "packed"), full, loss_type, **kw)
    b = run(policy_loss, layout(short, "packed"), short, loss_type, mask=None, **kw)
    flat_kept = torch.cat(full.mask)
    assert_close(a.loss, b.loss, "masked vs deleted loss")
    assert_close(a.g_logp[flat_kept], b.g_logp, "masked vs deleted d logp")
    assert_close(a.g_ent[flat_kept], b.g_ent, "masked vs deleted d entropy")
    assert torch.equal(a.g_logp[~flat_kept], torch.zeros(int((~flat_kept).sum()), dtype=F64))
    for k in set(a.metrics) & set(b.metrics):
        assert_close(a.metrics[k], b.metrics[k], f"masked vs deleted metric {k}")
    ref = run(policy_loss_reference, layout(full, "packed"), full, loss_type, **kw)
    check_same(a, ref, f"agent {loss_type}")


# ----------------------------------------------------------------------------------------------------------------------
# 6. Bad input
# ----------------------------------------------------------------------------------------------------------------------

def _bad_args(B=2, T=5, **over):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g, dtype=F64)
    args = dict(logp=lp, advantages=torch.randn(B, T, generator=g, dtype=F64), mask=torch.ones(B, T, dtype=torch.bool),
                old_logp=lp - 0.1, loss_type="ppo")
    args.update(over)
    return args


def _packed(**over):
    lp = -torch.rand(10, dtype=F64)
    args = dict(logp=lp, advantages=torch.randn(10, dtype=F64), mask=torch.ones(10, dtype=torch.bool),
                cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), old_logp=lp - 0.1)
    args.update(over)
    return args


_lp = -torch.rand(2, 5, dtype=F64)
_r2 = torch.rand(2, dtype=F64)
BAD = {
    # name: (arguments, message fragment naming the argument); every one raises ValueError
    "loss_type-unknown": (_bad_args(loss_type="grpo++"), "loss_type"),
    "agg-unknown": (_bad_args(agg="mean"), "agg"),
    "is_mode-unknown": (_bad_args(is_mode="token", sampler_logp=_lp), "is_mode"),
    "kl_estimator-unknown": (_bad_args(beta=0.1, ref_logp=_lp, kl_estimator="k4"), "kl_estimator"),
    "mask-shape": (_bad_args(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    "old_logp-shape": (_bad_args(old_logp=torch.zeros(2, 6, dtype=F64)), "old_logp"),
    "advantages-shape": (_bad_args(advantages=torch.zeros(3, dtype=F64)), "advantages"),
    "advantages-token-shape": (_bad_args(advantages=torch.zeros(2, 4, dtype=F64)), "advantages"),
    "ref_logp-shape": (_bad_args(beta=0.1, ref_logp=torch.zeros(5, 2, dtype=F64)), "ref_logp"),
    "sampler_logp-shape": (_bad_args(is_mode="token_truncate", sampler_logp=torch.zeros(2, 4, dtype=F64)),
                           "sampler_logp"),
    "entropy-shape": (_bad_args(entropy=torch.zeros(2, 4, dtype=F64), entropy_coef=0.1), "entropy"),
    "token_weights-shape": (_bad_args(token_weights=torch.zeros(10, dtype=F64)), "token_weights"),
    "rewards-shape": (_bad_args(loss_type="kimi", rewards=torch.zeros(3, dtype=F64), group_size=1), "rewards"),
    "baseline-shape": (_bad_args(loss_type="apo", ref_logp=_lp, rewards=_r2, baseline=torch.zeros(3, dtype=F64)),
                       "baseline"),
    "packed-mask-shape": (_packed(mask=torch.ones(9, dtype=torch.bool)), "mask"),
    "packed-old_logp-shape": (_packed(old_logp=torch.zeros(9, dtype=F64)), "old_logp"),
    "cu_seqlens-decreasing": (_packed(cu_seqlens=torch.tensor([0, 6, 3, 10], dtype=torch.int32)), "cu_seqlens"),
    "cu_seqlens-not-ending-at-N": (_packed(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)), "cu_seqlens"),
    "cu_seqlens-past-N": (_packed(cu_seqlens=torch.tensor([0, 3, 12], dtype=torch.int32)), "cu_seqlens"),
    "cu_seqlens-not-starting-at-0": (_packed(cu_seqlens=torch.tensor([1, 5, 10], dtype=torch.int32)), "cu_seqlens"),
    **{f"{lt}-without-old_logp": (_bad_args(loss_type=lt, old_logp=None, agg_constant=4.0,
                                            **({"advantages": _r2} if lt == "gspo" else {})), "old_logp")
       for lt in CLIPPED_WITH_OLD},
    **{f"{lt}-without-rewards": (_bad_args(loss_type=lt, advantages=None, ref_logp=_lp, sampler_logp=_lp,
                                           baseline=_r2, **({"group_size": 2} if lt in ("oapl", "kimi") else {})),
                                 "rewards")
       for lt in REGRESSION},
    "apo-without-baseline": (_bad_args(loss_type="apo", advantages=None, ref_logp=_lp, rewards=_r2), "baseline"),
    "apo-without-ref_logp": (_bad_args(loss_type="apo", advantages=None, rewards=_r2, baseline=_r2), "ref_logp"),
    "oapl-without-sampler_logp": (_bad_args(loss_type="oapl", advantages=None, rewards=_r2, baseline=_r2),
                                  "sampler_logp"),
    "kimi-without-old_logp": (_bad_args(loss_type="kimi", advantages=None, old_logp=None, rewards=_r2,
                                        group_size=2), "old_logp"),
    "rebel-without-old_logp": (_bad_args(loss_type="rebel", advantages=None, old_logp=None, rewards=_r2), "old_logp"),
    "oapl-without-baseline-or-group_size": (_bad_args(loss_type="oapl", advantages=None, sampler_logp=_lp,
                                                      rewards=_r2), "group_size"),
    "kimi-without-baseline-or-group_size": (_bad_args(loss_type="kimi", advantages=None, rewards=_r2), "group_size"),
    "gspo-token-level-advantages": (_bad_args(loss_type="gspo"), "advantages"),
    "rebel-odd-B": (_bad_args(B=3, loss_type="rebel", advantages=None, rewards=torch.rand(3, dtype=F64)),
                    "even|pair"),
    "is_mode-without-sampler_logp": (_bad_args(is_mode="token_truncate"), "sampler_logp"),
    "regression-with-is_mode": (_bad_args(loss_type="kimi", advantages=None, rewards=_r2, group_size=2,
                                          is_mode="token_truncate", sampler_logp=_lp), "is_mode"),
    "entropy_coef-without-entropy": (_bad_args(entropy_coef=0.1), "entropy"),
    "constant-without-agg_constant": (_bad_args(agg="constant"), "agg_constant"),
    "dr_grpo-without-agg_constant": (_bad_args(loss_type="dr_grpo"), "agg_constant"),
    "agg_constant-zero": (_bad_args(agg="constant", agg_constant=0.0), "agg_constant"),
    "beta-without-ref_logp": (_bad_args(beta=0.1), "ref_logp"),
    # an option the loss does not take is an error, never silently ignored (apo's V* is computed offline)
    "apo-does-not-take-beta1": (_bad_args(loss_type="apo", advantages=None, ref_logp=_lp, rewards=_r2, baseline=_r2,
                                          beta1=7.0), "beta1"),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    args, fragment = BAD[name]
    args = dict(args)
    logp, adv, mask = args.pop("logp"), args.pop("advantages"), args.pop("mask")
    with pytest.raises(ValueError, match=fragment):
        policy_loss(logp, adv, mask, **args)


@pytest.mark.parametrize("beta1", [0.0, -1.0])
def test_vstar_bad_beta1(beta1):
    with pytest.raises(ValueError, match="beta1"):
        vstar(torch.rand(2, 4, dtype=F64), beta1)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Metrics
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_metrics_are_detached_0d_tensors(loss_type):
    kw = dict(beta=0.1, entropy_coef=0.01)
    if loss_type in CLIPPED:
        kw["is_mode"] = "token_truncate"
    out = run(policy_loss, layout(GRID_BATCH, "padded"), GRID_BATCH, loss_type, **kw)
    assert out.metrics, "no metrics"
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, f"{k}: {v!r}"
        assert v.grad_fn is None and torch.isfinite(v), f"{k}: {v!r}"
    ref = run(policy_loss_reference, layout(GRID_BATCH, "padded"), GRID_BATCH, loss_type, **kw)
    check_metrics(out, ref, loss_type, required_metrics(loss_type, kw))
