"""RL policy losses on per-token log-probs: the clipped-surrogate family and the squared-regression family.

The math and its conventions are specified in ``LOSSES.md`` (the design notes); this module is that spec in code,
with every choice the spec leaves open written down in :func:`policy_loss`'s docstring.

One function, :func:`policy_loss`, serves every loss by name. It runs in three steps:

1. *Prepare*: check arguments, pick the layout (padded ``[B, T]`` + mask, or packed ``[N]`` + ``cu_seqlens``) and
   make every masked-out position inert. Masked positions may hold anything (padding garbage, ``-inf``, NaN): the
   values there are replaced before any arithmetic, so neither the loss nor a gradient can see them.
2. *Per-token terms*: ``c_t`` of the chosen loss, times the detached mismatch weight, plus ``beta * KL_t``.
   Sequence-level quantities (GSPO's ratio, the regression family's ``Lam_i``, sequence mismatch weights) are
   segment sums: a row sum on the padded layout, ``rlcore.segments`` on the packed one (Triton on CUDA, no host sync).
3. *Aggregate* with ``agg``, subtract the entropy bonus, and collect the metrics as detached 0-d tensors (no
   ``.item()``: reading them is the caller's choice, and the only host sync).

Every step is differentiable PyTorch, so the loss composes with any source of ``logp``: a model's own logits, or
``rlcore.linear_logprobs`` (which is what ``rlcore.fused_policy_loss`` does, without logits).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch

__all__ = [
    "policy_loss", "vstar", "PolicyLossOutput", "LOSS_TYPES", "AGGS", "IS_MODES", "KL_ESTIMATORS", "DEFAULT",
]


class _Default:
    """The "use this loss type's preset" marker, distinct from ``None`` (which means "off" for ``eps_low``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()

AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "constant")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_BASE_KL = ("k1", "k2", "k3", "abs")
KL_ESTIMATORS = _BASE_KL + tuple(k + "+" for k in _BASE_KL)


@dataclass(frozen=True)
class _Preset:
    family: str                # "clip" (the PPO form), "cispo", "reinforce", "regression"
    ratio: str = "token"       # "token" (rho_t), "seq" (GSPO s_i), "seq_token" (GSPO-token s_it)
    agg: str = "token-mean"
    eps_low: Optional[float] = 0.2
    eps_high: Optional[float] = 0.2
    beta2: Optional[float] = None
    anchor: Optional[str] = None   # regression: which log-probs Lam_i is measured against


_PRESETS: Dict[str, _Preset] = {
    "ppo": _Preset("clip"),
    "dapo": _Preset("clip", eps_high=0.28),                         # clip-higher, token-mean
    "dr_grpo": _Preset("clip", agg="constant"),                     # S / (B L)
    "gspo": _Preset("clip", ratio="seq", agg="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4),
    "gspo_token": _Preset("clip", ratio="seq_token", agg="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4),
    # CISPO as MiniMax-M1 runs it: no lower bound on the importance weight, an upper one.
    "cispo": _Preset("cispo", eps_low=None, eps_high=0.28),
    "reinforce": _Preset("reinforce", eps_low=None, eps_high=None),
    "apo": _Preset("regression", eps_low=None, eps_high=None, beta2=1e-3, anchor="ref_logp"),
    "oapl": _Preset("regression", eps_low=None, eps_high=None, beta2=1e-3, anchor="sampler_logp"),
    "kimi": _Preset("regression", eps_low=None, eps_high=None, beta2=0.01, anchor="old_logp"),
    "rebel": _Preset("regression", eps_low=None, eps_high=None, anchor="old_logp"),
}
LOSS_TYPES = tuple(_PRESETS)


@dataclass(frozen=True)
class _Norms:
    """The batch-wide denominators, for evaluating the loss of a slice of whole sequences at a time (the single-pass
    fused loss): the loss is then the sum of the slices' losses. 0-d tensors except ``batch``."""

    num_tokens: torch.Tensor     # loss tokens (token-mean)
    num_seqs: torch.Tensor       # sequences with a loss token (seq-mean-token-mean, regression)
    num_pairs: torch.Tensor      # pairs with a loss token (rebel)
    batch: int                   # B (seq-mean-token-sum, constant)


class PolicyLossOutput(NamedTuple):
    """``loss``: a 0-d tensor to call ``backward()`` on. ``metrics``: detached 0-d tensors, never synced."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# V*
# ----------------------------------------------------------------------------------------------------------------------


def vstar(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """The soft-max value ``V* = beta1 * log(mean_j exp(r_j / beta1))`` over the last dimension: ``[..., G] -> [...]``.

    Computed as ``r_max + beta1 * log1p(mean_j expm1((r_j - r_max) / beta1))``, in float64 whatever the input:
    shifting by the max means nothing overflows (``beta1 = 1e-3`` with rewards of ``1e3`` is fine), and
    ``log1p``/``expm1`` keep the ``beta1 -> inf`` limit (the mean) accurate instead of cancelling ``log G`` against
    a log-sum-exp. ``beta1 -> 0`` gives the max. Equal to ``beta1 * (logsumexp(r / beta1) - log G)``.
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"vstar: rewards must be a floating-point tensor [..., G], got {_describe(rewards)}")
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"vstar: rewards must have a non-empty last (group) dimension, got shape {tuple(rewards.shape)}")
    beta1 = _positive("beta1", beta1)
    r = rewards.double()
    r_max = r.amax(dim=-1, keepdim=True)                          # [..., 1]
    v = r_max.squeeze(-1) + beta1 * torch.log1p(torch.expm1((r - r_max) / beta1).mean(dim=-1))
    return v.to(rewards.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Layouts: padded [B, T] + mask, or packed [N] + cu_seqlens
# ----------------------------------------------------------------------------------------------------------------------


class _Layout:
    """Where the sequences are. ``seq_sum`` maps a token-shaped tensor to ``[B]``; ``bcast`` maps ``[B]`` back."""

    def __init__(self, logp: torch.Tensor, cu_seqlens: Optional[torch.Tensor], check: bool):
        self.token_shape = tuple(logp.shape)
        if cu_seqlens is None:
            if logp.dim() != 2:
                raise ValueError(
                    f"logp must be [B, T] (padded layout) or [N] with cu_seqlens (packed layout), "
                    f"got shape {tuple(logp.shape)} and no cu_seqlens")
            self.packed, self.B = False, logp.shape[0]
            self.cu_seqlens = None
        else:
            if logp.dim() != 1:
                raise ValueError(
                    f"with cu_seqlens (packed layout) logp must be [N], got shape {tuple(logp.shape)}")
            from . import segments

            if not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"cu_seqlens must be an int32/int64 tensor [B + 1], got {_describe(cu_seqlens)}")
            if check:
                segments.check_cu_seqlens(cu_seqlens, logp.shape[0])
            elif cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
                raise ValueError(f"cu_seqlens must be [B + 1], got shape {tuple(cu_seqlens.shape)}")
            if cu_seqlens.device != logp.device:
                raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logp is on {logp.device}")
            self.packed, self.B = True, cu_seqlens.numel() - 1
            self.cu_seqlens = cu_seqlens
            self._segments = segments

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """token-shaped -> ``[B]``."""
        if not self.packed:
            return x.sum(dim=-1)
        return self._segments.segment_sum(x, self.cu_seqlens)

    def bcast(self, s: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> token-shaped."""
        if not self.packed:
            return s[:, None].expand(self.token_shape)
        return self._segments.segment_broadcast(s, self.cu_seqlens, self.token_shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------------


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _real(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    return float(x)


def _positive(name: str, x) -> float:
    value = _real(name, x)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    return value


def _choice(name: str, x, options) -> str:
    if x not in options:
        raise ValueError(f"unknown {name} {x!r}; expected one of {', '.join(map(repr, options))}")
    return x


def _on_logp_device_float(name, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` itself, after checking it is on ``logp``'s device and floating point."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {ref.device}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def _token_tensor(name, x, ref: torch.Tensor, *, required: bool = False, why: str = ""):
    """A per-token input: the same shape and device as ``logp``, floating point."""
    if x is None:
        if required:
            raise ValueError(f"{name} is required{why}")
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor shaped like logp {tuple(ref.shape)}, got {_describe(x)}")
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have logp's shape {tuple(ref.shape)}, got {tuple(x.shape)}")
    return _on_logp_device_float(name, x, ref)


def _seq_tensor(name, x, layout: _Layout, ref: torch.Tensor):
    """A per-sequence input ``[B]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B] = [{layout.B}], got {_describe(x)}")
    if tuple(x.shape) != (layout.B,):
        raise ValueError(f"{name} must be [B] = [{layout.B}] (one value per sequence), got shape {tuple(x.shape)}")
    return _on_logp_device_float(name, x, ref)


# ----------------------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------------------


def _kl(D: torch.Tensor, estimator: str, clamp: bool) -> torch.Tensor:
    """``KL_t`` from ``D = l - l_ref`` (LOSSES.md section 4). ``"<name>+"``: value of ``<name>``, gradient of k2."""
    name = estimator.rstrip("+")
    if name == "k1":
        value = D
    elif name == "k2":
        value = 0.5 * D * D
    elif name == "k3":
        neg = (-D).clamp(-20.0, 20.0) if clamp else -D
        value = torch.exp(neg) - 1.0 + D
    else:
        value = D.abs()
    if clamp:
        value = value.clamp(-10.0, 10.0)
    if estimator.endswith("+"):
        k2 = 0.5 * D * D
        value = value.detach() + (k2 - k2.detach())
    return value


def _is_weights(delta, valid, layout, mode, cap, cap_min):
    """Detached mismatch weights (token-shaped), whether each was truncated/masked, and the per-token log-weight.

    Everything is decided in log space (``log w`` against ``log C``), so ``exp`` only ever sees values <= log C.
    """
    log_cap, log_min = math.log(cap), math.log(cap_min)
    if mode.startswith("sequence"):
        seq_delta = layout.seq_sum(torch.where(valid, delta, 0.0))            # [B]
        log_w = layout.bcast(seq_delta)                                       # token-shaped
    else:
        log_w = delta
    if mode.endswith("truncate"):
        hit = log_w > log_cap
        w = torch.exp(torch.clamp(log_w, max=log_cap))
    else:
        hit = (log_w < log_min) | (log_w > log_cap)
        w = torch.where(hit, 0.0, torch.exp(torch.clamp(log_w, max=log_cap)))
    return w, hit


def _clip_bounds(eps_low, eps_high):
    lo = None if eps_low is None else 1.0 - eps_low
    hi = None if eps_high is None else 1.0 + eps_high
    return lo, hi


def _clamp(x, lo, hi):
    return torch.clamp(x, min=lo, max=hi)


# ----------------------------------------------------------------------------------------------------------------------
# policy_loss
# ----------------------------------------------------------------------------------------------------------------------


def policy_loss(
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
    agg=DEFAULT,
    eps_low=DEFAULT,
    eps_high=DEFAULT,
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
    beta2=DEFAULT,
    beta1: float = 0.5,
    group_size: Optional[int] = None,
    eta: float = 1.0,
    check_inputs: bool = True,
    _norms: Optional["_Norms"] = None,
) -> PolicyLossOutput:
    r"""The policy loss named ``loss_type`` on per-token log-probs ``logp``; returns ``(loss, metrics)``.

    Layouts (every input follows ``logp``'s):
        - padded: ``logp [B, T]``, ``mask [B, T]``, per-token inputs ``[B, T]``, ``advantages [B]`` or ``[B, T]``.
        - packed: ``logp [N]`` with ``cu_seqlens`` (int32/int64 ``[B + 1]``, from 0 to N, as flash-attn varlen),
          per-token inputs ``[N]``, ``advantages [B]`` or ``[N]``.
        ``rewards`` and ``baseline`` are ``[B]``. ``mask`` (bool or 0/1; ``None``: every token) is 0 for prompt,
        padding and tool/observation tokens. Masked positions may hold anything, even NaN: they are never read.

    Losses (``c_t`` is the per-token loss; ``rho_t = exp(l_t - l_old_t)``; ``A`` the advantage):
        ``ppo``        ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``; ``dual_clip=c`` caps it at ``-c A``
                       where ``A < 0``. Presets: ``dapo`` (eps_high 0.28), ``dr_grpo`` (``agg="constant"``).
        ``gspo``       the same form on ``s_i = exp(Lam_i / |y_i|)``, ``Lam_i = sum_t m (l - l_old)``; ``A`` per sequence.
        ``gspo_token`` ``s_it = sg(s_i) exp(l_t - sg(l_t))``: GSPO's gradient with token-level advantages.
        ``cispo``      ``-sg(clip(rho, 1 - eps_low, 1 + eps_high)) A l_t``; ``eps_low=None`` (its default): no lower bound.
        ``reinforce``  ``-A l_t``.
        ``apo`` / ``oapl`` / ``kimi``: ``(beta2 Lam_i - (r_i - b_i))^2`` per sequence, with ``Lam_i`` against
                       ``ref_logp`` / ``sampler_logp`` / ``old_logp`` and ``b_i`` the given ``baseline`` (``apo``: V*,
                       required), else for ``oapl`` ``vstar`` of each group of ``group_size`` rewards (with ``beta1``)
                       and for ``kimi`` the group's mean reward. ``beta2`` defaults: 1e-3, 1e-3, 0.01 (Kimi's tau).
        ``rebel``      pairs ``(0, 1), (2, 3), ...`` of the same prompt:
                       ``((Lam_i - Lam_j) - eta (r_i - r_j))^2``, ``Lam`` against ``old_logp`` (the generating policy).
        The regression loss is a mean over the sequences (pairs) that have at least one loss token.

    Defaults by ``loss_type`` for ``agg`` / ``eps_low`` / ``eps_high``: ppo token-mean / 0.2 / 0.2; dapo token-mean
    / 0.2 / 0.28; dr_grpo constant / 0.2 / 0.2; gspo and gspo_token seq-mean-token-mean / 3e-4 / 4e-4; cispo
    token-mean / None / 0.28; the rest token-mean (it aggregates their KL and entropy terms).

    Args:
        log_ratio_clamp: ``l - l_old`` (GSPO: its per-token mean) is clamped to ``[-c, c]`` before ``exp``;
            ``None`` turns that off.
        agg: ``token-mean`` (``S / num_tokens``; ``num_tokens`` defaults to the mask's sum and may be a global count
            over ranks and accumulation steps), ``token-sum``, ``seq-mean-token-mean`` (over sequences with a loss
            token), ``seq-mean-token-sum`` (over all ``B``), ``constant`` (``S / (B * agg_constant)``).
        token_weights: an optional detached per-token weight on ``c_t``.
        beta, kl_estimator, kl_clamp: ``beta * KL_t(l - l_ref)`` joins ``c_t`` (after the mismatch weight) and is
            aggregated with it. Estimators ``k1``, ``k2``, ``k3``, ``abs``; ``"<name>+"`` has ``<name>``'s value and
            ``k2``'s gradient. ``kl_clamp`` clamps ``-D`` to [-20, 20] inside ``k3``'s exp and the value to [-10, 10].
        is_mode, is_cap, is_min, reject: training-inference mismatch correction from ``sampler_logp``, with
            ``delta_t = l_old - l_smp`` (``sg(l) - l_smp`` without ``old_logp``): ``token_truncate``
            ``min(e^delta, C)``, ``token_mask`` ``e^delta`` inside ``[C_min, C]`` else 0, and ``sequence_*`` the same
            on ``exp(sum_t m delta_t)``. ``C = is_cap`` (2.0), ``C_min = is_min`` (default ``1 / is_cap``). The
            weights are detached and multiply ``c_t`` only. ``reject=True`` (mask modes) drops the zero-weight
            tokens from the mask instead, for every term and count. Clipped family only.
        entropy_coef: ``loss -= entropy_coef * agg(entropy)``.
        check_inputs: check ``cu_seqlens``'s values (a host sync on CUDA). Pass ``False`` in a hot loop whose
            ``cu_seqlens`` is known good; nothing else here ever syncs.
        _norms: internal (``fused_policy_loss``): batch-wide aggregation denominators for a slice of the batch.

    Metrics (detached 0-d tensors): ``loss``, ``num_tokens``, ``num_seqs``; clipped family: ``ratio_mean/min/max``,
    ``clip_frac_low/high`` (where that bound binds), ``dual_clip_frac``, ``approx_kl_old`` (k3 of the clamped ``l - l_old``);
    ``is_weight_mean`` with ``is_frac_truncated`` or ``is_frac_masked``; ``kl_ref_mean``; ``entropy_mean``;
    regression: ``seq_log_ratio_mean`` and ``target_mean`` (``r - b``).

    An all-masked batch gives loss 0 and zero gradients.

    Example::

        out = rlcore.policy_loss(logp, adv, mask, old_logp=old, loss_type="gspo")
        out.loss.backward()
    """
    # ---- names and presets -------------------------------------------------------------------------------------
    _choice("loss_type", loss_type, LOSS_TYPES)
    preset = _PRESETS[loss_type]
    agg = _choice("agg", preset.agg if agg is DEFAULT else agg, AGGS)
    eps_low = preset.eps_low if eps_low is DEFAULT else eps_low
    eps_high = preset.eps_high if eps_high is DEFAULT else eps_high
    beta2 = preset.beta2 if beta2 is DEFAULT else beta2
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if is_mode is not None:
        _choice("is_mode", is_mode, IS_MODES)
    family = preset.family
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high)):
        if value is not None and family in ("clip", "cispo") and _real(name, value) < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value!r}")
    if dual_clip is not None:
        if family != "clip":
            raise ValueError(f"dual_clip applies to the PPO-form losses, not loss_type={loss_type!r}")
        if _real("dual_clip", dual_clip) <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    if log_ratio_clamp is not None:
        log_ratio_clamp = _positive("log_ratio_clamp", log_ratio_clamp)
    beta = _real("beta", beta)
    entropy_coef = _real("entropy_coef", entropy_coef)
    if agg == "constant":
        if agg_constant is None:
            raise ValueError("agg='constant' needs agg_constant (the L of S / (B * L), e.g. the max completion length)")
        agg_constant = _positive("agg_constant", agg_constant)
    if is_mode is not None:
        if family == "regression":
            raise ValueError(f"is_mode (mismatch correction) applies to the clipped family, not {loss_type!r}: "
                             f"the regression losses anchor on the sampler instead (loss_type='oapl')")
        is_cap = _positive("is_cap", is_cap)
        is_min = 1.0 / is_cap if is_min is None else _positive("is_min", is_min)
        if is_min > is_cap:
            raise ValueError(f"is_min must be <= is_cap, got is_min={is_min} and is_cap={is_cap}")
    if reject and (is_mode is None or not is_mode.endswith("mask")):
        raise ValueError("reject=True applies to is_mode='token_mask' or 'sequence_mask'")

    # ---- tensors and layout ------------------------------------------------------------------------------------
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point tensor, got {_describe(logp)}")
    layout = _Layout(logp, cu_seqlens, check_inputs)
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    needs_old = family in ("clip", "cispo") or preset.anchor == "old_logp"
    old_logp = _token_tensor("old_logp", old_logp, logp, required=needs_old,
                             why=f" for loss_type={loss_type!r} (pass logp.detach() on the first pass over fresh data)")
    ref_logp = _token_tensor("ref_logp", ref_logp, logp, required=beta != 0 or preset.anchor == "ref_logp",
                             why=" for the KL term (beta != 0)" if beta != 0 else f" for loss_type={loss_type!r}")
    sampler_logp = _token_tensor("sampler_logp", sampler_logp, logp,
                                 required=is_mode is not None or preset.anchor == "sampler_logp",
                                 why=" for mismatch correction (is_mode)" if is_mode else f" for loss_type={loss_type!r}")
    entropy = _token_tensor("entropy", entropy, logp, required=entropy_coef != 0, why=" when entropy_coef != 0")
    token_weights = _token_tensor("token_weights", token_weights, logp)
    if mask is None:
        valid = torch.ones(layout.token_shape, dtype=torch.bool, device=logp.device)
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool or 0/1 tensor shaped like logp, got {_describe(mask)}")
        if tuple(mask.shape) != layout.token_shape:
            raise ValueError(f"mask must have logp's shape {layout.token_shape}, got {tuple(mask.shape)}")
        if mask.device != logp.device:
            raise ValueError(f"mask is on {mask.device} but logp is on {logp.device}")
        valid = mask if mask.dtype == torch.bool else mask != 0

    if family == "regression":
        if rewards is None:
            raise ValueError(f"rewards [B] are required for loss_type={loss_type!r}")
        rewards = _seq_tensor("rewards", rewards, layout, logp).to(cdt)
        if baseline is not None:
            baseline = _seq_tensor("baseline", baseline, layout, logp).to(cdt)
        elif loss_type == "apo":
            raise ValueError("baseline (V* per sequence, from rlcore.vstar over pi_ref's samples) is required for "
                             "loss_type='apo'")
        if loss_type in ("oapl", "kimi") and baseline is None:
            if group_size is None:
                raise ValueError(f"loss_type={loss_type!r} needs a baseline [B] or group_size to compute it from "
                                 f"the rewards of each group")
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                    or layout.B % group_size:
                raise ValueError(f"group_size must be a positive int dividing B={layout.B}, got {group_size!r}")
        if loss_type == "rebel" and layout.B % 2:
            raise ValueError(f"loss_type='rebel' pairs sequences (0, 1), (2, 3), ...: B must be even, got B={layout.B}")
        beta2 = None if beta2 is None else _real("beta2", beta2)
        eta = _real("eta", eta)
    else:
        if advantages is None:
            raise ValueError(f"advantages are required for loss_type={loss_type!r}")
    if advantages is not None:
        if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
            raise TypeError(f"advantages must be a floating-point tensor [B] or shaped like logp, "
                            f"got {_describe(advantages)}")
        if tuple(advantages.shape) not in ((layout.B,), layout.token_shape):
            raise ValueError(f"advantages must be [B] = [{layout.B}] (per sequence) or logp's shape "
                             f"{layout.token_shape} (per token), got {tuple(advantages.shape)}")
        if advantages.device != logp.device:
            raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
        # [B] is read per sequence; in the packed layout with N == B, per token (except by gspo, which needs [B])
        per_seq_adv = tuple(advantages.shape) == (layout.B,) and (
            layout.token_shape != (layout.B,) or preset.ratio == "seq")
        if preset.ratio == "seq" and not per_seq_adv:
            raise ValueError("loss_type='gspo' needs per-sequence advantages [B]; use loss_type='gspo_token' for "
                             "token-level advantages")

    # ---- make masked positions inert ----------------------------------------------------------------------------
    l = torch.where(valid, logp.to(cdt), 0.0)                    # the only tensor that carries gradient
    l_sg = l.detach()

    def const(x, fill):
        return None if x is None else torch.where(valid, x.detach().to(cdt), fill)

    old = const(old_logp, l_sg)
    ref = const(ref_logp, l_sg)
    smp = const(sampler_logp, old if old is not None else l_sg)
    H = None if entropy is None else torch.where(valid, entropy.to(cdt), 0.0)
    tw = const(token_weights, 1.0)
    if advantages is not None:
        A = advantages.detach().to(cdt)
        A = torch.where(valid, layout.bcast(A) if per_seq_adv else A, 0.0)

    metrics: Dict[str, torch.Tensor] = {}

    # ---- mismatch weights (and reject) --------------------------------------------------------------------------
    w_is = None
    if is_mode is not None:
        delta = (old if old is not None else l_sg) - smp
        w_is, hit = _is_weights(delta, valid, layout, is_mode, is_cap, is_min)
        loss_tokens = valid                                      # before reject, for the masked fraction
        if reject:
            valid = valid & ~hit
        w_is = torch.where(valid, w_is, 0.0)
    m = valid.to(cdt)
    n_seq = layout.seq_sum(m)                                    # [B] |y_i|
    nonempty = n_seq > 0
    n_tok = m.sum()

    def mmean(x):
        return torch.where(valid, x, 0.0).sum() / n_tok.clamp(min=1)

    def mmin(x):
        if x.numel() == 0:
            return torch.zeros((), dtype=cdt, device=l.device)
        return torch.where(n_tok > 0, torch.where(valid, x, math.inf).amin(), 0.0)

    def mmax(x):
        if x.numel() == 0:
            return torch.zeros((), dtype=cdt, device=l.device)
        return torch.where(n_tok > 0, torch.where(valid, x, -math.inf).amax(), 0.0)

    norms = _norms
    if norms is None:
        tok_denom = n_tok if num_tokens is None else torch.as_tensor(num_tokens, dtype=cdt, device=l.device)
        seq_denom, batch = nonempty.sum(), layout.B
    else:
        tok_denom, seq_denom, batch = norms.num_tokens, norms.num_seqs, norms.batch

    def aggregate(x):
        """``agg`` of a token-shaped ``x`` that is 0 at masked positions."""
        if agg == "token-mean":
            return x.sum() / tok_denom.clamp(min=1)
        if agg == "token-sum":
            return x.sum()
        if agg == "seq-mean-token-mean":
            per_seq = layout.seq_sum(x) / n_seq.clamp(min=1)    # [B]
            return per_seq.sum() / seq_denom.clamp(min=1)
        if agg == "seq-mean-token-sum":
            return layout.seq_sum(x).sum() / max(batch, 1)
        return x.sum() / (max(batch, 1) * agg_constant)

    if num_tokens is not None and agg == "token-mean":
        if not isinstance(num_tokens, (numbers.Real, torch.Tensor)) or isinstance(num_tokens, bool):
            raise TypeError(f"num_tokens must be a number or a 0-d tensor, got {_describe(num_tokens)}")

    # ---- per-token terms ----------------------------------------------------------------------------------------
    zero = torch.zeros((), dtype=cdt, device=l.device)
    if family in ("clip", "cispo", "reinforce"):
        lo, hi = _clip_bounds(eps_low, eps_high)
        if family == "reinforce":
            c = -A * l
            ratio = None
        else:
            if preset.ratio == "token":
                d = l - old
                if log_ratio_clamp is not None:
                    d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
                ratio = torch.exp(d)
            else:
                seq_lr = layout.seq_sum(torch.where(valid, l - old, 0.0)) / n_seq.clamp(min=1)           # [B] mean token log-ratio
                if log_ratio_clamp is not None:
                    seq_lr = seq_lr.clamp(-log_ratio_clamp, log_ratio_clamp)
                s = torch.exp(seq_lr)                                          # [B]
                if preset.ratio == "seq":
                    ratio = layout.bcast(s)
                else:
                    ratio = layout.bcast(s.detach()) * torch.exp(l - l_sg)
            clipped = _clamp(ratio, lo, hi)
            if family == "clip":
                c = -torch.minimum(ratio * A, clipped * A)
                if dual_clip is not None:
                    cap = -dual_clip * A
                    dual_hit = (A < 0) & (c > cap)
                    c = torch.where(A < 0, torch.minimum(c, cap), c)
                    metrics["dual_clip_frac"] = mmean(dual_hit.to(cdt))
                r_sg = ratio.detach()
                low_hit = (r_sg < lo) & (A < 0) if lo is not None else torch.zeros_like(valid)
                high_hit = (r_sg > hi) & (A > 0) if hi is not None else torch.zeros_like(valid)
            else:
                c = -clipped.detach() * A * l
                r_sg = ratio.detach()
                low_hit = r_sg < lo if lo is not None else torch.zeros_like(valid)
                high_hit = r_sg > hi if hi is not None else torch.zeros_like(valid)
            metrics["ratio_mean"] = mmean(r_sg)
            metrics["ratio_min"] = mmin(r_sg)
            metrics["ratio_max"] = mmax(r_sg)
            metrics["clip_frac_low"] = mmean(low_hit.to(cdt))
            metrics["clip_frac_high"] = mmean(high_hit.to(cdt))
        if tw is not None:
            c = c * tw
        if w_is is not None:
            c = c * w_is
        loss_reg = None
    else:
        c = None
        anchor = {"ref_logp": ref, "sampler_logp": smp, "old_logp": old}[preset.anchor]
        lam = layout.seq_sum(torch.where(valid, l - anchor, 0.0))               # [B] Lam_i
        r = torch.where(nonempty, rewards, 0.0)
        if loss_type == "rebel":
            pair_ok = n_seq.view(-1, 2).sum(-1) > 0                              # [B/2]
            # a pair's rewards count even where one member has no loss token (its Lam is then 0)
            lam2, r2 = lam.view(-1, 2), torch.where(pair_ok[:, None], rewards.view(-1, 2), 0.0)  # [B/2, 2]
            per = ((lam2[:, 0] - lam2[:, 1]) - eta * (r2[:, 0] - r2[:, 1])) ** 2
            pair_denom = pair_ok.sum() if norms is None else norms.num_pairs
            loss_reg = torch.where(pair_ok, per, 0.0).sum() / pair_denom.clamp(min=1)
            target = r
        else:
            if baseline is None:
                groups = rewards.view(-1, group_size)                            # [B/G, G]
                b = groups.mean(-1) if loss_type == "kimi" else vstar(groups, beta1)
                baseline = b.repeat_interleave(group_size)                       # [B]
            target = torch.where(nonempty, r - baseline, 0.0)
            per = (beta2 * lam - target) ** 2
            loss_reg = torch.where(nonempty, per, 0.0).sum() / seq_denom.clamp(min=1)
        metrics["seq_log_ratio_mean"] = (torch.where(nonempty, lam, 0.0).sum()
                                         / nonempty.sum().clamp(min=1)).detach()
        metrics["target_mean"] = (target.sum() / nonempty.sum().clamp(min=1)).detach()

    if beta != 0:
        kl = torch.where(valid, _kl(l - ref, kl_estimator, kl_clamp), 0.0)
        metrics["kl_ref_mean"] = mmean(kl.detach())
        c = beta * kl if c is None else c + beta * kl

    # ---- aggregate ----------------------------------------------------------------------------------------------
    loss = zero if c is None else aggregate(torch.where(valid, c, 0.0))
    if loss_reg is not None:
        loss = loss + loss_reg
    if entropy_coef != 0:
        loss = loss - entropy_coef * aggregate(torch.where(valid, H, 0.0))

    # ---- metrics ------------------------------------------------------------------------------------------------
    if old is not None:
        d_old = l_sg - old
        if log_ratio_clamp is not None:
            d_old = d_old.clamp(-log_ratio_clamp, log_ratio_clamp)
        metrics["approx_kl_old"] = mmean(torch.exp(-d_old) - 1.0 + d_old)
    if w_is is not None:
        n_loss = loss_tokens.sum().clamp(min=1)                   # rejected tokens count as weight 0
        metrics["is_weight_mean"] = torch.where(loss_tokens, w_is, 0.0).sum() / n_loss
        key = "is_frac_truncated" if is_mode.endswith("truncate") else "is_frac_masked"
        metrics[key] = (hit & loss_tokens).sum().to(cdt) / n_loss
    if H is not None:
        metrics["entropy_mean"] = mmean(H.detach())
    metrics["num_tokens"] = n_tok.detach()
    metrics["num_seqs"] = nonempty.sum().to(cdt)
    metrics["loss"] = loss.detach()
    return PolicyLossOutput(loss, {k: v.detach() for k, v in metrics.items()})
