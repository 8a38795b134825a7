"""Float64 ground truth of ``rlcore.policy_loss`` and ``rlcore.vstar``: for tests only, slow by design.

Every formula of the contract (``LOSSES.md`` and the policy-loss spec that pins its defaults and edge cases) is
written out literally, one token at a time, in float64:

- The batch is first split into a Python list of sequences, each a list of the flat positions of its loss tokens
  (``mask != 0``), from either layout: padded ``[B, T]`` with a mask, or packed ``[N]`` with ``cu_seqlens``.
- Only those positions are ever read, so whatever sits at a masked position (inf, nan, 1e300) cannot matter.
- Each loss is then a Python loop over sequences and tokens of 0-d tensor ops; the aggregations are literal sums.
- Gradients flow to ``logp`` and ``entropy`` (whatever dtype they have: they are cast to float64 differentiably).
  All other inputs are constants; ``sg(x)`` is ``x.detach()``.

It never imports the fast path (``rlcore.losses``, ``rlcore.segments``): it is an independent second implementation,
meant to be obviously right rather than fast. Use it on batches of a few dozen tokens.

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
    "LOSS_TYPES", "CLIPPED", "PPO_FORMS", "REGRESSION", "AGGS", "IS_MODES", "KL_ESTIMATORS", "DEFAULTS",
]

PPO_FORMS = ("ppo", "dapo", "dr_grpo", "gspo", "gspo_token")   # losses written in the min(rho A, clip(rho) A) form
CLIPPED = PPO_FORMS + ("cispo", "reinforce")                     # the per-token family (LOSSES.md section 1)
REGRESSION = ("apo", "oapl", "kimi", "rebel")                    # the squared-regression family (section 5)
LOSS_TYPES = CLIPPED + REGRESSION
AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "constant")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")

# loss_type: (agg, eps_low, eps_high, beta2); "-" where the parameter does not apply.
DEFAULTS = {
    "ppo": ("token-mean", 0.2, 0.2, "-"),
    "dapo": ("token-mean", 0.2, 0.28, "-"),
    "dr_grpo": ("constant", 0.2, 0.2, "-"),
    "gspo": ("seq-mean-token-mean", 3e-4, 4e-4, "-"),
    "gspo_token": ("seq-mean-token-mean", 3e-4, 4e-4, "-"),
    "cispo": ("token-mean", None, 0.28, "-"),
    "reinforce": ("token-mean", "-", "-", "-"),
    "apo": ("token-mean", "-", "-", 1e-3),
    "oapl": ("token-mean", "-", "-", 1e-3),
    "kimi": ("token-mean", "-", "-", 0.01),
    "rebel": ("token-mean", "-", "-", "-"),
}

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
):
    """The policy loss, literally, in float64. Same arguments and layouts as ``rlcore.policy_loss``.

    Shapes: padded ``logp [B, T]``, ``mask [B, T]`` (or ``None``), per-token inputs ``[B, T]``, ``advantages [B]`` or
    ``[B, T]``; packed ``logp [N]``, ``cu_seqlens [B + 1]``, per-token inputs ``[N]``, ``advantages [B]`` or ``[N]``;
    ``rewards``, ``baseline [B]``.

    Returns:
        ``(loss, metrics)``: a 0-d float64 tensor and a dict of detached 0-d float64 tensors.
    """
    if loss_type not in DEFAULTS:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    d_agg, d_eps_low, d_eps_high, d_beta2 = DEFAULTS[loss_type]
    agg = d_agg if agg is _DEFAULT else agg
    eps_low = d_eps_low if eps_low is _DEFAULT else eps_low
    eps_high = d_eps_high if eps_high is _DEFAULT else eps_high
    beta2 = d_beta2 if beta2 is _DEFAULT else beta2
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}")
    if is_mode is not None and is_mode not in IS_MODES:
        raise ValueError(f"unknown is_mode {is_mode!r}")
    if kl_estimator not in KL_ESTIMATORS:
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
    def aggregate(x, base):
        sums = [_add([x[j] for j in toks], base) for toks in seqs]       # sum_t m_it x_it
        S = _add(sums, base)
        if agg == "token-mean":
            denom = float(num_tokens) if num_tokens is not None else float(num_loss_tokens)
            return S / max(denom, 1.0)
        if agg == "token-sum":
            return S
        if agg == "seq-mean-token-mean":
            nonempty = sum(1 for k in n if k > 0)
            return _add([s / max(k, 1) for s, k in zip(sums, n)], base) / max(nonempty, 1)
        if agg == "seq-mean-token-sum":
            return S / max(B, 1)
        if agg_constant is None:
            raise ValueError("agg='constant' needs agg_constant")
        return S / (B * agg_constant)

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
        if ref is None:
            raise ValueError("beta != 0 needs ref_logp")
        for toks in seqs:
            for j in toks:
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

    if loss_type in CLIPPED:
        # ---- 1. clipped-surrogate family: c_t per loss token ------------------------------------------------------
        needs_old = loss_type != "reinforce"
        if needs_old and old is None:
            raise ValueError(f"loss_type={loss_type!r} needs old_logp")
        lo = None if eps_low in (None, "-") else 1.0 - eps_low
        hi = None if eps_high in (None, "-") else 1.0 + eps_high

        def log_ratio(x):
            return torch.clamp(x, -log_ratio_clamp, log_ratio_clamp) if log_ratio_clamp is not None else x

        def ppo_form(ratio, A):                                          # -min(r A, clip(r, lo, hi) A), dual clip
            c = -torch.minimum(ratio * A, torch.clamp(ratio, min=lo, max=hi) * A)
            if dual_clip is not None and A < 0:
                c = torch.minimum(c, -dual_clip * A)
            return c

        if loss_type == "gspo" and not seq_adv:
            raise ValueError("gspo needs sequence-level advantages [B]")
        c, ratios, low, high, kl_old = {}, [], [], [], []
        for i, toks in enumerate(seqs):
            if loss_type in ("gspo", "gspo_token"):
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
                    ratio = torch.exp(d)                                 # rho_t
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
                if tw is not None:
                    c[j] = c[j] * tw[j]
                if is_mode is not None:
                    c[j] = c[j] * w[j]                                   # after clipping, before KL
                if beta != 0:
                    c[j] = c[j] + beta * kl[j]
        loss = aggregate(c, zero)
        if loss_type != "reinforce":
            metrics["ratio_mean"] = mean(ratios)
            metrics["ratio_min"] = min(ratios) if ratios else 0.0
            metrics["ratio_max"] = max(ratios) if ratios else 0.0
            metrics["clip_frac_low"] = mean([float(b) for b in low])
            metrics["clip_frac_high"] = mean([float(b) for b in high])
            metrics["approx_kl_old"] = mean(kl_old)
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
        loss = _add(Ls, zero) / max(len(Ls), 1)
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
