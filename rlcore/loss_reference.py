"""Float64 ground truth of ``rlcore.policy_loss`` and ``rlcore.vstar``: for tests only, slow by design.

Every formula of the contract (``docs/losses.md``, which pins the defaults and edge cases) is
written out literally, one token at a time, in float64:

- The batch is first split into a Python list of sequences, each a list of the flat positions of its loss tokens
  (``mask != 0``), from either layout: padded ``[B, T]`` with a mask, or packed ``[N]`` with ``cu_seqlens``.
- Only those positions are ever read, so whatever sits at a masked position (inf, nan, 1e300) cannot matter.
- Each loss is then a Python loop over sequences and tokens of 0-d tensor ops; the aggregations are literal sums.
- Gradients flow to ``logp`` and ``entropy`` (whatever dtype they have: they are cast to float64 differentiably).
  All other inputs are constants; ``sg(x)`` is ``x.detach()``.

It never calls the fast path (``rlcore.losses``' arithmetic, ``rlcore.segments``): it reads only the registry's names
and defaults, and is otherwise an independent second implementation, meant to be obviously right rather than fast. Use it on batches of a few dozen tokens.

Where the contract leaves a choice, this file takes (and the tests avoid depending on the last two):

- The straight-through KL (``k3+`` ...) is ``sg(named) + k2 - sg(k2)``: the named value, the gradient of k2 only.
- With ``kl_clamp`` the k2 inside a straight-through estimator is clamped like any estimator value.
- Packed advantages of length ``B == N`` are read as per-token ``[N]``.

Metrics (detached 0-d float64 tensors; a metric over an empty set is 0):

| key | value |
|---|---|
| ``num_tokens``, ``num_seqs`` | loss tokens (after ``reject``), sequences with at least one loss token |
| ``ratio_mean/min/max`` | clipped family but ``reinforce``: the ratio used per loss token (rho, gspo's s_i, s_it) |
| ``clip_frac_low/high`` | ppo forms: ratio < 1-eps_low, A < 0 / ratio > 1+eps_high, A > 0; cispo: rho < lo / > hi |
| ``approx_kl_old`` | clipped family with ``old_logp``: mean of ``exp(-d) - 1 + d``, d the (clamped) token log-ratio |
| ``is_weight_mean`` | mismatch weight averaged over the loss tokens **before** ``reject`` (rejected tokens count 0) |
| ``is_frac_truncated`` / ``is_frac_masked`` | truncate modes: weight capped / mask modes: weight 0, same tokens |
| ``entropy_mean`` | when ``entropy`` is given: mean entropy over the loss tokens |
| ``kl_ref_mean`` | when ``beta != 0``: mean of the KL estimator's value over the loss tokens |
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import torch

__all__ = [
    "policy_loss_reference", "vstar_reference",
    "LOSS_TYPES", "CLIPPED", "PPO_FORMS", "REGRESSION", "ZOO", "DISTILL", "AGGS", "IS_MODES", "KL_ESTIMATORS",
    "head_inputs_reference", "fused_loss_reference",
]

PPO_FORMS = ("ppo", "dapo", "dr_grpo", "gspo", "gspo_token")   # losses written in the min(rho A, clip(rho) A) form
CLIPPED = PPO_FORMS + ("cispo", "reinforce")                     # the per-token family (docs/losses.md section 1)
REGRESSION = ("apo", "oapl", "kimi", "rebel")                    # the squared-regression family (section 5)
ZOO = ("sapo", "vespo", "luspo", "gmpo", "dro", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov")   # section 8
DISTILL = ("opd", "kd")                                          # section 9: against a teacher
LOSS_TYPES = CLIPPED + REGRESSION + ZOO + DISTILL
# the accepted names are defined once, in rlcore.losses (data, not arithmetic)
from .losses import AGGS, IS_MODES, KL_ESTIMATORS  # noqa: E402


def _default(loss_type: str, name: str):
    """The registry's default of option ``name`` for ``loss_type`` (the only thing read from ``rlcore.losses``: the
    defaults are the contract's data, not its arithmetic)."""
    from .losses import LOSSES

    return LOSSES[loss_type].default(name)


_DEFAULT = object()


def vstar_reference(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """``V* = beta1 * log(mean_j exp(r_j / beta1))`` over the last dim, ``[..., G] -> [...]``, in float64.

    Written with the max pulled out (``M + beta1 * log(mean exp((r - M) / beta1))``), so it never overflows.
    """
    r = rewards.detach().to(torch.float64)                              # [..., G]
    G = r.shape[-1]
    M = r.max(-1, keepdim=True).values                                  # [..., 1]
    mean_exp = torch.exp((r - M) / beta1).sum(-1) / G                   # [...]  (the max term is exp(0) = 1)
    return M.squeeze(-1) + beta1 * torch.log(mean_exp)


def _val(x: torch.Tensor) -> float:
    """A 0-d tensor's value as a Python float, outside the graph."""
    return float(x.detach())


def _add(xs, zero):
    """Literal left-to-right sum of 0-d tensors (``zero`` when empty)."""
    return reduce(lambda a, b: a + b, xs, zero)


def _sequences(logp, mask, cu_seqlens):
    """Per sequence, the flat positions (into ``logp.reshape(-1)``) of its loss tokens, in order."""
    if cu_seqlens is None:
        if logp.dim() != 2:
            raise ValueError(f"padded logp must be [B, T], got {list(logp.shape)}")
        B, T = logp.shape
        m = [[True] * T for _ in range(B)] if mask is None else (mask.reshape(B, T) != 0).tolist()
        return [[i * T + t for t in range(T) if m[i][t]] for i in range(B)]
    if logp.dim() != 1:
        raise ValueError(f"packed logp must be [N], got {list(logp.shape)}")
    N = logp.shape[0]
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={N}, got {cu}")
    m = [True] * N if mask is None else (mask.reshape(N) != 0).tolist()
    return [[j for j in range(cu[i], cu[i + 1]) if m[j]] for i in range(len(cu) - 1)]


def policy_loss_reference(
    logp: torch.Tensor,
    advantages: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    sampler_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    loss_type: str = "ppo",
    agg=_DEFAULT,
    eps_low=_DEFAULT,
    eps_high=_DEFAULT,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = 20.0,
    agg_constant: Optional[float] = None,
    num_tokens=None,
    token_weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: bool = False,
    is_mode: Optional[str] = None,
    is_cap: float = 2.0,
    is_min: Optional[float] = None,
    reject: bool = False,
    entropy_coef: float = 0.0,
    rewards: Optional[torch.Tensor] = None,
    baseline: Optional[torch.Tensor] = None,
    beta2=_DEFAULT,
    beta1: float = 0.5,
    group_size: Optional[int] = None,
    eta: float = 1.0,
    num_seqs=None,
    ratio_level=_DEFAULT,
    top_entropy_quantile: Optional[float] = None,
    off_policy_mask: Optional[float] = None,
    kl_is_weighted: bool = False,
    teacher_logp: Optional[torch.Tensor] = None,
    teacher_kl: Optional[torch.Tensor] = None,
    divergence: Optional[torch.Tensor] = None,
    ref_kl: Optional[torch.Tensor] = None,
    opd_baseline: str = "none",
    **zoo,
):
    """The policy loss, literally, in float64. Same arguments and layouts as ``rlcore.policy_loss``.

    Shapes: padded ``logp [B, T]``, ``mask [B, T]`` (or ``None``), per-token inputs ``[B, T]``, ``advantages [B]`` or
    ``[B, T]``; packed ``logp [N]``, ``cu_seqlens [B + 1]``, per-token inputs ``[N]``, ``advantages [B]`` or ``[N]``;
    ``rewards``, ``baseline [B]``. Distillation: ``teacher_logp``, ``teacher_kl`` (constants), ``divergence`` and
    ``ref_kl`` (with their graphs, for ``kd`` and ``kl_estimator="exact"``), token-shaped.

    Returns:
        ``(loss, metrics)``: a 0-d float64 tensor and a dict of detached 0-d float64 tensors.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    def pick(value, name, fallback="-"):
        if value is not _DEFAULT:
            return value
        try:
            return _default(loss_type, name)
        except KeyError:
            return fallback

    agg = pick(agg, "agg")
    eps_low, eps_high = pick(eps_low, "eps_low"), pick(eps_high, "eps_high")
    beta2 = pick(beta2, "beta2")
    ratio_level = pick(ratio_level, "ratio_level", "token")
    zoo = {k: zoo.get(k, _default(loss_type, k)) for k in _ZOO_OPTIONS.get(loss_type, ())}
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}")
    if is_mode is not None and is_mode not in IS_MODES:
        raise ValueError(f"unknown is_mode {is_mode!r}")
    if kl_estimator not in KL_ESTIMATORS + ("exact",):
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}")

    def f64(x, grad=False):
        """Flat float64 view; constants are detached (sg), logp and entropy keep their autograd graph."""
        if x is None:
            return None
        x = x if grad else x.detach()
        return x.to(torch.float64).reshape(-1)

    seqs = _sequences(logp, mask, cu_seqlens)                           # B lists of flat positions
    B = len(seqs)
    lp = f64(logp, grad=True)                                           # l_t
    old, ref, smp = f64(old_logp), f64(ref_logp), f64(sampler_logp)
    H = f64(entropy, grad=True)
    teacher, t_kl = f64(teacher_logp), f64(teacher_kl)
    div, r_kl = f64(divergence, grad=True), f64(ref_kl, grad=True)
    tw = f64(token_weights)
    adv = None if advantages is None else advantages.detach().to(torch.float64)
    seq_adv = adv is not None and adv.dim() == 1 and adv.shape[0] == B and (cu_seqlens is None or lp.shape[0] != B)
    adv = None if adv is None else adv.reshape(-1)

    # Exact zeros that are still attached to the graph (an empty selection summed), so an all-masked batch
    # gives zero gradients instead of none.
    zero = lp[[]].sum()
    zero_H = H[[]].sum() if H is not None else None

    def A_of(i, j):
        return adv[i] if seq_adv else adv[j]

    # ---- 3. training-inference mismatch weights (constants), before everything else because of reject ----------
    w, capped = {}, {}                                                  # flat position -> weight, was it capped/masked
    is_tokens = [j for toks in seqs for j in toks]                      # the loss tokens before reject
    if is_mode is not None:
        log_C = math.log(is_cap)
        log_Cmin = math.log(is_min if is_min is not None else 1.0 / is_cap)

        def delta(j):
            return _val(old[j] - smp[j]) if old is not None else _val(lp[j] - smp[j])

        for toks in seqs:
            if is_mode.startswith("token"):
                deltas = {j: delta(j) for j in toks}
            else:
                Delta = math.fsum(delta(j) for j in toks)                # sum_t m delta_t
                deltas = {j: Delta for j in toks}
            for j, dl in deltas.items():
                if is_mode.endswith("truncate"):
                    w[j] = math.exp(min(dl, log_C))                       # min(exp(delta), C), in log space
                    capped[j] = dl > log_C
                else:
                    keep = log_Cmin <= dl <= log_C                       # C_min <= exp(delta) <= C
                    w[j] = math.exp(dl) if keep else 0.0
                    capped[j] = not keep
        if reject and is_mode.endswith("mask"):
            seqs = [[j for j in toks if w[j] > 0] for toks in seqs]      # m' = m * (w > 0)

    n = [len(toks) for toks in seqs]                                     # |y_i| (after reject)
    num_loss_tokens = sum(n)

    # ---- 2. aggregation of a per-token quantity given as {flat position: 0-d tensor} -----------------------------
    def seq_count():
        return float(num_seqs) if num_seqs is not None else float(sum(1 for k in n if k > 0))

    def aggregate(x, base):
        sums = [_add([x[j] for j in toks], base) for toks in seqs]       # sum_t m_it x_it
        S = _add(sums, base)
        batch = float(num_seqs) if num_seqs is not None else float(B)
        if agg == "token-mean":
            denom = float(num_tokens) if num_tokens is not None else float(num_loss_tokens)
            return S / max(denom, 1.0)
        if agg == "token-sum":
            return S
        if agg == "seq-mean-token-mean":
            return _add([s / max(k, 1) for s, k in zip(sums, n)], base) / max(seq_count(), 1.0)
        if agg == "seq-mean-token-sum":
            return S / max(batch, 1.0)
        if agg_constant is None:
            raise ValueError(f"agg={agg!r} needs agg_constant")
        if agg == "seq-mean-token-sum-norm":
            return S / max(batch, 1.0) / agg_constant
        return S / (max(batch, 1.0) * agg_constant)

    # ---- 4. KL to the reference policy ----------------------------------------------------------------------------
    def kl_value(D, name):
        if name == "k1":
            v = D
        elif name == "k2":
            v = D * D / 2
        elif name == "k3":
            neg_D = torch.clamp(-D, -20.0, 20.0) if kl_clamp else -D
            v = torch.exp(neg_D) - 1 + D
        else:                                                            # abs
            v = torch.abs(D)
        return torch.clamp(v, -10.0, 10.0) if kl_clamp else v

    kl, kl_vals = {}, []
    if beta != 0:
        if ref is None and kl_estimator != "exact":
            raise ValueError("beta != 0 needs ref_logp")
        for toks in seqs:
            for j in toks:
                if kl_estimator == "exact":                              # the given KL(pi || pi_ref), its graph
                    if r_kl is None:
                        raise ValueError("kl_estimator='exact' needs ref_kl")
                    kl[j] = torch.clamp(r_kl[j], -10.0, 10.0) if kl_clamp else r_kl[j]
                    kl_vals.append(_val(kl[j]))
                    continue
                D = lp[j] - ref[j]
                if kl_estimator.endswith("+"):                           # value of the named one, gradient of k2
                    k2 = kl_value(D, "k2")
                    kl[j] = kl_value(D, kl_estimator[:-1]).detach() + k2 - k2.detach()
                else:
                    kl[j] = kl_value(D, kl_estimator)
                kl_vals.append(_val(kl[j]))

    metrics = {}

    def mean(xs):
        return math.fsum(xs) / len(xs) if xs else 0.0

    lo = None if eps_low in (None, "-") else 1.0 - eps_low
    hi = None if eps_high in (None, "-") else 1.0 + eps_high

    def log_ratio(x):
        return torch.clamp(x, -log_ratio_clamp, log_ratio_clamp) if log_ratio_clamp is not None else x

    def ppo_form(ratio, A):                                              # -min(r A, clip(r, lo, hi) A), dual clip
        clipped = ratio if lo is None and hi is None else torch.clamp(ratio, min=lo, max=hi)
        c = -torch.minimum(ratio * A, clipped * A)
        if dual_clip is not None and A < 0:
            c = torch.minimum(c, -dual_clip * A)
        return c

    def policy_keep(_log_ratio=None):
        """flat position -> whether its policy term counts (``top_entropy_quantile``, ``off_policy_mask``)."""
        keep = {j: True for toks in seqs for j in toks}
        if top_entropy_quantile is not None:
            if H is None:
                raise ValueError("top_entropy_quantile needs entropy")
            vals = [_val(H[j]) for toks in seqs for j in toks]
            dropped = 0
            if vals:
                thr = float(torch.quantile(torch.tensor(vals, dtype=torch.float64), 1.0 - top_entropy_quantile))
                for j in keep:
                    keep[j] = _val(H[j]) >= thr
                    dropped += not keep[j]
            metrics["entropy_keep_frac"] = (len(vals) - dropped) / len(vals) if vals else 0.0
        if off_policy_mask is not None:
            anchor = smp if smp is not None else old
            off = 0
            for i, toks in enumerate(seqs):
                kl_i = mean([_val(anchor[j]) - _val(lp[j]) if anchor is not None else 0.0 for j in toks])
                for j in toks:
                    if not (float(A_of(i, j)) >= 0 or kl_i <= off_policy_mask):
                        keep[j] = False
                        off += 1
            metrics["off_policy_mask_frac"] = off / num_loss_tokens if num_loss_tokens else 0.0
        return keep

    def kl_term(j, ratio_of):
        return kl[j] * ratio_of[j] if kl_is_weighted else kl[j]

    if loss_type in CLIPPED:
        # ---- 1. clipped-surrogate family: c_t per loss token ------------------------------------------------------
        needs_old = loss_type != "reinforce"
        if needs_old and old is None:
            raise ValueError(f"loss_type={loss_type!r} needs old_logp")

        if loss_type == "gspo" and not seq_adv:
            raise ValueError("gspo needs sequence-level advantages [B]")
        keep = policy_keep(log_ratio)
        c, ratios, low, high, kl_old, ratio_of = {}, [], [], [], [], {}
        for i, toks in enumerate(seqs):
            seq_level = loss_type in ("gspo", "gspo_token") or (ratio_level == "sequence" and loss_type != "reinforce")
            if seq_level:
                if not toks:
                    continue
                Lam = _add([lp[j] - old[j] for j in toks], zero)           # sum_t m (l - l_old)
                s = torch.exp(log_ratio(Lam / max(len(toks), 1)))        # s_i
                if loss_type == "gspo":
                    A = adv[i]
                    c_i = ppo_form(s, A)                                 # one c_i, broadcast to the tokens
            for j in toks:
                A = A_of(i, j)
                if loss_type in ("ppo", "dapo", "dr_grpo", "cispo"):
                    d = log_ratio(lp[j] - old[j])
                    ratio = s if seq_level else torch.exp(d)             # rho_t, or s_i at ratio_level="sequence"
                    kl_old.append(_val(torch.exp(-d) - 1 + d))
                    if loss_type == "cispo":
                        c[j] = -torch.clamp(ratio, min=lo, max=hi).detach() * A * lp[j]
                        low.append(lo is not None and _val(ratio) < lo)
                        high.append(hi is not None and _val(ratio) > hi)
                    else:
                        c[j] = ppo_form(ratio, A)
                elif loss_type == "gspo":
                    ratio = s
                    c[j] = c_i
                elif loss_type == "gspo_token":
                    # s_it; where the clamp binds on s_i, as GSPO's gradient is cut there, so is this one
                    inside = log_ratio_clamp is None or abs(_val(Lam) / len(toks)) <= log_ratio_clamp
                    ratio = s.detach() * (torch.exp(lp[j] - lp[j].detach()) if inside else 1.0)
                    c[j] = ppo_form(ratio, A)
                else:                                                    # reinforce
                    ratio = None
                    c[j] = -A * lp[j]
                if loss_type in ("gspo", "gspo_token"):
                    d = log_ratio(lp[j] - old[j])
                    kl_old.append(_val(torch.exp(-d) - 1 + d))
                if ratio is not None:
                    ratios.append(_val(ratio))
                    if loss_type != "cispo":
                        low.append(lo is not None and _val(ratio) < lo and float(A) < 0)
                        high.append(hi is not None and _val(ratio) > hi and float(A) > 0)
                if ratio is not None:
                    ratio_of[j] = ratio
                elif old is not None:
                    ratio_of[j] = torch.exp(log_ratio(lp[j] - old[j]))
                if not keep[j]:
                    c[j] = 0 * c[j]                                      # the policy-term masks
                if tw is not None:
                    c[j] = c[j] * tw[j]
                if is_mode is not None:
                    c[j] = c[j] * w[j]                                   # after clipping, before KL
                if beta != 0:
                    c[j] = c[j] + beta * kl_term(j, ratio_of)
        loss = aggregate(c, zero)
        if loss_type != "reinforce":
            metrics["ratio_mean"] = mean(ratios)
            metrics["ratio_min"] = min(ratios) if ratios else 0.0
            metrics["ratio_max"] = max(ratios) if ratios else 0.0
            metrics["clip_frac_low"] = mean([float(b) for b in low])
            metrics["clip_frac_high"] = mean([float(b) for b in high])
            metrics["approx_kl_old"] = mean(kl_old)
    elif loss_type in DISTILL:
        loss = _distill(loss_type, seqs, lp, teacher, t_kl, div, opd_baseline, w, tw, is_mode, beta, kl, aggregate,
                        metrics, mean, zero)
    elif loss_type in ZOO:
        loss = _zoo(loss_type, seqs, lp, old, w, A_of, zoo, policy_keep(), log_ratio, ppo_form, kl_term, aggregate,
                    seq_count, metrics, mean, zero, tw, is_mode, beta, lo, hi, eps_low, eps_high, ratio_level,
                    logp.shape, num_loss_tokens)
    else:
        # ---- 5. squared-regression family ---------------------------------------------------------------------------
        if is_mode is not None:
            raise ValueError(f"is_mode is only for the clipped family, not {loss_type!r}")
        anchor_name = {"apo": "ref_logp", "oapl": "sampler_logp", "kimi": "old_logp", "rebel": "old_logp"}[loss_type]
        anchor = {"ref_logp": ref, "sampler_logp": smp, "old_logp": old}[anchor_name]
        if anchor is None:
            raise ValueError(f"loss_type={loss_type!r} needs {anchor_name}")
        if rewards is None:
            raise ValueError(f"loss_type={loss_type!r} needs rewards")
        r = rewards.detach().to(torch.float64).reshape(-1)               # [B]
        Lam = [_add([lp[j] - anchor[j] for j in toks], zero) for toks in seqs]
        if loss_type == "rebel":
            if B % 2:
                raise ValueError("rebel needs an even batch of pairs")
            Ls = [((Lam[2 * k] - Lam[2 * k + 1]) - eta * (r[2 * k] - r[2 * k + 1])) ** 2
                  for k in range(B // 2) if n[2 * k] + n[2 * k + 1] > 0]
        else:
            if baseline is not None:
                b = baseline.detach().to(torch.float64).reshape(-1)
            elif loss_type == "apo":
                raise ValueError("apo needs baseline (V*, computed offline with vstar)")
            else:
                if group_size is None:
                    raise ValueError(f"loss_type={loss_type!r} without baseline needs group_size")
                G = group_size
                if loss_type == "oapl":
                    v = vstar_reference(r.view(-1, G), beta1)            # [B / G]
                    b = torch.stack([v[i // G] for i in range(B)])
                else:                                                    # kimi: group mean reward
                    b = torch.stack([r[(i // G) * G:(i // G + 1) * G].sum() / G for i in range(B)])
            Ls = [(beta2 * Lam[i] - (r[i] - b[i])) ** 2 for i in range(B) if n[i] > 0]
        units = len(Ls) if loss_type == "rebel" else seq_count()
        loss = _add(Ls, zero) / max(units, 1)
        if beta != 0:
            loss = loss + aggregate({j: beta * kl[j] for j in kl}, zero)

    if H is not None:
        loss = loss + zero_H                                             # entropy is always in the graph
        if entropy_coef != 0:
            loss = loss - entropy_coef * aggregate({j: H[j] for toks in seqs for j in toks}, zero_H)
    elif entropy_coef != 0:
        raise ValueError("entropy_coef != 0 needs entropy")

    metrics["num_tokens"] = float(num_loss_tokens)
    metrics["num_seqs"] = float(sum(1 for k in n if k > 0))
    if is_mode is not None:
        metrics["is_weight_mean"] = mean([w[j] for j in is_tokens])
        key = "is_frac_truncated" if is_mode.endswith("truncate") else "is_frac_masked"
        metrics[key] = mean([float(capped[j]) for j in is_tokens])
    if H is not None:
        metrics["entropy_mean"] = mean([_val(H[j]) for toks in seqs for j in toks])
    if beta != 0:
        metrics["kl_ref_mean"] = mean(kl_vals)
    metrics = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in metrics.items()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# Section 9 of docs/losses.md: distillation, one token at a time
# ----------------------------------------------------------------------------------------------------------------------


def _distill(loss_type, seqs, lp, teacher, t_kl, div, opd_baseline, w, tw, is_mode, beta, kl, aggregate, metrics,
             mean, zero):
    """``opd``: ``c_t = -sg(r_t - b_t) l_t``, ``r_t = l_T - l_t``, ``b_t = -KL_t`` (or 0); ``kd``: ``c_t = D_t``."""
    c, rewards, advs, kls = {}, [], [], []
    for toks in seqs:
        for j in toks:
            if loss_type == "opd":
                if teacher is None or (opd_baseline != "none" and t_kl is None):
                    raise ValueError("opd needs teacher_logp (and teacher_kl with a baseline)")
                r = _val(teacher[j]) - _val(lp[j])                               # a constant: sg
                b = -_val(t_kl[j]) if opd_baseline != "none" else 0.0
                c[j] = -(r - b) * lp[j]
                rewards.append(r)
                advs.append(r - b)
                if opd_baseline != "none":
                    kls.append(_val(t_kl[j]))
            else:
                if div is None:
                    raise ValueError("kd needs divergence")
                c[j] = div[j]
                kls.append(_val(div[j]))
            if tw is not None:
                c[j] = c[j] * tw[j]
            if is_mode is not None:
                c[j] = c[j] * w[j]
            if beta != 0:
                c[j] = c[j] + beta * kl[j]
    if loss_type == "opd":
        metrics["opd_reward_mean"] = mean(rewards)
        metrics["opd_advantage_mean"] = mean(advs)
        if opd_baseline != "none":
            metrics["teacher_kl_mean"] = mean(kls)
    else:
        metrics["divergence_mean"] = mean(kls)
    return aggregate(c, zero)


def _row_divergence(ls, lt, kind, beta):
    """One row's divergence from float64 log-probs ``ls`` (student), ``lt`` (teacher), summed term by term."""
    ps, pt = ls.exp(), lt.exp()

    def plogp(p, a, b):                                                  # p (a - b), 0 where p underflows to 0
        return torch.where(p > 0, p * (a - b), 0.0).sum()

    if kind == "reverse_kl":
        return plogp(ps, ls, lt)
    if kind == "forward_kl":
        return plogp(pt, lt, ls)
    lm = torch.logsumexp(torch.stack([ls + math.log(beta), lt + math.log(1.0 - beta)]), 0)   # log m
    return beta * plogp(ps, ls, lm) + (1.0 - beta) * plogp(pt, lt, lm)


def head_inputs_reference(hidden, weight, targets, mask, *, bias=None, temperature=1.0, teacher_hidden=None,
                          teacher_weight=None, teacher_bias=None, teacher_ids=None, teacher_topk_logp=None,
                          ref_hidden=None, ref_weight=None, ref_bias=None, kind="reverse_kl", beta=0.5, top_k=None):
    """The per-token inputs of section 9 from materialised float64 logits, one loss position at a time (``[...]``,
    0 elsewhere): ``teacher_logp`` (the teacher's log-prob of the target), ``teacher_kl_full`` and
    ``teacher_kl_topk`` (reverse KL over the vocabulary / the support, detached), ``divergence`` (``kind``, over the
    vocabulary, or over the support when ``top_k`` or ``teacher_ids`` is given; with its graph to the student head)
    and ``ref_kl`` (reverse KL to the reference head, with its graph). The support is the teacher's ``top_k``
    largest logits, or the served ``teacher_ids`` with ``teacher_topk_logp / temperature``; both distributions are
    renormalised on it. Independent of ``rlcore.divergence``: the logits are formed whole and every row's sums are
    written out."""
    def logits(h, w, b):
        z = h.double() @ w.double().T
        return (z if b is None else z + b.double()) / temperature                  # [..., V]

    lead = tuple(targets.shape)
    V = weight.shape[0]
    zs = logits(hidden, weight, bias).reshape(-1, V)
    flat_mask = mask.reshape(-1).tolist()
    t_flat = targets.reshape(-1).tolist()
    rows = [i for i, m in enumerate(flat_mask) if m]
    out = {}

    def per_row(fn):                                                               # [...] of fn(i), 0 off the mask
        vals = {i: fn(i) for i in rows}
        zero = zs[:0].sum()
        return torch.stack([vals.get(i, zero) for i in range(len(flat_mask))]).reshape(lead) if flat_mask else \
            zs.new_zeros(lead)

    def support(i, zt):
        if teacher_ids is not None:
            ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])[i].long()
            return ids, teacher_topk_logp.reshape(-1, ids.shape[0])[i].double().detach() / temperature
        ids = torch.topk(zt[i], top_k).indices
        return ids, zt[i, ids]

    if teacher_hidden is not None:
        zt = logits(teacher_hidden, teacher_weight, teacher_bias).reshape(-1, V).detach()
        out["teacher_logp"] = per_row(lambda i: zt[i, t_flat[i]] - torch.logsumexp(zt[i], 0))
        out["teacher_kl_full"] = per_row(lambda i: _row_divergence(
            zs[i].detach().log_softmax(0), zt[i].log_softmax(0), "reverse_kl", beta))
    else:
        zt = None
    if teacher_ids is not None or (top_k is not None and zt is not None):
        def on_support(i, k, b, grad):
            ids, lt = support(i, zt)
            ls = zs[i, ids] if grad else zs[i, ids].detach()
            return _row_divergence(ls.log_softmax(0), lt.log_softmax(0), k, b)
        out["teacher_kl_topk"] = per_row(lambda i: on_support(i, "reverse_kl", beta, False))
        out["divergence"] = per_row(lambda i: on_support(i, kind, beta, True))
    elif zt is not None:
        out["divergence"] = per_row(lambda i: _row_divergence(zs[i].log_softmax(0), zt[i].log_softmax(0), kind, beta))
    if ref_hidden is not None:
        zr = logits(ref_hidden, ref_weight, ref_bias).reshape(-1, V).detach()
        out["ref_kl"] = per_row(lambda i: _row_divergence(zs[i].log_softmax(0), zr[i].log_softmax(0), "reverse_kl",
                                                          beta))
    return out


def fused_loss_reference(hidden, weight, targets, advantages, mask, *, bias=None, temperature=1.0,
                         cu_seqlens=None, heads=None, **loss_kwargs):
    """``fused_policy_loss``'s float64 ground truth for section 9: the student's log-probs and entropy from
    materialised logits, the heads' per-token inputs from :func:`head_inputs_reference` (``heads``: its keyword
    arguments), then :func:`policy_loss_reference` token by token. Returns ``(loss, metrics)``."""
    from .reference import linear_logprobs_reference

    heads = dict(heads or {})
    loss_type = loss_kwargs.get("loss_type", "ppo")
    lp, ent = linear_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                        return_entropy=True)
    loss_mask = (targets != -100) & (mask if mask is not None else True)
    got = head_inputs_reference(hidden, weight, targets, loss_mask, bias=bias, temperature=temperature,
                                kind=loss_kwargs.get("kd_kind", "reverse_kl"), beta=loss_kwargs.get("jsd_beta", 0.5),
                                top_k=loss_kwargs.get("top_k"), **heads)
    inputs = {}
    if loss_type == "opd":
        inputs["teacher_logp"] = got["teacher_logp"]
        base = loss_kwargs.get("opd_baseline", "none")
        if base != "none":
            inputs["teacher_kl"] = got["teacher_kl_full" if base == "full" else "teacher_kl_topk"]
    if loss_type == "kd":
        inputs["divergence"] = got["divergence"]
    if "ref_kl" in got:
        inputs["ref_kl"] = got["ref_kl"]
    return policy_loss_reference(lp, advantages, loss_mask, cu_seqlens=cu_seqlens, entropy=ent, **inputs,
                                 **loss_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Section 8 of docs/losses.md: the newer policy losses, one token at a time
# ----------------------------------------------------------------------------------------------------------------------

_ZOO_OPTIONS = {
    "sapo": ("sapo_tau_pos", "sapo_tau_neg"),
    "vespo": ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
    "dro": ("dro_beta",),
    "dppo_tv": ("dppo_ratio_cap",),
    "dppo_kl": ("dppo_ratio_cap",),
    "clip_cov": ("cov_ratio", "clip_cov_lb", "clip_cov_ub", "generator"),
    "kl_cov": ("cov_ratio", "kl_cov_coef"),
}
_LOG_1E8 = math.log(1e-8)


def _clip1(x, lo, hi):
    return min(max(x, lo), hi)


def _zoo(loss_type, seqs, lp, old, w, A_of, zoo, keep, log_ratio, ppo_form, kl_term, aggregate, seq_count, metrics,
         mean, zero, tw, is_mode, beta, lo, hi, eps_low, eps_high, ratio_level, shape, n_loss):
    """The loss of one of ``ZOO``: per-token terms (or gmpo's per-sequence ones), weights, masks and KL, aggregated."""
    if old is None:
        raise ValueError(f"loss_type={loss_type!r} needs old_logp")
    flat = [(i, j) for i, toks in enumerate(seqs) for j in toks]
    chosen = _cov_choice(loss_type, flat, lp, old, A_of, zoo, log_ratio, lo, hi, shape, n_loss)
    c, ratio_of, ratios, units, masked, phis = {}, {}, [], [], 0, []
    for i, toks in enumerate(seqs):
        if not toks:
            continue
        s_i = torch.exp(log_ratio(_add([lp[j] - old[j] for j in toks], zero) / len(toks)))
        if loss_type == "gmpo":
            terms = []
            for j in toks:
                d = log_ratio(lp[j] - old[j])
                a = float(A_of(i, j))
                sg = (a > 0) - (a < 0)
                terms.append(sg * torch.minimum(sg * d, sg * torch.clamp(d, -eps_low, eps_high)))
            r_i = torch.exp(_add(terms, zero) / len(toks))
            L = -(math.fsum(float(A_of(i, j)) for j in toks) / len(toks)) * r_i
            if is_mode is not None:
                L = L * math.exp(mean([math.log(w[j] + 1e-10) for j in toks]))
            units.append(L)
            for j in toks:
                ratio_of[j] = r_i
                ratios.append(_val(r_i))
            continue
        if loss_type == "vespo":
            log_w = math.fsum(_clip1(_val(lp[j]) - _val(old[j]), -20.0, 20.0) for j in toks)
            if is_mode is not None:
                logs = [_clip1(math.log(w[j]) if w[j] > 0 else -math.inf, _LOG_1E8, 20.0) for j in toks]
                log_w += logs[0] if is_mode.startswith("sequence") else math.fsum(logs)
            log_w = _clip1(log_w, _LOG_1E8, 20.0)
        for j in toks:
            A = A_of(i, j)
            a = float(A)
            rho = torch.exp(log_ratio(lp[j] - old[j]))
            ratio = s_i if loss_type in ("sapo", "luspo") and ratio_level == "sequence" else rho
            if loss_type == "sapo":
                tau = zoo["sapo_tau_pos"] if a > 0 else zoo["sapo_tau_neg"]
                c[j] = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * A
            elif loss_type == "luspo":
                c[j] = ppo_form(ratio, A)
            elif loss_type == "vespo":
                k = zoo["vespo_k_pos"] if a >= 0 else zoo["vespo_k_neg"]
                lam = max(zoo["vespo_lambda_pos"] if a >= 0 else zoo["vespo_lambda_neg"], 1e-4)
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
                phis.append(phi)
                c[j] = -phi * A * lp[j]
            elif loss_type == "dro":
                d = lp[j] - old[j]
                c[j] = -(A * lp[j] - 0.5 * zoo["dro_beta"] * d * d)
            elif loss_type in ("dppo_tv", "dppo_kl"):
                trunc = min(_val(rho), zoo["dppo_ratio_cap"])
                p, po = math.exp(_val(lp[j])), math.exp(_val(old[j]))
                if loss_type == "dppo_tv":
                    ok = p - po <= eps_high if a > 0 else p - po >= -eps_low
                else:
                    arg = (1.0 - po + 1e-8) / (1.0 - p + 1e-8)          # NaN (never inside) for p > 1
                    bkl = po * (_val(old[j]) - _val(lp[j])) + (1 - po) * math.log(arg) if arg > 0 else math.nan
                    ok = (bkl <= eps_high or p <= po) if a > 0 else (bkl <= eps_low or p >= po)
                masked += not ok
                c[j] = -A * trunc * lp[j] if ok else 0 * lp[j]
            elif loss_type == "clip_cov":
                c[j] = 0 * lp[j] if j in chosen else ppo_form(rho, A)
            else:                                                        # kl_cov
                c[j] = -A * rho + (zoo["kl_cov_coef"] * torch.abs(log_ratio(lp[j] - old[j])) if j in chosen else 0)
            ratio_of[j] = ratio
            ratios.append(_val(ratio))
            if not keep[j]:
                c[j] = 0 * c[j]
            if tw is not None:
                c[j] = c[j] * tw[j]
            if is_mode is not None and loss_type != "vespo":
                c[j] = c[j] * w[j]
            if beta != 0:
                c[j] = c[j] + beta * kl_term(j, ratio_of)
    if loss_type == "gmpo":
        loss = _add(units, zero) / max(seq_count(), 1.0)
        if beta != 0:
            loss = loss + aggregate({j: beta * kl_term(j, ratio_of) for _, j in flat}, zero)
    else:
        loss = aggregate(c, zero)
    metrics["ratio_mean"] = mean(ratios)
    metrics["ratio_min"] = min(ratios) if ratios else 0.0
    metrics["ratio_max"] = max(ratios) if ratios else 0.0
    kl_old = [_val(torch.exp(-log_ratio(lp[j] - old[j])) - 1 + log_ratio(lp[j] - old[j])) for _, j in flat]
    metrics["approx_kl_old"] = mean(kl_old)
    if loss_type.startswith("dppo"):
        metrics["dppo_mask_frac"] = masked / n_loss if n_loss else 0.0
    if loss_type in ("clip_cov", "kl_cov"):
        metrics[f"{loss_type}_frac"] = len(chosen) / n_loss if n_loss else 0.0
    if loss_type == "vespo":
        metrics["vespo_phi_mean"] = mean(phis)
    return loss


def _cov_choice(loss_type, flat, lp, old, A_of, zoo, log_ratio, lo, hi, shape, n_loss):
    """clip_cov / kl_cov: the flat positions their covariance rule selects (an empty set for the other losses)."""
    if loss_type not in ("clip_cov", "kl_cov") or not flat:
        return set()
    mean_a = math.fsum(float(A_of(i, j)) for i, j in flat) / len(flat)
    mean_l = math.fsum(_val(lp[j]) for _, j in flat) / len(flat)
    cov = {j: (float(A_of(i, j)) - mean_a) * (_val(lp[j]) - mean_l) for i, j in flat}
    k = max(math.floor(zoo["cov_ratio"] * n_loss), 1)
    if loss_type == "kl_cov":                                            # the k largest covariances
        return set(sorted(cov, key=lambda j: (-cov[j], j))[:k])
    u = torch.rand(shape, generator=zoo["generator"], dtype=torch.float32).reshape(-1)
    cand = []
    for i, j in flat:
        a = float(A_of(i, j))
        r = _val(torch.exp(log_ratio(lp[j] - old[j])))
        rc = _clip1(r, lo if lo is not None else -math.inf, hi if hi is not None else math.inf)
        if not (-a * rc > -a * r) and zoo["clip_cov_lb"] < cov[j] < zoo["clip_cov_ub"]:
            cand.append(j)
    return set(sorted(cand, key=lambda j: (float(u[j]), j))[:k])
