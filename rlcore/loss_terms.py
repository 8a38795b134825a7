"""The built-in losses of ``rlcore.LOSSES``: one ``terms`` function and one :class:`~rlcore.losses.LossSpec` each.

A terms function takes the prepared :class:`~rlcore.losses.Batch` (``b``) and the resolved options (``o``) and
returns :class:`~rlcore.losses.Terms`: per-token terms ``c_t`` (or per-sequence / per-pair losses) and the loss's own
metrics. Everything every loss shares (the masks, token and mismatch weights, KL, aggregation, entropy bonus, common
metrics) is the driver's, in ``rlcore/losses.py``. The formulas are stated in ``docs/losses.md``; the float64
reference of each is in ``rlcore/loss_reference.py``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .losses import Batch, LossSpec, Opts, Terms, register_loss, vstar

__all__ = ["token_ratio", "sequence_ratio", "ratio_at", "ppo_form", "LOSS_TYPES"]

_LOG_1E8 = math.log(1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Ratios
# ----------------------------------------------------------------------------------------------------------------------


def _clamp(x: torch.Tensor, c: Optional[float]) -> torch.Tensor:
    return x if c is None else x.clamp(-c, c)


def token_ratio(b: Batch, o: Opts) -> torch.Tensor:
    """``rho_t = exp(clamp(l - l_old))``, token-shaped, with its gradient."""
    return torch.exp(_clamp(b.l - b.old, o.log_ratio_clamp))


def sequence_ratio(b: Batch, o: Opts):
    """``(s [B], inside [B])``: GSPO's ``s_i = exp(clamp(mean_t (l - l_old)))`` with its gradient, and whether the
    mean log-ratio lies inside the clamp (outside it ``s_i`` carries no gradient)."""
    raw = b.seq_mean(b.l - b.old)                                                   # [B]
    inside = torch.ones_like(raw, dtype=torch.bool) if o.log_ratio_clamp is None else raw.abs() <= o.log_ratio_clamp
    return torch.exp(_clamp(raw, o.log_ratio_clamp)), inside


def ratio_at(b: Batch, o: Opts, level: str) -> torch.Tensor:
    """The importance ratio at ``level``: ``"token"`` (rho_t), ``"sequence"`` (s_i broadcast to its tokens, the
    gradient through the sequence mean) or ``"seq_token"`` (GSPO-token's ``sg(s_i) exp(l_t - sg(l_t))``, whose
    token gradient is cut where ``s_i``'s log-ratio is clamped, as the clamp cuts GSPO's)."""
    if level == "token":
        return token_ratio(b, o)
    s, inside = sequence_ratio(b, o)
    if level == "sequence":
        return b.bcast(s)
    live = torch.where(b.bcast(inside.to(b.cdt)) > 0, b.l - b.l_sg, 0.0)
    return b.bcast(s.detach()) * torch.exp(live)


def _bounds(o: Opts):
    lo = None if o.eps_low is None else 1.0 - o.eps_low
    hi = None if o.eps_high is None else 1.0 + o.eps_high
    return lo, hi


def _clip(x, lo, hi):
    return x if lo is None and hi is None else torch.clamp(x, min=lo, max=hi)


def _ratio_metrics(b: Batch, r: torch.Tensor, low=None, high=None) -> Dict[str, torch.Tensor]:
    out = dict(ratio_mean=b.mmean(r), ratio_min=b.mmin(r), ratio_max=b.mmax(r))
    if low is not None:
        out["clip_frac_low"] = b.mmean(low.to(b.cdt))
        out["clip_frac_high"] = b.mmean(high.to(b.cdt))
    return out


def ppo_form(b: Batch, o: Opts, ratio: torch.Tensor, metrics: Dict) -> torch.Tensor:
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, capped at ``-dual_clip A`` where ``A < 0``."""
    A = b.A
    lo, hi = _bounds(o)
    c = -torch.minimum(ratio * A, _clip(ratio, lo, hi) * A)
    if o.get("dual_clip") is not None:
        cap = -o.dual_clip * A
        hit = (A < 0) & (c > cap)
        c = torch.where(A < 0, torch.minimum(c, cap), c)
        metrics["dual_clip_frac"] = b.mmean(hit.to(b.cdt))
    r = ratio.detach()
    none = torch.zeros_like(b.valid)
    low = (r < lo) & (A < 0) if lo is not None else none
    high = (r > hi) & (A > 0) if hi is not None else none
    metrics.update(_ratio_metrics(b, r, low, high))
    return c


# ----------------------------------------------------------------------------------------------------------------------
# The clipped family
# ----------------------------------------------------------------------------------------------------------------------


def _ppo(level: Optional[str] = None):
    """The PPO form on the ratio at ``level`` (``None``: the ``ratio_level`` option)."""
    def terms(b: Batch, o: Opts) -> Terms:
        metrics: Dict = {}
        ratio = ratio_at(b, o, level or o.ratio_level)
        return Terms(token=ppo_form(b, o, ratio, metrics), ratio=ratio, metrics=metrics)
    return terms


def _cispo(b: Batch, o: Opts) -> Terms:
    """``-sg(clip(r)) A l``."""
    ratio = ratio_at(b, o, o.ratio_level)
    lo, hi = _bounds(o)
    r = ratio.detach()
    none = torch.zeros_like(b.valid)
    low, high = (r < lo if lo is not None else none), (r > hi if hi is not None else none)
    return Terms(token=-_clip(r, lo, hi) * b.A * b.l, ratio=ratio, metrics=_ratio_metrics(b, r, low, high))


def _reinforce(b: Batch, o: Opts) -> Terms:
    """``-A l``."""
    ratio = None if b.old is None else token_ratio(b, o)
    return Terms(token=-b.A * b.l, ratio=ratio)


def _pick(cond: torch.Tensor, yes: float, no: float, like: torch.Tensor) -> torch.Tensor:
    """``yes`` where ``cond`` else ``no``, in ``like``'s dtype (a ``torch.where`` of two Python floats is FP32)."""
    return torch.where(cond, torch.full_like(like, yes), torch.full_like(like, no))


def _sapo(b: Batch, o: Opts) -> Terms:
    """``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau = sapo_tau_pos`` where ``A > 0`` else ``sapo_tau_neg``."""
    ratio = ratio_at(b, o, o.ratio_level)
    tau = _pick(b.A > 0, o.sapo_tau_pos, o.sapo_tau_neg, b.A)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return Terms(token=-gate * b.A, ratio=ratio, metrics=_ratio_metrics(b, ratio))


def _vespo(b: Batch, o: Opts) -> Terms:
    """``-sg(phi(w)) A l`` with ``phi(w) = exp(lambda + k log w - lambda w)`` on the sequence ratio
    ``w = prod_t rho_t`` (times the mismatch weights when ``is_mode`` is set), all in log space."""
    log_w = b.seq_sum((b.l_sg - b.old).clamp(-20.0, 20.0))                          # [B] sum of token log-ratios
    if b.w_is is not None:
        log_is = torch.log(b.w_is).clamp(_LOG_1E8, 20.0)                            # w = 0 (masked) -> 1e-8
        log_w = log_w + (b.seq_mean(log_is) if o.is_mode.startswith("sequence") else b.seq_sum(log_is))
    log_w = b.bcast(log_w.clamp(_LOG_1E8, 20.0))                                    # token-shaped
    pos = b.A >= 0
    k = _pick(pos, o.vespo_k_pos, o.vespo_k_neg, b.A)
    lam = _pick(pos, o.vespo_lambda_pos, o.vespo_lambda_neg, b.A).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    ratio = token_ratio(b, o)
    metrics = _ratio_metrics(b, ratio)
    metrics["vespo_phi_mean"] = b.mmean(phi)
    return Terms(token=-phi * b.A * b.l, ratio=ratio, weighted=True, metrics=metrics)


def _gmpo(b: Batch, o: Opts) -> Terms:
    """Per sequence ``-mean_t(A) exp(mean_t sgn(A) min(sgn(A) d_t, sgn(A) clip(d_t, -eps_low, eps_high)))``."""
    d = _clamp(b.l - b.old, o.log_ratio_clamp)
    sgn = torch.sign(b.A)
    dc = d.clamp(-o.eps_low, o.eps_high)
    dm = sgn * torch.minimum(sgn * d, sgn * dc)
    r = torch.exp(b.seq_mean(dm))                                                   # [B]
    per = -b.seq_mean(b.A) * r
    if b.w_is is not None:                                          # the geometric mean of the mismatch weights
        per = per * torch.exp(b.seq_mean(torch.log(b.w_is + 1e-10)))
    clipped = (d != dc).detach()
    metrics = _ratio_metrics(b, b.bcast(r.detach()), clipped & (b.A < 0), clipped & (b.A > 0))
    return Terms(unit=per, unit_valid=b.nonempty, ratio=b.bcast(r), weighted=True, metrics=metrics)


def _dro(b: Batch, o: Opts) -> Terms:
    """``-(A l - dro_beta / 2 (l - l_old)^2)``."""
    d = b.l - b.old
    ratio = token_ratio(b, o)
    return Terms(token=-(b.A * b.l - 0.5 * o.dro_beta * d * d), ratio=ratio, metrics=_ratio_metrics(b, ratio))


def _dppo(kind: str):
    """``-A sg(min(rho, C)) l v_t``, ``v_t`` DPPO's trust region on the token probability (TV or binary KL)."""
    def terms(b: Batch, o: Opts) -> Terms:
        ratio = token_ratio(b, o)
        trunc = ratio.detach().clamp(max=o.dppo_ratio_cap)
        p, p_old = torch.exp(b.l_sg), torch.exp(b.old)
        if kind == "tv":
            pos_ok, neg_ok = (p - p_old) <= o.eps_high, (p - p_old) >= -o.eps_low
        else:
            bkl = p_old * (b.old - b.l_sg) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            pos_ok, neg_ok = (bkl <= o.eps_high) | (p <= p_old), (bkl <= o.eps_low) | (p >= p_old)
        v = torch.where(b.A > 0, pos_ok, neg_ok)
        metrics = _ratio_metrics(b, ratio.detach())
        metrics["dppo_mask_frac"] = b.mmean((~v).to(b.cdt))
        return Terms(token=torch.where(v, -b.A * trunc * b.l, 0.0), ratio=ratio, metrics=metrics)
    return terms


def _covariance(b: Batch) -> torch.Tensor:
    """``(A_t - mean A)(l_t - mean l)`` over the batch's loss tokens (detached), token-shaped."""
    n = b.n_tok.clamp(min=1)
    mean_a = torch.where(b.valid, b.A, 0.0).sum() / n
    mean_l = b.l_sg.sum() / n
    return (b.A - mean_a) * (b.l_sg - mean_l)


def _rank(keys: torch.Tensor) -> torch.Tensor:
    """Each element's 0-based rank in ascending order (ties in index order), same shape; no host sync."""
    flat = keys.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    return rank.view(keys.shape)


def _selected(b: Batch, o: Opts) -> torch.Tensor:
    """How many tokens clip_cov / kl_cov select: ``max(floor(cov_ratio * num_tokens), 1)`` (a 0-d tensor)."""
    return torch.floor(o.cov_ratio * b.n_tok).clamp(min=1)


def _clip_cov(b: Batch, o: Opts) -> Terms:
    """The PPO form, with a random ``cov_ratio`` fraction of the unclipped loss tokens whose covariance lies in
    ``(clip_cov_lb, clip_cov_ub)`` cut out of the loss."""
    ratio = token_ratio(b, o)
    lo, hi = _bounds(o)
    pg1, pg2 = -b.A * ratio, -b.A * _clip(ratio, lo, hi)
    cov = _covariance(b)
    cand = b.valid & ~(pg2 > pg1).detach() & (cov > o.clip_cov_lb) & (cov < o.clip_cov_ub)
    u = torch.rand(cand.shape, generator=o.generator, device=cand.device, dtype=torch.float32)
    chosen = cand & (_rank(torch.where(cand, u, 2.0)) < _selected(b, o))
    metrics: Dict = {}
    c = ppo_form(b, o, ratio, metrics)
    metrics["clip_cov_frac"] = b.mmean(chosen.to(b.cdt))
    return Terms(token=torch.where(chosen, 0.0, c), ratio=ratio, metrics=metrics)


def _kl_cov(b: Batch, o: Opts) -> Terms:
    """``-A rho``, plus ``kl_cov_coef |l - l_old|`` on the ``cov_ratio`` fraction of loss tokens with the largest
    covariance."""
    d = _clamp(b.l - b.old, o.log_ratio_clamp)
    ratio = torch.exp(d)
    cov = torch.where(b.valid, _covariance(b), -math.inf)
    chosen = b.valid & (_rank(-cov) < _selected(b, o))
    metrics = _ratio_metrics(b, ratio.detach())
    metrics["kl_cov_frac"] = b.mmean(chosen.to(b.cdt))
    c = -b.A * ratio + torch.where(chosen, o.kl_cov_coef * d.abs(), 0.0)
    return Terms(token=c, ratio=ratio, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------------------
# The squared-regression family
# ----------------------------------------------------------------------------------------------------------------------


def _group_baseline(kind: str):
    """The batch constant ``baseline [B]`` from each group of ``group_size`` rewards (when none is given)."""
    def constants(b: Batch, o: Opts) -> Dict[str, torch.Tensor]:
        if b.baseline is not None:
            return {}
        g = o.group_size
        if g is None:
            raise ValueError(f"loss_type={kind!r} needs a baseline [B] or group_size to compute it from the rewards "
                             f"of each group")
        if b.B % g:
            raise ValueError(f"group_size must be a positive int dividing B={b.B}, got {g!r}")
        groups = b.rewards.view(-1, g)                                             # [B / G, G]
        base = groups.mean(-1) if kind == "kimi" else vstar(groups, o.beta1)
        return {"baseline": base.repeat_interleave(g)}                              # [B]
    return constants


def _pairs(b: Batch, o: Opts) -> Dict[str, torch.Tensor]:
    if b.B % 2:
        raise ValueError(f"loss_type='rebel' pairs sequences (0, 1), (2, 3), ...: B must be even, got B={b.B}")
    return {}


def _lam(b: Batch, anchor: str) -> torch.Tensor:
    """``Lam_i = sum_t m (l - l_anchor)`` ``[B]``."""
    return b.seq_sum(b.l - {"ref_logp": b.ref, "sampler_logp": b.smp, "old_logp": b.old}[anchor])


def _regression_metrics(b: Batch, lam: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    n = b.nonempty.sum().clamp(min=1)
    return dict(seq_log_ratio_mean=torch.where(b.nonempty, lam, 0.0).sum().detach() / n,
                target_mean=target.sum().detach() / n)


def _regression(anchor: str):
    """``(beta2 Lam_i - (r_i - b_i))^2`` per sequence."""
    def terms(b: Batch, o: Opts) -> Terms:
        lam = _lam(b, anchor)
        base = b.baseline if b.baseline is not None else b.consts["baseline"]
        target = torch.where(b.nonempty, b.rewards - base, 0.0)
        per = (o.beta2 * lam - target) ** 2
        return Terms(unit=per, unit_valid=b.nonempty, metrics=_regression_metrics(b, lam, target))
    return terms


def _rebel(b: Batch, o: Opts) -> Terms:
    """``((Lam_i - Lam_j) - eta (r_i - r_j))^2`` per pair ``(2k, 2k + 1)``."""
    lam = _lam(b, "old_logp")
    pair_ok = b.n_seq.view(-1, 2).sum(-1) > 0                                        # [B/2]
    # a pair's rewards count even where one member has no loss token (its Lam is then 0)
    lam2 = lam.view(-1, 2)
    r2 = torch.where(pair_ok[:, None], b.rewards.view(-1, 2), 0.0)                    # [B/2, 2]
    per = ((lam2[:, 0] - lam2[:, 1]) - o.eta * (r2[:, 0] - r2[:, 1])) ** 2
    target = torch.where(b.nonempty, b.rewards, 0.0)
    return Terms(unit=per, unit_valid=pair_ok, metrics=_regression_metrics(b, lam, target))


# ----------------------------------------------------------------------------------------------------------------------
# The distillation family
# ----------------------------------------------------------------------------------------------------------------------


def _opd(b: Batch, o: Opts) -> Terms:
    """``-sg(r_t - b_t) l_t``, ``r_t = l_T - sg(l_t)``, ``b_t = -teacher_kl`` (vOPD) or 0 (``opd_baseline="none"``)."""
    reward = b.teacher - b.l_sg                                                     # r_t, detached
    adv = reward if o.opd_baseline == "none" else reward + b.teacher_kl             # r_t - b_t
    metrics = dict(opd_reward_mean=b.mmean(reward), opd_advantage_mean=b.mmean(adv))
    if o.opd_baseline != "none":
        metrics["teacher_kl_mean"] = b.mmean(b.teacher_kl)
    return Terms(token=-adv * b.l, metrics=metrics)


def _opd_inputs(o: Opts):
    return () if o.opd_baseline == "none" else ("teacher_kl",)


def _kd(b: Batch, o: Opts) -> Terms:
    """``D_t``: the per-token divergence itself (its gradient is the divergence's own)."""
    return Terms(token=b.div, metrics=dict(divergence_mean=b.mmean(b.div)))


# ----------------------------------------------------------------------------------------------------------------------
# The entries
# ----------------------------------------------------------------------------------------------------------------------

_PPO = dict(eps_low=0.2, eps_high=0.2, dual_clip=None, ratio_level="token")
_GSPO = dict(eps_low=3e-4, eps_high=4e-4, dual_clip=None, agg="seq-mean-token-mean")
_OLD = ("old_logp",)
_WHOLE = dict(whole_batch=lambda o: True)

_BUILTIN = (
    LossSpec("ppo", _ppo(), defaults=_PPO, needs=_OLD,
             peer="TRL loss_type='bnpo' (token-mean); verl 'vanilla'; with dual_clip=c, TRL delta=c and verl "
                  "clip_ratio_c=c"),
    LossSpec("dapo", _ppo(), defaults=dict(_PPO, eps_high=0.28), needs=_OLD,
             peer="TRL loss_type='dapo' (epsilon_high=0.28, token-mean over the global count: num_tokens=)"),
    LossSpec("dr_grpo", _ppo(), defaults=dict(_PPO, agg="constant"), needs=_OLD,
             peer="TRL loss_type='dr_grpo' (agg_constant = max_completion_length)"),
    LossSpec("gspo", _ppo("sequence"), defaults=_GSPO, needs=_OLD, seq_advantages=True,
             peer="TRL importance_sampling_level='sequence' with epsilon=3e-4, epsilon_high=4e-4; Liger's "
                  "importance_sampling_level='sequence'"),
    LossSpec("gspo_token", _ppo("seq_token"), defaults=_GSPO, needs=_OLD, peer="verl loss_mode='gspo'"),
    LossSpec("luspo", _ppo(), defaults=dict(_GSPO, ratio_level="sequence", agg="seq-mean-token-sum"), needs=_OLD,
             peer="TRL loss_type='luspo' with importance_sampling_level='sequence'"),
    # CISPO as MiniMax-M1 runs it: no lower bound on the importance weight, an upper one.
    LossSpec("cispo", _cispo, defaults=dict(eps_low=None, eps_high=0.28, ratio_level="token"), needs=_OLD,
             peer="verl 'cispo'; TRL loss_type='cispo' with epsilon_high = 1 + eps_high (TRL's 5 is eps_high=4)"),
    LossSpec("reinforce", _reinforce, peer="verl loss_mode='gpg'"),
    LossSpec("sapo", _sapo, defaults=dict(sapo_tau_pos=1.0, sapo_tau_neg=1.05, ratio_level="token",
                                          agg="seq-mean-token-mean"), needs=_OLD,
             peer="TRL loss_type='sapo' (sapo_temperature_pos/neg); verl 'sapo' (tau_pos/neg); Liger 'sapo'"),
    LossSpec("vespo", _vespo, defaults=dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                            vespo_lambda_neg=2.0), needs=_OLD,
             peer="TRL loss_type='vespo' (token-mean over the global count: num_tokens=)"),
    LossSpec("gmpo", _gmpo, unit="seq", defaults=dict(eps_low=0.4, eps_high=0.4), needs=_OLD,
             required=("eps_low", "eps_high"),
             peer="verl loss_mode='geo_mean' with clip_ratio_low/high = eps_low/eps_high"),
    LossSpec("dro", _dro, defaults=dict(dro_beta=None), needs=_OLD, required=("dro_beta",), peer="verl loss_mode='dro' (dro_beta)"),
    LossSpec("dppo_tv", _dppo("tv"), defaults=dict(eps_low=0.2, eps_high=0.2, dppo_ratio_cap=20.0), needs=_OLD,
             required=("eps_low", "eps_high"), peer="verl loss_mode='dppo_tv' (clip_ratio_low/high = eps_low/eps_high, clip_ratio_c = dppo_ratio_cap)"),
    LossSpec("dppo_kl", _dppo("kl"), defaults=dict(eps_low=0.2, eps_high=0.2, dppo_ratio_cap=20.0), needs=_OLD,
             required=("eps_low", "eps_high"), peer="verl loss_mode='dppo_kl' (clip_ratio_low/high = eps_low/eps_high, clip_ratio_c = dppo_ratio_cap)"),
    LossSpec("clip_cov", _clip_cov, defaults=dict(eps_low=0.2, eps_high=0.2, cov_ratio=2e-4, clip_cov_lb=1.0,
                                                  clip_cov_ub=5.0, generator=None), needs=_OLD, **_WHOLE,
             peer="verl loss_mode='clip_cov' (clip_cov_ratio, clip_cov_lb, clip_cov_ub)"),
    LossSpec("kl_cov", _kl_cov, defaults=dict(cov_ratio=2e-4, kl_cov_coef=1.0), needs=_OLD, **_WHOLE,
             peer="verl loss_mode='kl_cov' (kl_cov_ratio, ppo_kl_coef)"),
    LossSpec("apo", _regression("ref_logp"), family="regression", unit="seq", defaults=dict(beta2=1e-3),
             needs=("rewards", "baseline", "ref_logp"), anchor="ref_logp", peer="A*PO, arXiv 2505.20686"),
    LossSpec("oapl", _regression("sampler_logp"), family="regression", unit="seq",
             defaults=dict(beta2=1e-3, beta1=0.5, group_size=None), needs=("rewards", "sampler_logp"),
             batch_constants=_group_baseline("oapl"), anchor="sampler_logp", peer="OAPL, arXiv 2602.19362"),
    LossSpec("kimi", _regression("old_logp"), family="regression", unit="seq",
             defaults=dict(beta2=0.01, group_size=None), needs=("rewards", "old_logp"),
             batch_constants=_group_baseline("kimi"), anchor="old_logp", peer="Kimi k1.5 (tau = beta2)"),
    LossSpec("rebel", _rebel, family="regression", unit="pair", defaults=dict(eta=1.0),
             needs=("rewards", "old_logp"), batch_constants=_pairs, anchor="old_logp", peer="REBEL, arXiv 2404.16767"),
    LossSpec("opd", _opd, family="distill", defaults=dict(opd_baseline="none", top_k=None),
             needs=("teacher_logp",), requires=_opd_inputs,
             peer="on-policy distillation (Thinking Machines, 2025; TRL's GKD at lmbda=1 samples the same way), with "
                  "the vOPD baseline b_t = -KL(p_S || p_T)"),
    LossSpec("kd", _kd, family="distill", defaults=dict(kd_kind="reverse_kl", jsd_beta=0.5, top_k=None),
             needs=("divergence",), reads_logp=False,
             peer="TRL 1.16 GKDTrainer.generalized_jsd_loss with beta=b: kd_kind='jsd', jsd_beta=1-b (b=0: "
                  "'forward_kl', b=1: 'reverse_kl'); GKD, arXiv 2306.13649"),
)
for _spec in _BUILTIN:
    register_loss(_spec)

LOSS_TYPES = tuple(_spec.name for _spec in _BUILTIN)     # the built-in losses, in registry order
