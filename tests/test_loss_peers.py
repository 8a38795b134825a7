"""Parity of the registry's losses with the peers' own code, at the same settings (docs/losses.md sections 8, 9).

verl 0.9.1's policy-loss functions (``verl.trainer.ppo.core_algos``, called through ``get_policy_loss_fn`` with an
``ActorConfig`` and ``global_batch_info``) and TRL 1.16.0's static helpers (``GRPOTrainer.get_gamma_weights``,
``get_off_policy_mask``) on the same tensors: values and gradients to 1e-6 relative. Skipped where the peer is not
installed (CI does not carry them; a scratch environment with ``pip install trl==1.16.0`` and ``pip install --no-deps
verl==0.9.1`` plus ``ray omegaconf tensordict codetiming hydra-core`` runs them).

Batches have no empty sequence (verl's ``geo_mean`` averages over every sequence, rlcore over those with a loss
token) and log-probs below 0.
"""

from __future__ import annotations

import pytest
import torch

from rlcore import policy_loss

F64 = torch.float64


def _batch(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=F64) * 2.5 + 0.05)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return lp.requires_grad_(), old, adv, mask


def _close(a, b, what, rtol=1e-6):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, [x], retain_graph=True)
    return g


# ----------------------------------------------------------------------------------------------------------------------
# verl
# ----------------------------------------------------------------------------------------------------------------------

VERL = [
    # (verl loss_mode, verl settings, rlcore loss_type, rlcore options, loss_agg_mode)
    ("vanilla", {}, "ppo", dict(dual_clip=3.0), "token-mean"),
    ("vanilla", dict(clip_ratio_high=0.28), "dapo", dict(dual_clip=3.0), "token-mean"),
    ("gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4), "gspo_token", {}, "seq-mean-token-mean"),
    ("sapo", {}, "sapo", {}, "seq-mean-token-mean"),
    ("gpg", {}, "reinforce", {}, "token-mean"),
    ("cispo", {}, "cispo", dict(eps_low=0.2, eps_high=0.2), "token-mean"),    # verl clips both sides
    ("dppo_tv", dict(clip_ratio_low=0.05, clip_ratio_high=0.08), "dppo_tv", dict(eps_low=0.05, eps_high=0.08,
                                                                                 dppo_ratio_cap=3.0), "token-mean"),
    ("dppo_kl", dict(clip_ratio_low=0.01, clip_ratio_high=0.02), "dppo_kl", dict(eps_low=0.01, eps_high=0.02,
                                                                                 dppo_ratio_cap=3.0), "token-mean"),
    ("geo_mean", dict(clip_ratio_low=0.4, clip_ratio_high=0.4), "gmpo", {}, "token-mean"),
    ("dro", dict(dro_beta=0.7), "dro", dict(dro_beta=0.7), "token-mean"),
    ("clip_cov", dict(clip_cov_ratio=1.0, clip_cov_lb=-0.3, clip_cov_ub=0.3), "clip_cov",
     dict(cov_ratio=1.0, clip_cov_lb=-0.3, clip_cov_ub=0.3), "token-mean"),
    ("kl_cov", dict(kl_cov_ratio=0.2, ppo_kl_coef=1.0), "kl_cov", dict(cov_ratio=0.2, kl_cov_coef=1.0), "token-mean"),
    ("vanilla", {}, "ppo", dict(dual_clip=3.0, agg="seq-mean-token-sum"), "seq-mean-token-sum"),
    ("vanilla", {}, "ppo", dict(dual_clip=3.0, agg="seq-mean-token-sum-norm", agg_constant=9.0),
     "seq-mean-token-sum-norm"),
    ("vanilla", {}, "ppo", dict(dual_clip=3.0, agg="token-sum"), "token-sum"),
]


def _verl_config(mode, settings, B, n_tokens):
    from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig

    loss_keys = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
    loss_cfg = PolicyLossConfig(loss_mode=mode, **{k: v for k, v in settings.items() if k in loss_keys})
    actor = {k: v for k, v in settings.items() if k not in loss_keys}
    actor.setdefault("clip_ratio_low", 0.2)
    actor.setdefault("clip_ratio_high", 0.2)
    info = dict(dp_size=1, batch_num_tokens=n_tokens, global_batch_size=B, loss_scale_factor=9.0)
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=B,
                           clip_ratio=0.2, policy_loss=loss_cfg, global_batch_info=info, **actor)


@pytest.mark.parametrize("mode,settings,loss_type,options,agg_mode", VERL,
                         ids=[f"{v[0]}-{v[2]}-{v[4]}" for v in VERL])
def test_verl(mode, settings, loss_type, options, agg_mode):
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    lp, old, adv, mask = _batch(1)
    B, T = lp.shape
    cfg = _verl_config(mode, settings, B, int(mask.sum()))
    A = adv[:, None].expand(B, T)
    fn = core.get_policy_loss_fn(mode)
    theirs, _ = fn(old, lp, A, mask.to(F64), loss_agg_mode=agg_mode, config=cfg)
    ours = policy_loss(lp, adv, mask, old_logp=old, loss_type=loss_type, **options).loss
    _close(ours, theirs, f"{mode} loss")
    _close(_grad(ours, lp), _grad(theirs, lp), f"{mode} grad")


# ----------------------------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------------------------


def _trl():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


@pytest.mark.parametrize("kw", [{}, dict(vespo_k_pos=1.0, vespo_lambda_neg=0.5)], ids=["defaults", "custom"])
def test_trl_vespo(kw):
    GRPOTrainer = _trl()
    lp, old, adv, mask = _batch(2)
    settings = dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    settings.update({k.replace("vespo_", ""): v for k, v in kw.items()})
    phi = GRPOTrainer.get_gamma_weights(adv[:, None], (lp - old).detach(), mask.to(F64), None, **settings)
    theirs = (-phi * adv[:, None] * lp * mask).sum() / mask.sum()
    ours = policy_loss(lp, adv, mask, old_logp=old, loss_type="vespo", **kw).loss
    _close(ours, theirs, "vespo loss")
    _close(_grad(ours, lp), _grad(theirs, lp), "vespo grad")


@pytest.mark.parametrize("delta", [0.0, 0.1])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_trl_off_policy_mask(delta, with_sampler):
    GRPOTrainer = _trl()
    lp, old, adv, mask = _batch(3)
    smp = old - 0.2 * torch.rand(old.shape, dtype=F64) if with_sampler else None
    keep = GRPOTrainer.get_off_policy_mask(adv[:, None], lp, smp if with_sampler else old, mask.to(F64), delta)
    r = torch.exp(lp - old)
    A = adv[:, None]
    per = -torch.minimum(r * A, torch.clamp(r, 0.8, 1.2) * A) * keep
    theirs = (per * mask).sum() / mask.sum()                                  # TRL's bnpo normaliser
    extra = dict(sampler_logp=smp) if with_sampler else {}
    ours = policy_loss(lp, adv, mask, old_logp=old, off_policy_mask=delta, **extra).loss
    _close(ours, theirs, "opsm loss")
    _close(_grad(ours, lp), _grad(theirs, lp), "opsm grad")


def test_trl_sequence_level_and_luspo_and_sapo_formulas():
    """TRL's ``_compute_loss`` formulas for ``importance_sampling_level="sequence"`` (grpo), luspo and sapo, written
    as TRL writes them (its method needs a whole trainer), against rlcore's entries."""
    _trl()
    lp, old, adv, mask = _batch(4)
    m = mask.to(F64)
    A = adv[:, None]
    lw = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef = torch.exp(lw)[:, None]
    per = -torch.minimum(coef * A, torch.clamp(coef, 1 - 3e-4, 1 + 4e-4) * A)
    grpo = ((per * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    luspo = (per * m).sum(-1).mean()
    ours_g = policy_loss(lp, adv, mask, old_logp=old, loss_type="gspo").loss
    ours_l = policy_loss(lp, adv, mask, old_logp=old, loss_type="luspo").loss
    _close(ours_g, grpo, "gspo loss")
    _close(_grad(ours_g, lp), _grad(grpo, lp), "gspo grad")
    _close(ours_l, luspo, "luspo loss")
    _close(_grad(ours_l, lp), _grad(luspo, lp), "luspo grad")
    r = torch.exp(lp - old)
    tau = torch.where(A > 0, 1.0, 1.05)
    sapo = (((-torch.sigmoid(tau * (r - 1)) * 4 / tau * A) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    ours_s = policy_loss(lp, adv, mask, old_logp=old, loss_type="sapo").loss
    _close(ours_s, sapo, "sapo loss")
    _close(_grad(ours_s, lp), _grad(sapo, lp), "sapo grad")


# ----------------------------------------------------------------------------------------------------------------------
# TRL 1.16's chunked divergence (the distill bench's trl-divergence provider) against rlcore.linear_divergence
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_trl_chunked_divergence(backend, kind, beta, temperature=0.7):
    """Per-token values and the student's gradients (hidden, head) at the same settings, in FP32, on a student and a
    teacher of different hidden sizes and a vocabulary that is no multiple of a tile; rlcore's ``beta`` is TRL's
    ``1 - beta`` (its JSD mixes ``(1 - b) p_S + b p_T``), which the provider's wrapper maps."""
    pytest.importorskip("trl.kernels.chunked_divergence")
    import rlcore
    from bench.providers import trl_divergence

    g = torch.Generator().manual_seed(17)
    hs, ws = torch.randn(13, 48, generator=g), torch.randn(301, 48, generator=g) / 4
    ht, wt = torch.randn(13, 60, generator=g), torch.randn(301, 60, generator=g) / 4
    up = torch.randn(13, generator=g)
    outs = []
    for fn in (trl_divergence, lambda *a, **kw: rlcore.linear_divergence(*a, **kw, backend=backend)):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        div = fn(h, w, ht, wt, kind=kind, beta=beta, temperature=temperature)
        outs.append((div.detach(), *torch.autograd.grad((div * up).sum(), (h, w))))
    for name, a, b in zip(("divergence", "d hidden", "d weight"), *outs):
        _close(b, a, f"{kind} {name}", rtol=2e-5)


@pytest.mark.parametrize("trl_beta", [0.0, 0.3, 1.0])
def test_trl_gkd_generalized_jsd_is_kd(trl_beta):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (its token mean of the generalized JSD over ``labels != -100``) is
    ``loss_type="kd"``: at ``beta`` in (0, 1) ``kd_kind="jsd"`` with ``jsd_beta = 1 - beta`` (TRL's beta weights the
    teacher), at 0 the forward KL, at 1 the reverse KL; values and the student's gradients."""
    import rlcore

    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer").GKDTrainer
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 8, 23
    h = torch.randn(B, T, H, generator=g, dtype=F64, requires_grad=True)
    w, ht, wt = (torch.randn(*s, generator=g, dtype=F64) for s in ((V, H), (B, T, H), (V, H)))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    theirs = gkd.generalized_jsd_loss(h @ w.T, ht @ wt.T, labels=labels, beta=trl_beta, temperature=0.7)
    kind = {0.0: dict(kd_kind="forward_kl"), 1.0: dict(kd_kind="reverse_kl")}.get(
        trl_beta, dict(kd_kind="jsd", jsd_beta=1.0 - trl_beta))
    ours = rlcore.fused_policy_loss(h, w, labels, None, None, teacher_hidden=ht, teacher_weight=wt, temperature=0.7,
                                    loss_type="kd", backend="torch", **kind).loss
    _close(ours, theirs, "gkd loss", rtol=1e-9)
    _close(_grad(ours, h), _grad(theirs, h), "gkd grad", rtol=1e-9)
