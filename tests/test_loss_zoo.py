"""The newer policy losses (``docs/losses.md`` section 8) and the clipped-family options that came with them.

- Every new loss, and every new option, against the float64 reference ``rlcore.loss_reference`` on both layouts:
  value, gradients w.r.t. ``logp`` and ``entropy``, metrics (the harness of ``tests/test_losses.py``).
- Masked garbage changes nothing; an all-masked batch gives 0 and zero gradients; padded equals packed.
- The peers' spellings that are rlcore options under another name, shown equal: TRL's ``delta`` is ``dual_clip``,
  verl's ``gpg`` is ``reinforce``, TRL's absolute CISPO cap ``epsilon_high=5`` is ``eps_high=4``, TRL's
  ``importance_sampling_level="sequence"`` PPO form is ``ratio_level="sequence"``, and ``gspo`` is that form with
  per-sequence advantages.
- ``clip_cov``, ``kl_cov`` and ``top_entropy_quantile`` under ``torch.compile(fullgraph=True)``.
- The registry: read-only, a user's own loss registered and used, and bad input naming the argument.

The peers' own code is checked in ``tests/test_loss_peers.py`` (skipped where TRL / verl are not installed).
"""

from __future__ import annotations

import pytest
import torch
from .test_losses import (F64, GRID_BATCH, _bad_args, _lp, _r2, assert_close, canonical, check_same,
                         layout, make_batch, run)

import rlcore
from rlcore import policy_loss, register_loss
from rlcore.loss_reference import ZOO, policy_loss_reference

ALWAYS = {"num_tokens", "num_seqs", "ratio_mean", "ratio_min", "ratio_max", "approx_kl_old"}

# (loss_type, options); the batch's logp/old/ref/sampler log-probs are as in tests/test_losses.py
CASES = {
    "sapo": ("sapo", {}),
    "sapo-sequence": ("sapo", dict(ratio_level="sequence")),
    "sapo-taus": ("sapo", dict(sapo_tau_pos=2.0, sapo_tau_neg=0.5, agg="token-mean")),
    "vespo": ("vespo", {}),
    "vespo-is-token": ("vespo", dict(is_mode="token_truncate")),
    "vespo-is-sequence": ("vespo", dict(is_mode="sequence_mask", vespo_k_neg=1.0, vespo_lambda_neg=0.5)),
    "luspo": ("luspo", {}),
    "luspo-token-eps": ("luspo", dict(ratio_level="token", eps_low=0.1, eps_high=0.1)),
    "gmpo": ("gmpo", {}),
    "gmpo-narrow-is": ("gmpo", dict(eps_low=0.05, eps_high=0.1, is_mode="token_mask")),
    "gmpo-kl-weighted": ("gmpo", dict(beta=0.1, kl_is_weighted=True, num_seqs=7)),
    "dro": ("dro", dict(dro_beta=0.5)),
    "dro-kl": ("dro", dict(dro_beta=2.0, beta=0.1, agg="seq-mean-token-mean")),
    "dppo_tv": ("dppo_tv", dict(eps_low=0.05, eps_high=0.05)),
    "dppo_tv-cap": ("dppo_tv", dict(dppo_ratio_cap=1.1)),
    "dppo_kl": ("dppo_kl", dict(eps_low=0.01, eps_high=0.02)),
    "clip_cov": ("clip_cov", dict(cov_ratio=0.3, clip_cov_lb=-0.5, clip_cov_ub=0.5)),
    "clip_cov-default": ("clip_cov", {}),
    "kl_cov": ("kl_cov", dict(cov_ratio=0.2)),
    "kl_cov-coef": ("kl_cov", dict(cov_ratio=0.5, kl_cov_coef=3.0, is_mode="token_truncate")),
    # the clipped-family options, on old and new losses
    "ppo-sequence": ("ppo", dict(ratio_level="sequence")),
    "dapo-sequence-dual": ("dapo", dict(ratio_level="sequence", dual_clip=1.5)),
    "cispo-sequence": ("cispo", dict(ratio_level="sequence")),
    "ppo-top-entropy-0.2": ("ppo", dict(top_entropy_quantile=0.2)),
    "cispo-top-entropy-0.5": ("cispo", dict(top_entropy_quantile=0.5, is_mode="token_mask")),
    "gspo-top-entropy-1": ("gspo", dict(top_entropy_quantile=1.0)),
    "ppo-off-policy-0": ("ppo", dict(off_policy_mask=0.0)),
    "sapo-off-policy-0.2": ("sapo", dict(off_policy_mask=0.2)),
    "reinforce-off-policy-no-sampler": ("reinforce", dict(off_policy_mask=0.05, drop=("sampler_logp",))),
    "ppo-kl-weighted": ("ppo", dict(beta=0.2, kl_is_weighted=True)),
    "gspo_token-kl-weighted": ("gspo_token", dict(beta=0.2, kl_is_weighted=True, kl_estimator="k2")),
    "luspo-kl-weighted": ("luspo", dict(beta=0.1, kl_is_weighted=True)),
    "ppo-num_seqs": ("ppo", dict(agg="seq-mean-token-mean", num_seqs=11)),
    "kimi-num_seqs": ("kimi", dict(num_seqs=9)),
    "ppo-sum-norm": ("ppo", dict(agg="seq-mean-token-sum-norm", agg_constant=6.0)),
    "reinforce-sum-norm-num_seqs": ("reinforce", dict(agg="seq-mean-token-sum-norm", agg_constant=4.0, num_seqs=3)),
    "everything-sapo": ("sapo", dict(top_entropy_quantile=0.6, off_policy_mask=0.1, beta=0.05, kl_is_weighted=True,
                                     is_mode="sequence_truncate", token_weights=True, entropy_coef=0.01)),
}


def _fresh(kw):
    """The options of one call: clip_cov gets a generator seeded the same way for every call."""
    kw = dict(kw)
    if CASES.get(kw.pop("_case", ""), ("",))[0] == "clip_cov":
        kw["generator"] = torch.Generator().manual_seed(1234)
    return kw


def check_case(batch, loss_type, kw, kinds=("padded", "packed"), garbage=False, case=""):
    for kind in kinds:
        out = run(policy_loss, layout(batch, kind, garbage), batch, loss_type, **_fresh(dict(kw, _case=case)))
        ref = run(policy_loss_reference, layout(batch, kind, garbage), batch, loss_type,
                  **_fresh(dict(kw, _case=case)))
        ratio_based = loss_type not in ("reinforce", "apo", "oapl", "kimi", "rebel")
        required = ALWAYS if ratio_based else {"num_tokens", "num_seqs"}
        check_same(out, ref, f"{case} {kind}", required)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_against_reference(case):
    loss_type, kw = CASES[case]
    check_case(GRID_BATCH, loss_type, kw, case=case)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_masked_garbage_changes_nothing(case):
    loss_type, kw = CASES[case]
    for kind in ("padded", "packed"):
        clean = run(policy_loss, layout(GRID_BATCH, kind), GRID_BATCH, loss_type, **_fresh(dict(kw, _case=case)))
        dirty = run(policy_loss, layout(GRID_BATCH, kind, garbage=True), GRID_BATCH, loss_type,
                    **_fresh(dict(kw, _case=case)))
        check_same(dirty, clean, f"{case} {kind} garbage")


# clip_cov's random choice is drawn over the layout's shape, so it differs between layouts (each matches the reference)
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("clip_cov")])
def test_padded_equals_packed(case):
    loss_type, kw = CASES[case]
    a = run(policy_loss, layout(GRID_BATCH, "padded"), GRID_BATCH, loss_type, **_fresh(dict(kw, _case=case)))
    b = run(policy_loss, layout(GRID_BATCH, "packed"), GRID_BATCH, loss_type, **_fresh(dict(kw, _case=case)))
    assert_close(a.loss, b.loss, "loss")
    assert_close(canonical(a.g_logp, GRID_BATCH, "padded"), b.g_logp, "d logp")
    for k in a.metrics:
        assert_close(a.metrics[k], b.metrics[k], f"metric {k}")


@pytest.mark.parametrize("loss_type", ZOO)
def test_all_masked_is_zero(loss_type):
    empty = make_batch((3, 0, 2, 4), seed=1, masked_seqs=(0, 1, 2, 3))
    kw = dict(CASES.get(loss_type, (loss_type, {}))[1], beta=0.1, entropy_coef=0.01)
    res = run(policy_loss, layout(empty, "packed", garbage=True), empty, loss_type, **_fresh(dict(kw, _case=loss_type)))
    assert res.loss == 0 and torch.equal(res.g_logp, torch.zeros_like(res.g_logp))


def test_every_case_binds_somewhere():
    """The grid batch exercises each rule: masks drop some tokens but not all, selections pick some tokens."""
    def metric(case, key):
        loss_type, kw = CASES[case]
        return float(run(policy_loss, layout(GRID_BATCH, "packed"), GRID_BATCH, loss_type,
                         **_fresh(dict(kw, _case=case))).metrics[key])
    assert 0 < metric("dppo_tv", "dppo_mask_frac") < 1
    assert 0 < metric("dppo_kl", "dppo_mask_frac") < 1
    assert 0 < metric("clip_cov", "clip_cov_frac") < 1
    assert 0 < metric("kl_cov", "kl_cov_frac") < 1
    assert 0 < metric("ppo-top-entropy-0.2", "entropy_keep_frac") < 1
    assert 0 < metric("ppo-off-policy-0", "off_policy_mask_frac") < 1


# ----------------------------------------------------------------------------------------------------------------------
# The peers' spellings of rlcore options
# ----------------------------------------------------------------------------------------------------------------------


def _tensors(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=F64) * 2 + 0.1)
    old = lp + 0.6 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return lp.requires_grad_(), old, adv, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, [x])
    return g


def test_trl_delta_is_dual_clip():
    """TRL's two-sided clip ``-min(min(r, delta) A, clip(r) A)`` equals ``dual_clip=delta``, value and gradient."""
    lp, old, adv, mask = _tensors(1)
    delta = 1.6
    r = torch.exp(lp - old)
    A = adv[:, None]
    trl = -torch.minimum(torch.clamp(r, max=delta) * A, torch.clamp(r, 0.8, 1.2) * A)
    trl = (trl * mask).sum() / mask.sum()
    ours = policy_loss(lp, adv, mask, old_logp=old, dual_clip=delta).loss
    assert_close(ours, trl, "loss")
    assert_close(_grad(ours, lp), _grad(trl, lp), "grad")


def test_verl_gpg_is_reinforce():
    lp, old, adv, mask = _tensors(2)
    gpg = (-lp * adv[:, None] * mask).sum() / mask.sum()
    ours = policy_loss(lp, adv, mask, loss_type="reinforce").loss
    assert_close(ours, gpg, "loss")
    assert_close(_grad(ours, lp), _grad(gpg, lp), "grad")


def test_trl_cispo_cap_5_is_eps_high_4():
    lp, old, adv, mask = _tensors(3)
    trl = -(torch.clamp(torch.exp(lp - old), max=5.0).detach() * adv[:, None] * lp * mask).sum() / mask.sum()
    ours = policy_loss(lp, adv, mask, old_logp=old, loss_type="cispo", eps_high=4.0).loss
    assert_close(ours, trl, "loss")
    assert_close(_grad(ours, lp), _grad(trl, lp), "grad")


def test_sequence_ratio_level_is_gspo_form():
    """``ppo`` at ``ratio_level="sequence"`` with GSPO's eps and aggregation is ``gspo``."""
    lp, old, adv, mask = _tensors(4)
    kw = dict(old_logp=old, eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean")
    a = policy_loss(lp, adv, mask, ratio_level="sequence", **kw).loss
    b = policy_loss(lp, adv, mask, loss_type="gspo", **kw).loss
    assert_close(a, b, "loss")
    assert_close(_grad(a, lp), _grad(b, lp), "grad")


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile, no host sync
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,kw", [
    ("clip_cov", dict(cov_ratio=0.3, clip_cov_lb=-0.5, clip_cov_ub=0.5)),
    ("kl_cov", dict(cov_ratio=0.2)),
    ("ppo", dict(top_entropy_quantile=0.3, off_policy_mask=0.1)),
], ids=["clip_cov", "kl_cov", "top_entropy_quantile"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiles_fullgraph(loss_type, kw, packed):
    lp, old, adv, mask = _tensors(5)
    ent = torch.rand(lp.shape, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    if packed:
        lengths = [6, 6, 6, 6]
        lp = lp.detach().reshape(-1).requires_grad_()
        old, mask, ent = old.reshape(-1), mask.reshape(-1), ent.reshape(-1)
        kw = dict(kw, cu_seqlens=torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32))
    if loss_type == "clip_cov":
        # equal candidates for the random choice, so that eager and compiled (different RNG streams) agree
        kw = dict(kw, cov_ratio=1.0)

    def f(logp):
        return policy_loss(logp, adv, mask, old_logp=old, entropy=ent, loss_type=loss_type, check_inputs=False,
                           **kw).loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want, got = f(lp), compiled(lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grad(got, lp), _grad(want, lp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist on CUDA")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("loss_type,kw", [("clip_cov", {}), ("kl_cov", {}), ("ppo", dict(top_entropy_quantile=0.2)),
                                          ("sapo", dict(off_policy_mask=0.1, num_seqs=4)), ("gmpo", {}),
                                          ("vespo", {})])
def test_no_host_sync(loss_type, kw, packed):
    lp, old, adv, mask = (x.cuda() for x in _tensors(6))
    if packed:
        lp, old, mask = lp.reshape(-1), old.reshape(-1), mask.reshape(-1)
        kw = dict(kw, cu_seqlens=torch.arange(5, device="cuda", dtype=torch.int32) * 6)
    lp = lp.detach().requires_grad_()
    ent = torch.rand(lp.shape, device="cuda", dtype=F64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = policy_loss(lp, adv, mask, old_logp=old, entropy=ent, loss_type=loss_type, check_inputs=False, **kw)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(lp.grad).all()


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------


def test_registry_is_read_only_and_complete():
    assert set(ZOO) <= set(rlcore.LOSSES)
    with pytest.raises(TypeError):
        rlcore.LOSSES["mine"] = rlcore.LOSSES["ppo"]
    for name, spec in rlcore.LOSSES.items():
        assert spec.name == name and spec.peer, name
        for opt in spec.options:
            assert opt in rlcore.losses.OPTIONS, (name, opt)


def _readme_example() -> str:
    """The README's "Your own loss" code block, as written."""
    import pathlib
    import re
    import textwrap

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    (block,) = [b for b in blocks if "register_loss(" in b]
    return block


def test_register_a_users_loss():
    """The README's example runs as written, and its loss is what it says: the capped PG term with the driver's
    mismatch weights, in ``policy_loss`` and in both strategies of ``fused_policy_loss``."""
    scope: dict = {}
    try:
        exec(_readme_example(), scope)
        spec = rlcore.LOSSES["capped_pg"]
        lp, old, adv, mask = _tensors(7)
        out = policy_loss(lp, adv, mask, old_logp=old, loss_type="capped_pg", is_mode="token_truncate",
                          sampler_logp=old - 0.1)
        w = torch.clamp(torch.exp(torch.tensor(0.1, dtype=F64)), max=2.0)
        want = (-torch.clamp(torch.exp(lp - old), max=1.5) * adv[:, None] * w * mask).sum() / mask.sum()
        assert_close(out.loss, want, "loss")
        assert "is_weight_mean" in out.metrics and "approx_kl_old" in out.metrics
        g = torch.Generator().manual_seed(0)
        h = torch.randn(4, 6, 5, dtype=F64, generator=g, requires_grad=True)
        W = torch.randn(9, 5, dtype=F64, generator=g, requires_grad=True)
        t = torch.randint(0, 9, (4, 6), generator=g)
        lp_h = rlcore.linear_logprobs(h.reshape(-1, 5), W, t.reshape(-1), backend="torch").view(4, 6)
        want = policy_loss(lp_h, adv, mask, old_logp=old, loss_type="capped_pg").loss
        for strategy in ("two_pass", "single_pass"):
            got = rlcore.fused_policy_loss(h, W, t, adv, mask, old_logp=old, loss_type="capped_pg", backend="torch",
                                           strategy=strategy).loss
            assert_close(got, want, strategy)
        with pytest.raises(ValueError, match="already registered"):
            register_loss(spec)
    finally:
        rlcore.losses._REGISTRY.pop("capped_pg", None)


BAD = {
    "unknown-loss_type": (_bad_args(loss_type="grpo++"), ValueError, "loss_type"),
    "unknown-option": (_bad_args(epsilon=0.2), TypeError, "epsilon"),
    "option-of-another-loss": (_bad_args(sapo_tau_pos=1.0), ValueError, "sapo_tau_pos"),
    "top_entropy_quantile-without-entropy": (_bad_args(top_entropy_quantile=0.2), ValueError, "entropy"),
    "top_entropy_quantile-0": (_bad_args(top_entropy_quantile=0.0, entropy=_lp), ValueError, "top_entropy_quantile"),
    "top_entropy_quantile-1.5": (_bad_args(top_entropy_quantile=1.5, entropy=_lp), ValueError,
                                 "top_entropy_quantile"),
    "cov_ratio-0": (_bad_args(loss_type="clip_cov", cov_ratio=0.0), ValueError, "cov_ratio"),
    "cov_ratio-2": (_bad_args(loss_type="kl_cov", cov_ratio=2.0), ValueError, "cov_ratio"),
    "ratio_level-unknown": (_bad_args(ratio_level="group"), ValueError, "ratio_level"),
    "ratio_level-on-gspo": (_bad_args(loss_type="gspo", advantages=_r2, ratio_level="token"), ValueError,
                            "ratio_level"),
    "dro-without-dro_beta": (_bad_args(loss_type="dro"), ValueError, "dro_beta"),
    "dro_beta-negative": (_bad_args(loss_type="dro", dro_beta=-1.0), ValueError, "dro_beta"),
    "gmpo-eps-None": (_bad_args(loss_type="gmpo", eps_low=None), ValueError, "eps_low"),
    "gmpo-top-entropy": (_bad_args(loss_type="gmpo", top_entropy_quantile=0.5, entropy=_lp), ValueError,
                         "top_entropy_quantile"),
    "kl_is_weighted-reinforce-without-old": (_bad_args(loss_type="reinforce", old_logp=None, beta=0.1, ref_logp=_lp,
                                                       kl_is_weighted=True), ValueError, "kl_is_weighted"),
    "regression-kl_is_weighted": (_bad_args(loss_type="kimi", advantages=None, rewards=_r2, group_size=2,
                                            kl_is_weighted=True), ValueError, "kl_is_weighted"),
    "num_seqs-string": (_bad_args(num_seqs="8"), TypeError, "num_seqs"),
    "num_tokens-zero": (_bad_args(num_tokens=0), ValueError, "num_tokens"),
    "generator-not-a-generator": (_bad_args(loss_type="clip_cov", generator=3), TypeError, "generator"),
    "sum-norm-without-agg_constant": (_bad_args(agg="seq-mean-token-sum-norm"), ValueError, "agg_constant"),
    "sapo_tau-zero": (_bad_args(loss_type="sapo", sapo_tau_neg=0.0), ValueError, "sapo_tau_neg"),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_input(name):
    args, exc, fragment = BAD[name]
    args = dict(args)
    logp, adv, mask = args.pop("logp"), args.pop("advantages"), args.pop("mask")
    with pytest.raises(exc, match=fragment):
        policy_loss(logp, adv, mask, **args)
