"""RL policy losses on per-token log-probs, as a registry of loss functions and one shared driver.

The math is in ``docs/losses.md`` (the project's own statement of every loss, option and convention).

**The registry.** ``LOSSES`` maps each ``loss_type`` to a :class:`LossSpec`: its family, its unit (token, sequence
or pair), the options it takes and their defaults, the inputs it needs, its batch-wide constants (group baselines),
and ``terms``: the function that turns a prepared :class:`Batch` into per-token or per-unit loss terms and metrics.
The built-in entries live in ``rlcore/loss_terms.py`` (registered when ``rlcore`` is imported); :func:`register_loss`
adds a user's own.

**The driver.** :func:`policy_loss` runs every loss in the same steps:

1. *Resolve*: look up the spec, merge the options given with its defaults, validate each (one table of option
   checks, :data:`OPTIONS`), and reject an option the loss does not take.
2. *Prepare* (:func:`prepare`): check the tensors, pick the layout (padded ``[B, T]`` + mask, or packed ``[N]`` +
   ``cu_seqlens``) and make every masked-out position inert (masked positions may hold anything, NaN included: they
   are replaced before any arithmetic); the mismatch weights and ``reject``; the counts and the batch-wide
   denominators; the spec's batch constants.
3. *Evaluate* (:func:`evaluate`): the spec's ``terms``; then, shared by every loss, the policy-term masks
   (``top_entropy_quantile``, ``off_policy_mask``), the token and mismatch weights, ``beta * KL``, the aggregation,
   the entropy bonus and the common metrics (detached 0-d tensors; nothing here calls ``.item()``).

The fused single pass (``rlcore.fused_policy_loss``) prepares the whole batch once, then evaluates slices of whole
sequences of the prepared batch (:meth:`Batch.slice`): the denominators and batch constants are the whole batch's,
so the batch loss is the sum of the slices' losses.

Every step is differentiable PyTorch, so the loss composes with any source of ``logp``: a model's own logits, or
``rlcore.linear_logprobs`` (which is what ``rlcore.fused_policy_loss`` does, without logits).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from .divergence import KINDS as DIVERGENCE_KINDS   # kd's kinds: linear_divergence's

__all__ = [
    "policy_loss", "vstar", "PolicyLossOutput", "LossSpec", "Terms", "Batch", "Option", "LOSSES", "OPTIONS",
    "register_loss", "prepare", "evaluate", "AGGS", "IS_MODES", "KL_ESTIMATORS", "KL_EXACT", "RATIO_LEVELS",
    "OPD_BASELINES", "DIVERGENCE_KINDS", "DEFAULT",
]


class _Default:
    """The "use this loss type's default" marker, distinct from ``None`` (which means "off" for ``eps_low``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()

AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
        "constant")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_BASE_KL = ("k1", "k2", "k3", "abs")
KL_ESTIMATORS = _BASE_KL + tuple(k + "+" for k in _BASE_KL)
# not an estimator: the per-token KL(pi || pi_ref) over the whole vocabulary, given as ref_kl (rlcore.linear_divergence)
KL_EXACT = "exact"
OPD_BASELINES = ("none", "full", "topk")
RATIO_LEVELS = ("token", "sequence")
UNITS = ("token", "seq", "pair")
FAMILIES = ("clipped", "regression", "distill")
INPUTS = ("advantages", "old_logp", "ref_logp", "sampler_logp", "entropy", "rewards", "baseline", "teacher_logp",
          "teacher_kl", "divergence", "ref_kl")


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
# Value checks (one per kind of option)
# ----------------------------------------------------------------------------------------------------------------------


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _real(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    # a float traced by torch.compile(dynamic=True) is a SymFloat: kept symbolic (float() would specialise the graph
    # on its value) and checked with comparisons (NaN fails them), which math.isfinite cannot take
    value = x if isinstance(x, torch.SymFloat) else float(x)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    return value


def _real_where(ok, what: str):
    """A check: a finite real number for which ``ok(value)`` holds, else ``ValueError`` "<name> must be <what>"."""
    def check(name: str, x) -> float:
        value = _real(name, x)
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {x!r}")
        return value
    return check


_positive = _real_where(lambda v: v > 0, "> 0")
_nonneg = _real_where(lambda v: v >= 0, ">= 0")
_above_one = _real_where(lambda v: v > 1, "> 1")
_fraction = _real_where(lambda v: 0 < v <= 1, "in (0, 1]")


def _or_none(check):
    def run(name, x):
        return None if x is None else check(name, x)
    return run


def _choice(name: str, x, options) -> str:
    if not isinstance(x, str) or x not in options:
        raise ValueError(f"unknown {name} {x!r}; expected one of {', '.join(map(repr, options))}")
    return x


def _chooser(options):
    return lambda name, x: _choice(name, x, options)


def _flag(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False, got {x!r}")
    return x


def _count(name: str, x):
    """A token or sequence count: a positive real number or a 0-d tensor (checked for shape only: no sync)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got shape {tuple(x.shape)}")
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {_describe(x)}")
    return _positive(name, x)


def _group_size(name: str, x):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


def _top_k(name: str, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name} must be a positive int or None, got {x!r}")
    return int(x)


_open_fraction = _real_where(lambda v: 0 < v < 1, "in (0, 1) (at 0 or 1 the JSD is identically 0)")


def _generator(name: str, x):
    if not isinstance(x, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {_describe(x)}")
    return x


@dataclass(frozen=True)
class Option:
    """One keyword option of ``policy_loss``: its default (a spec may override it), its check, what it means."""

    default: Any
    check: Callable[[str, Any], Any]
    doc: str


OPTIONS: Mapping[str, Option] = MappingProxyType({
    # taken by every loss
    "agg": Option("token-mean", _chooser(AGGS), "how the per-token terms are reduced (docs/losses.md section 2)"),
    "agg_constant": Option(None, _or_none(_positive), "the L of agg='constant' (S / (B L)) and the divisor of "
                                                      "'seq-mean-token-sum-norm'"),
    "num_tokens": Option(None, _or_none(_count), "global loss-token count for agg='token-mean' (data parallel)"),
    "num_seqs": Option(None, _or_none(_count), "global count of sequences for the sequence means (data parallel)"),
    "beta": Option(0.0, _real, "weight of the per-token KL to the reference (ref_logp; ref_kl if kl_estimator="
                               "'exact')"),
    "kl_estimator": Option("k3", _chooser(KL_ESTIMATORS + (KL_EXACT,)),
                           "k1, k2, k3, abs; '<name>+': its value, k2's gradient; 'exact': ref_kl, the full "
                           "vocabulary's KL(pi || pi_ref) (rlcore.linear_divergence) with its analytic gradient"),
    "kl_clamp": Option(False, _flag, "clamp -D to [-20, 20] inside k3's exp and the KL value to [-10, 10]"),
    "entropy_coef": Option(0.0, _real, "loss -= entropy_coef * agg(entropy)"),
    "log_ratio_clamp": Option(20.0, _or_none(_positive), "|l - l_old| (or its sequence mean) clamped before exp"),
    # the clipped family (every ratio-based loss)
    "eps_low": Option(0.2, _or_none(_nonneg), "lower clip 1 - eps_low (None: no lower bound)"),
    "eps_high": Option(0.2, _or_none(_nonneg), "upper clip 1 + eps_high (None: no upper bound)"),
    "ratio_level": Option("token", _chooser(RATIO_LEVELS), "importance ratio per token or per sequence (GSPO's)"),
    "dual_clip": Option(None, _or_none(_above_one), "cap the PPO term at -c A where A < 0"),
    "is_mode": Option(None, _or_none(_chooser(IS_MODES)), "training-inference mismatch correction from "
                                                           "sampler_logp"),
    "is_cap": Option(2.0, _positive, "mismatch weight cap C"),
    "is_min": Option(None, _or_none(_positive), "mask modes: lower bound C_min (default 1 / is_cap)"),
    "reject": Option(False, _flag, "mask modes: drop the zero-weight tokens from the mask"),
    "top_entropy_quantile": Option(None, _or_none(_fraction), "keep the policy term of the top-q loss tokens by "
                                                              "entropy only"),
    "off_policy_mask": Option(None, _or_none(_real), "drop A < 0 sequences whose mean l_smp - l exceeds delta"),
    "kl_is_weighted": Option(False, _flag, "multiply the KL term by the importance ratio (unbiased KL)"),
    # loss-specific
    "sapo_tau_pos": Option(1.0, _positive, "SAPO gate temperature where A > 0"),
    "sapo_tau_neg": Option(1.05, _positive, "SAPO gate temperature where A <= 0"),
    "vespo_k_pos": Option(2.0, _nonneg, "VESPO shape k where A >= 0"),
    "vespo_lambda_pos": Option(3.0, _nonneg, "VESPO rate lambda where A >= 0"),
    "vespo_k_neg": Option(3.0, _nonneg, "VESPO shape k where A < 0"),
    "vespo_lambda_neg": Option(2.0, _nonneg, "VESPO rate lambda where A < 0"),
    "dro_beta": Option(None, _or_none(_positive), "DRO's quadratic log-ratio penalty (required)"),
    "dppo_ratio_cap": Option(20.0, _positive, "DPPO's truncation of the detached ratio"),
    "cov_ratio": Option(2e-4, _fraction, "clip_cov / kl_cov: fraction of loss tokens selected"),
    "clip_cov_lb": Option(1.0, _real, "clip_cov: lower bound of the covariance window"),
    "clip_cov_ub": Option(5.0, _real, "clip_cov: upper bound of the covariance window"),
    "kl_cov_coef": Option(1.0, _nonneg, "kl_cov: weight of |l - l_old| on the selected tokens"),
    "generator": Option(None, _or_none(_generator), "clip_cov: the random generator of its choice"),
    "beta2": Option(1e-3, _or_none(_real), "regression: the scale of Lam_i"),
    "beta1": Option(0.5, _positive, "oapl: V*'s temperature"),
    "group_size": Option(None, _or_none(_group_size), "oapl, kimi: samples per prompt (for the group baseline)"),
    "eta": Option(1.0, _real, "rebel: the reward scale"),
    # the distillation family
    "opd_baseline": Option("none", _chooser(OPD_BASELINES), "opd: the vOPD control variate b_t = -teacher_kl "
                                                            "('full' / 'topk': over the vocabulary / its top_k)"),
    "kd_kind": Option("reverse_kl", _chooser(DIVERGENCE_KINDS), "kd: the divergence fused_policy_loss computes"),
    "jsd_beta": Option(0.5, _open_fraction, "kd with kd_kind='jsd': the mixture weight beta"),
    "top_k": Option(None, _or_none(_top_k), "kd, opd_baseline='topk': fused_policy_loss's support, the "
                                            "teacher's top_k ids (None: kd over the full vocabulary)"),
})

_COMMON = ("agg", "agg_constant", "num_tokens", "num_seqs", "beta", "kl_estimator", "kl_clamp", "entropy_coef",
           "log_ratio_clamp")
# every loss of the clipped family takes these (mismatch correction, the policy-term masks, the unbiased KL)
_MISMATCH = ("is_mode", "is_cap", "is_min", "reject")
_CLIPPED = _MISMATCH + ("top_entropy_quantile", "off_policy_mask", "kl_is_weighted")
_FAMILY_OPTIONS = {"clipped": _CLIPPED, "regression": (), "distill": _MISMATCH}


class Opts(dict):
    """The resolved options of one call, read as attributes (``o.eps_low``)."""

    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terms:
    """What a loss function returns.

    ``token``: the per-token terms ``c_t`` (token-shaped, any value at masked positions), aggregated with ``agg``;
    or ``unit``: per-sequence (``[B]``) or per-pair (``[B / 2]``) losses, averaged over the units with a loss token
    (``unit_valid``). ``ratio``: the importance ratio (token-shaped, with its gradient) for ``kl_is_weighted``.
    ``weighted``: the terms already carry the mismatch weight (no multiplication by it afterwards).
    """

    token: Optional[torch.Tensor] = None
    unit: Optional[torch.Tensor] = None
    unit_valid: Optional[torch.Tensor] = None
    ratio: Optional[torch.Tensor] = None
    weighted: bool = False
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """One registry entry.

    ``terms(batch, opts) -> Terms`` computes the loss. ``family``: ``"clipped"`` (ratio-based, per token: takes the
    mismatch-correction and policy-mask options and needs ``advantages``), ``"regression"`` or ``"distill"`` (per
    token, against a teacher: takes the mismatch-correction options, no advantages). ``unit``: ``"token"``,
    ``"seq"`` or ``"pair"`` (the units a single-pass slice may not split). ``defaults``: the options this loss takes
    beyond the shared ones, with their defaults, and overrides of shared defaults (``agg``). ``needs``: inputs always
    required (:data:`INPUTS`); ``requires(opts) -> tuple`` adds ones that depend on the options. ``batch_constants(
    batch, opts) -> dict`` of batch-wide tensors computed once on the whole batch (the group baselines), stored in
    ``batch.consts``. ``whole_batch(opts) -> bool``: the terms read batch-wide functions of the current log-probs
    (a covariance, a quantile), so no single pass can split the batch. ``seq_advantages``: advantages must be
    ``[B]``. ``required``: options that may not be ``None``. ``anchor``: regression, which log-probs ``Lam_i`` is measured against. ``peer``: the peer setting it
    equals. ``reads_logp=False``: the terms never read ``b.l`` (``kd``), so ``fused_policy_loss`` may skip the
    targets' log-probs.
    """

    name: str
    terms: Callable[["Batch", Opts], Terms]
    family: str = "clipped"
    unit: str = "token"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs: Tuple[str, ...] = ()
    requires: Optional[Callable[[Opts], Tuple[str, ...]]] = None
    batch_constants: Optional[Callable[["Batch", Opts], Dict[str, torch.Tensor]]] = None
    whole_batch: Optional[Callable[[Opts], bool]] = None
    required: Tuple[str, ...] = ()
    seq_advantages: bool = False
    anchor: Optional[str] = None
    peer: str = ""
    doc: str = ""
    reads_logp: bool = True

    @property
    def options(self) -> Tuple[str, ...]:
        """Every option name this loss takes."""
        extra = _FAMILY_OPTIONS[self.family]
        return tuple(dict.fromkeys(_COMMON + extra + tuple(self.defaults)))

    def default(self, name: str):
        """This loss's default for option ``name``."""
        return self.defaults[name] if name in self.defaults else OPTIONS[name].default

    def inputs(self, opts: Opts) -> Tuple[str, ...]:
        """The inputs this loss needs with these options."""
        extra = self.requires(opts) if self.requires is not None else ()
        if self.family == "clipped":
            extra = extra + ("advantages",)
        return tuple(dict.fromkeys(self.needs + extra))


_REGISTRY: Dict[str, LossSpec] = {}
LOSSES: Mapping[str, LossSpec] = MappingProxyType(_REGISTRY)   # read-only view; register_loss adds entries


def register_loss(spec: LossSpec, *, replace_existing: bool = False) -> LossSpec:
    """Add ``spec`` to :data:`LOSSES` under ``spec.name`` (see ``docs/losses.md``, "Adding a loss")."""
    if not isinstance(spec, LossSpec):
        raise TypeError(f"register_loss takes a LossSpec, got {_describe(spec)}")
    if spec.name in _REGISTRY and not replace_existing:
        raise ValueError(f"loss_type {spec.name!r} is already registered (pass replace_existing=True to replace it)")
    _choice("family", spec.family, FAMILIES)
    _choice("unit", spec.unit, UNITS)
    unknown = [k for k in spec.defaults if k not in OPTIONS]
    if unknown:
        raise ValueError(f"LossSpec {spec.name!r}: unknown option(s) {unknown}; options are declared in "
                         f"rlcore.losses.OPTIONS")
    bad = [k for k in spec.needs if k not in INPUTS]
    if bad:
        raise ValueError(f"LossSpec {spec.name!r}: unknown input(s) {bad}; expected names from {INPUTS}")
    _REGISTRY[spec.name] = spec
    return spec


# Peers' names that are not rlcore loss types, and the rlcore call that computes the same loss (named in the error).
PEER_LOSS_NAMES: Mapping[str, str] = MappingProxyType({
    "grpo": "TRL's loss_type='grpo' is loss_type='ppo' with agg='seq-mean-token-mean'",
    "bnpo": "TRL's loss_type='bnpo' is loss_type='ppo' (its default agg='token-mean')",
    "vanilla": "verl's loss_mode='vanilla' is loss_type='ppo'",
    "gpg": "verl's loss_mode='gpg' is loss_type='reinforce'",
    "geo_mean": "verl's loss_mode='geo_mean' is loss_type='gmpo'",
})


def resolve(loss_type: str, given: Mapping[str, Any]) -> Tuple[LossSpec, Opts]:
    """The spec of ``loss_type`` and its options: its defaults, then ``given`` (``DEFAULT`` values are not given),
    each checked. An option the loss does not take is an error, naming the losses that do take it."""
    spec = _REGISTRY.get(loss_type) if isinstance(loss_type, str) else None
    if spec is None:
        peer = PEER_LOSS_NAMES.get(loss_type) if isinstance(loss_type, str) else None
        hint = f": {peer}" if peer else ""
        raise ValueError(f"unknown loss_type {loss_type!r}{hint}; expected one of {', '.join(map(repr, _REGISTRY))}")
    takes = spec.options
    for name, value in given.items():
        if value is DEFAULT:
            continue
        if name not in OPTIONS:
            raise TypeError(f"policy_loss got an unexpected keyword {name!r}")
        if name not in takes:
            users = [k for k, s in _REGISTRY.items() if name in s.options]
            raise ValueError(f"loss_type={loss_type!r} does not take {name!r} (an option of "
                             f"{', '.join(map(repr, users))}); its options are {', '.join(takes)}")
    opts = Opts()
    for name in takes:
        value = given.get(name, DEFAULT)
        value = spec.default(name) if value is DEFAULT else value
        opts[name] = OPTIONS[name].check(name, value)
    _check_combinations(spec, opts)
    return spec, opts


def _check_combinations(spec: LossSpec, o: Opts) -> None:
    for name in spec.required:
        if o[name] is None:
            raise ValueError(f"loss_type={spec.name!r} needs {name} (got None)")
    if spec.unit != "token":
        for name in ("top_entropy_quantile", "off_policy_mask"):
            if o.get(name) is not None:
                raise ValueError(f"{name} masks per-token policy terms; loss_type={spec.name!r} has a "
                                 f"per-{spec.unit} loss")
    if "agg" in o and o.agg in ("constant", "seq-mean-token-sum-norm") and o.agg_constant is None:
        raise ValueError(f"agg={o.agg!r} needs agg_constant (the L of S / (B * L), e.g. the max completion length)")
    if o.get("opd_baseline") not in (None, "topk") and o.top_k is not None:
        raise ValueError(f"top_k is the support of opd_baseline='topk'; got opd_baseline={o.opd_baseline!r}")
    if "is_mode" in o:
        if o.is_mode is not None:
            is_min = 1.0 / o.is_cap if o.is_min is None else o.is_min
            if is_min > o.is_cap:
                raise ValueError(f"is_min must be <= is_cap, got is_min={o.is_min} and is_cap={o.is_cap}")
            o["is_min"] = is_min
        if o.reject and (o.is_mode is None or not o.is_mode.endswith("mask")):
            raise ValueError("reject=True applies to is_mode='token_mask' or 'sequence_mask'")


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

    def slice(self, s0: int, s1: int, t0: int, t1: int) -> "_Layout":
        """Sequences ``[s0, s1)`` (tokens ``[t0, t1)`` when packed)."""
        out = object.__new__(_Layout)
        out.packed, out.B = self.packed, s1 - s0
        if self.packed:
            out.token_shape = (t1 - t0,)
            out.cu_seqlens = self.cu_seqlens[s0:s1 + 1] - self.cu_seqlens[s0]
            out._segments = self._segments
        else:
            out.token_shape = (s1 - s0,) + self.token_shape[1:]
            out.cu_seqlens = None
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Tensor checks
# ----------------------------------------------------------------------------------------------------------------------


def _on_logp_device_float(name, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` itself, after checking it is on ``logp``'s device and floating point."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {ref.device}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def _why(name: str, spec: LossSpec, o: Opts) -> str:
    if name == "ref_logp" and o.beta != 0:
        return " for the KL term (beta != 0)"
    if name == "sampler_logp" and o.get("is_mode") is not None:
        return " for mismatch correction (is_mode)"
    if name == "entropy" and o.entropy_coef != 0:
        return " when entropy_coef != 0"
    if name == "entropy" and o.get("top_entropy_quantile") is not None:
        return " for top_entropy_quantile"
    if name == "old_logp":
        return f" for loss_type={spec.name!r} (pass logp.detach() on the first pass over fresh data)"
    if name == "ref_kl":
        return (" for kl_estimator='exact' with beta != 0 (the per-token KL(pi || pi_ref) from "
                "rlcore.linear_divergence(hidden, weight, ref_hidden, ref_weight))")
    if name == "teacher_kl":
        return (f" for loss_type={spec.name!r} with opd_baseline={o.get('opd_baseline')!r} (the per-token "
                f"KL(p_S || p_T) from rlcore.linear_divergence, the vOPD baseline b_t = -teacher_kl)")
    if name == "teacher_logp":
        return f" for loss_type={spec.name!r} (the teacher's log-prob of each sampled token)"
    if name == "divergence":
        return (f" for loss_type={spec.name!r} (the per-token divergence with its gradient, from "
                f"rlcore.linear_divergence or rlcore.divergence.support_divergence)")
    return f" for loss_type={spec.name!r}"


def _token_tensor(name, x, ref: torch.Tensor, required: bool, why: str = ""):
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


def _seq_tensor(name, x, layout: _Layout, ref: torch.Tensor, required: bool, why: str = ""):
    """A per-sequence input ``[B]``."""
    if x is None:
        if required:
            raise ValueError(f"{name} [B] is required{why}")
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B] = [{layout.B}], got {_describe(x)}")
    if tuple(x.shape) != (layout.B,):
        raise ValueError(f"{name} must be [B] = [{layout.B}] (one value per sequence), got shape {tuple(x.shape)}")
    return _on_logp_device_float(name, x, ref)


def _mask(mask, layout: _Layout, logp: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(layout.token_shape, dtype=torch.bool, device=logp.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool or 0/1 tensor shaped like logp, got {_describe(mask)}")
    if tuple(mask.shape) != layout.token_shape:
        raise ValueError(f"mask must have logp's shape {layout.token_shape}, got {tuple(mask.shape)}")
    if mask.device != logp.device:
        raise ValueError(f"mask is on {mask.device} but logp is on {logp.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def _advantages(advantages, layout: _Layout, logp: torch.Tensor, spec: LossSpec, required: bool):
    """``(advantages, per_seq)``: the checked tensor and whether it is read per sequence."""
    if advantages is None:
        if required:
            raise ValueError(f"advantages are required for loss_type={spec.name!r}")
        return None, False
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating-point tensor [B] or shaped like logp, "
                        f"got {_describe(advantages)}")
    if tuple(advantages.shape) not in ((layout.B,), layout.token_shape):
        raise ValueError(f"advantages must be [B] = [{layout.B}] (per sequence) or logp's shape "
                         f"{layout.token_shape} (per token), got {tuple(advantages.shape)}")
    if advantages.device != logp.device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
    # [B] is read per sequence; in the packed layout with N == B, per token (except by a loss that needs [B])
    per_seq = tuple(advantages.shape) == (layout.B,) and (layout.token_shape != (layout.B,) or spec.seq_advantages)
    if spec.seq_advantages and not per_seq:
        raise ValueError(f"loss_type={spec.name!r} needs per-sequence advantages [B]; use loss_type='gspo_token' "
                         f"for token-level advantages")
    return advantages, per_seq


# ----------------------------------------------------------------------------------------------------------------------
# The prepared batch
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Norms:
    """The batch-wide denominators (0-d tensors, except ``batch``)."""

    num_tokens: torch.Tensor     # loss tokens (token-mean)
    num_seqs: torch.Tensor       # sequences with a loss token (sequence means, per-sequence losses)
    num_pairs: torch.Tensor      # pairs with a loss token (pair losses)
    batch: torch.Tensor          # B, or num_seqs when given (seq-mean-token-sum, constant)


# Per-token and per-sequence fields of a Batch, for slicing.
_TOKEN_FIELDS = ("valid", "l", "l_sg", "old", "ref", "smp", "H", "tw", "A", "w_is", "is_hit", "is_tokens", "teacher",
                 "teacher_kl", "div", "ref_kl")
_SEQ_FIELDS = ("n_seq", "nonempty", "rewards", "baseline", "A_seq")


@dataclass(frozen=True)
class Batch:
    """The inputs of one loss evaluation, prepared once: every token-shaped tensor is inert (0, or ``l`` for the
    log-prob inputs) at masked positions, so a loss function may compute on it freely and mask only at the end.

    ``l``: the log-probs (the only tensor with a gradient; float64 for float64 input, else float32); ``l_sg`` its
    detached copy; ``old`` / ``ref`` / ``smp``: the old, reference and sampler log-probs (or ``None``); ``H`` the
    entropy (with its gradient); ``tw`` token weights; ``A`` the advantages, token-shaped, and ``A_seq`` the
    per-sequence ones ``[B]`` when given so; ``valid`` the loss tokens (after ``reject``), ``m`` as float; ``n_seq``
    ``[B]`` loss tokens per sequence, ``nonempty`` ``[B]``, ``n_tok``; ``w_is``/``is_hit``/``is_tokens``: the
    mismatch weights, where they bind, the loss tokens before ``reject``; ``norms``: the batch-wide denominators;
    ``consts``: the spec's batch constants. Distillation and the exact KL: ``teacher`` the teacher's log-probs of
    the tokens and ``teacher_kl`` the per-token ``KL(p_S || p_T)`` (both detached), ``div`` the per-token divergence
    and ``ref_kl`` the per-token ``KL(pi || pi_ref)`` (both with their gradients); 0 at masked positions.
    """

    layout: _Layout
    cdt: torch.dtype
    valid: torch.Tensor
    l: torch.Tensor
    l_sg: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    smp: Optional[torch.Tensor]
    H: Optional[torch.Tensor]
    tw: Optional[torch.Tensor]
    A: Optional[torch.Tensor]
    A_seq: Optional[torch.Tensor]
    rewards: Optional[torch.Tensor]
    baseline: Optional[torch.Tensor]
    w_is: Optional[torch.Tensor]
    is_hit: Optional[torch.Tensor]
    is_tokens: Optional[torch.Tensor]
    n_seq: torch.Tensor
    nonempty: torch.Tensor
    norms: Norms
    consts: Dict[str, torch.Tensor]
    teacher: Optional[torch.Tensor] = None
    teacher_kl: Optional[torch.Tensor] = None
    div: Optional[torch.Tensor] = None
    ref_kl: Optional[torch.Tensor] = None

    # ---- reductions ---------------------------------------------------------------------------------------------
    @property
    def m(self) -> torch.Tensor:
        return self.valid.to(self.cdt)

    @property
    def n_tok(self) -> torch.Tensor:
        return self.valid.sum().to(self.cdt)

    @property
    def B(self) -> int:
        return self.layout.B

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """token-shaped -> ``[B]``, over the loss tokens only."""
        return self.layout.seq_sum(torch.where(self.valid, x, 0.0))

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """token-shaped -> ``[B]``: the mean over each sequence's loss tokens (0 for none)."""
        return self.seq_sum(x) / self.n_seq.clamp(min=1)

    def bcast(self, s: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> token-shaped."""
        return self.layout.bcast(s)

    def mmean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``x`` over this batch's loss tokens, detached (a metric)."""
        x = x.detach().to(self.cdt)
        return torch.where(self.valid, x, 0.0).sum() / self.n_tok.clamp(min=1)

    def mmin(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return self.zero()
        return torch.where(self.n_tok > 0, torch.where(self.valid, x.detach(), math.inf).amin(), 0.0).to(self.cdt)

    def mmax(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return self.zero()
        return torch.where(self.n_tok > 0, torch.where(self.valid, x.detach(), -math.inf).amax(), 0.0).to(self.cdt)

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.cdt, device=self.l.device)

    def aggregate(self, x: torch.Tensor, agg: str, o: Opts) -> torch.Tensor:
        """``agg`` of a token-shaped ``x`` (masked positions are ignored)."""
        x = torch.where(self.valid, x, 0.0)
        nm = self.norms
        if agg == "token-mean":
            return x.sum() / nm.num_tokens.clamp(min=1)
        if agg == "token-sum":
            return x.sum()
        if agg == "seq-mean-token-mean":
            return (self.layout.seq_sum(x) / self.n_seq.clamp(min=1)).sum() / nm.num_seqs.clamp(min=1)
        if agg == "seq-mean-token-sum":
            return x.sum() / nm.batch.clamp(min=1)
        if agg == "seq-mean-token-sum-norm":
            return x.sum() / nm.batch.clamp(min=1) / o.agg_constant
        return x.sum() / (nm.batch.clamp(min=1) * o.agg_constant)

    # ---- slicing (the fused single pass) ------------------------------------------------------------------------
    def slice(self, s0: int, s1: int, t0: int, t1: int) -> "Batch":
        """Sequences ``[s0, s1)`` (tokens ``[t0, t1)`` when packed), with the whole batch's norms and constants."""
        packed = self.layout.packed

        def tok(x):
            return None if x is None else (x[t0:t1] if packed else x[s0:s1])

        def seq(x):
            return None if x is None else x[s0:s1]

        changes = {k: tok(getattr(self, k)) for k in _TOKEN_FIELDS}
        changes.update({k: seq(getattr(self, k)) for k in _SEQ_FIELDS})
        consts = {k: seq(v) if v.dim() == 1 and v.shape[0] == self.B else v for k, v in self.consts.items()}
        return replace(self, layout=self.layout.slice(s0, s1, t0, t1), consts=consts, **changes)

    def with_logp(self, logp: torch.Tensor, entropy: Optional[torch.Tensor], opts: Opts) -> "Batch":
        """The same batch with new log-probs (and entropy), made inert at masked positions like the originals.
        Mismatch weights measured against ``sg(l)`` (no ``old_logp``) are measured again (``reject`` aside)."""
        l = torch.where(self.valid, logp.to(self.cdt), 0.0)
        H = self.H if entropy is None else torch.where(self.valid, entropy.to(self.cdt), 0.0)
        changes = dict(l=l, l_sg=l.detach(), H=H)
        if self.w_is is not None and self.old is None:
            w, hit = _is_weights(l.detach() - self.smp, self.valid, self.layout, opts)
            changes.update(w_is=torch.where(self.valid, w, 0.0), is_hit=hit)
        return replace(self, **changes)


def needed_inputs(spec: LossSpec, opts: Opts) -> set:
    """The tensor inputs ``spec`` reads with ``opts``: its own (``LossSpec.inputs``) and the shared options' (the
    KL's ``ref_logp``, or ``ref_kl`` for ``kl_estimator="exact"``; ``is_mode``'s ``sampler_logp``; the entropy)."""
    need = set(spec.inputs(opts))
    if opts.beta != 0:
        need.add("ref_kl" if opts.kl_estimator == KL_EXACT else "ref_logp")
    if opts.get("is_mode") is not None:
        need.add("sampler_logp")
    if opts.entropy_coef != 0 or opts.get("top_entropy_quantile") is not None:
        need.add("entropy")
    return need


def prepare(logp, advantages, mask, *, spec: LossSpec, opts: Opts, cu_seqlens=None, old_logp=None, ref_logp=None,
            sampler_logp=None, entropy=None, token_weights=None, rewards=None, baseline=None, teacher_logp=None,
            teacher_kl=None, divergence=None, ref_kl=None, check_inputs: bool = True) -> Batch:
    """Check the tensors and build the :class:`Batch` for ``spec`` with ``opts`` (see :func:`policy_loss` for the
    shapes). Computes the mismatch weights, ``reject``, the counts, the denominators and the batch constants."""
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point tensor, got {_describe(logp)}")
    layout = _Layout(logp, cu_seqlens, check_inputs)
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    need = needed_inputs(spec, opts)

    def token(name, x):
        return _token_tensor(name, x, logp, name in need, _why(name, spec, opts))

    old_logp, ref_logp = token("old_logp", old_logp), token("ref_logp", ref_logp)
    sampler_logp, entropy = token("sampler_logp", sampler_logp), token("entropy", entropy)
    teacher_logp, teacher_kl = token("teacher_logp", teacher_logp), token("teacher_kl", teacher_kl)
    divergence, ref_kl = token("divergence", divergence), token("ref_kl", ref_kl)
    token_weights = _token_tensor("token_weights", token_weights, logp, False)
    valid = _mask(mask, layout, logp)
    rewards = _seq_tensor("rewards", rewards, layout, logp, "rewards" in need, _why("rewards", spec, opts))
    baseline = _seq_tensor("baseline", baseline, layout, logp, "baseline" in need,
                           " (V* per sequence, from rlcore.vstar over pi_ref's samples) for loss_type='apo'"
                           if spec.name == "apo" else _why("baseline", spec, opts))
    advantages, per_seq = _advantages(advantages, layout, logp, spec, "advantages" in need)

    # ---- make masked positions inert ----------------------------------------------------------------------------
    l = torch.where(valid, logp.to(cdt), 0.0)                     # the only tensor that carries gradient
    l_sg = l.detach()

    def const(x, fill):
        return None if x is None else torch.where(valid, x.detach().to(cdt), fill)

    def live(x):                                                  # a per-token input with its gradient
        return None if x is None else torch.where(valid, x.to(cdt), 0.0)

    old = const(old_logp, l_sg)
    smp = const(sampler_logp, old if old is not None else l_sg)
    A_seq = advantages.detach().to(cdt) if per_seq else None
    A = None
    if advantages is not None:
        A = torch.where(valid, layout.bcast(A_seq) if per_seq else advantages.detach().to(cdt), 0.0)

    # ---- mismatch weights and reject ----------------------------------------------------------------------------
    w_is = is_hit = is_tokens = None
    if opts.get("is_mode") is not None:
        delta = (old if old is not None else l_sg) - smp
        w_is, is_hit = _is_weights(delta, valid, layout, opts)
        is_tokens = valid                                          # before reject, for the masked fraction
        if opts.reject:
            valid = valid & ~is_hit
        w_is = torch.where(valid, w_is, 0.0)
        l = torch.where(valid, l, 0.0)
        l_sg = l.detach()

    n_seq = layout.seq_sum(valid.to(cdt))                          # [B] |y_i|
    nonempty = n_seq > 0
    batch = Batch(
        layout=layout, cdt=cdt, valid=valid, l=l, l_sg=l_sg, old=old, ref=const(ref_logp, l_sg), smp=smp,
        H=None if entropy is None else torch.where(valid, entropy.to(cdt), 0.0), tw=const(token_weights, 1.0),
        A=A, A_seq=A_seq, rewards=None if rewards is None else rewards.detach().to(cdt),
        baseline=None if baseline is None else baseline.detach().to(cdt), w_is=w_is, is_hit=is_hit,
        is_tokens=is_tokens, n_seq=n_seq, nonempty=nonempty,
        norms=_norms(valid, n_seq, nonempty, layout, cdt, opts, spec), consts={}, teacher=const(teacher_logp, 0.0),
        teacher_kl=const(teacher_kl, 0.0), div=live(divergence), ref_kl=live(ref_kl))
    if spec.batch_constants is not None:
        batch = replace(batch, consts=dict(spec.batch_constants(batch, opts)))
    return batch


def _norms(valid, n_seq, nonempty, layout, cdt, o: Opts, spec: LossSpec) -> Norms:
    dev = valid.device

    def scalar(x):            # a fill, not a host-to-device copy
        return torch.full((), float(x), dtype=cdt, device=dev) if not isinstance(x, torch.Tensor) else x.to(cdt)

    def given(x, fallback):
        return fallback if x is None else scalar(x)

    num_seqs = given(o.num_seqs, nonempty.sum().to(cdt))
    pairs = (n_seq.view(-1, 2).sum(-1) > 0).sum().to(cdt) if spec.unit == "pair" and layout.B % 2 == 0 \
        else nonempty.sum().to(cdt)
    return Norms(num_tokens=given(o.num_tokens, valid.sum().to(cdt)), num_seqs=num_seqs, num_pairs=pairs,
                 batch=given(o.num_seqs, scalar(layout.B)))


def _is_weights(delta, valid, layout, o: Opts):
    """Detached mismatch weights (token-shaped) and whether each was truncated/masked.

    Everything is decided in log space (``log w`` against ``log C``), so ``exp`` only ever sees values <= log C.
    """
    log_cap, log_min = math.log(o.is_cap), math.log(o.is_min)
    if o.is_mode.startswith("sequence"):
        log_w = layout.bcast(layout.seq_sum(torch.where(valid, delta, 0.0)))      # token-shaped
    else:
        log_w = delta
    if o.is_mode.endswith("truncate"):
        hit = log_w > log_cap
        w = torch.exp(torch.clamp(log_w, max=log_cap))
    else:
        hit = (log_w < log_min) | (log_w > log_cap)
        w = torch.where(hit, 0.0, torch.exp(torch.clamp(log_w, max=log_cap)))
    return w, hit


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: the spec's terms, then what every loss shares
# ----------------------------------------------------------------------------------------------------------------------


def kl_value(D: torch.Tensor, estimator: str, clamp: bool) -> torch.Tensor:
    """``KL_t`` from ``D = l - l_ref`` (docs/losses.md section 4). ``"<name>+"``: value of ``<name>``, gradient of k2."""
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


def kl_term(b: Batch, o: Opts) -> torch.Tensor:
    """The per-token KL to the reference, 0 at masked positions: an estimator of ``D = l - l_ref``, or with
    ``kl_estimator="exact"`` the given ``ref_kl`` (the full vocabulary's ``KL(pi || pi_ref)``, whose gradient is
    ``rlcore.linear_divergence``'s analytic one), clamped to ``[-10, 10]`` under ``kl_clamp``."""
    if o.kl_estimator == KL_EXACT:
        value = b.ref_kl.clamp(-10.0, 10.0) if o.kl_clamp else b.ref_kl
    else:
        value = kl_value(b.l - b.ref, o.kl_estimator, o.kl_clamp)
    return torch.where(b.valid, value, 0.0)


def _policy_masks(b: Batch, o: Opts, metrics: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The tokens whose policy term is kept by ``top_entropy_quantile`` and ``off_policy_mask`` (None: all)."""
    keep = None
    if o.get("top_entropy_quantile") is not None:
        keep = top_quantile_mask(b.H.detach(), b.valid, o.top_entropy_quantile)
        metrics["entropy_keep_frac"] = b.mmean(keep.to(b.cdt))
    if o.get("off_policy_mask") is not None:
        anchor = b.smp if b.smp is not None else (b.old if b.old is not None else b.l_sg)
        seq_kl = b.seq_mean(anchor - b.l_sg)                                      # [B]
        kept = (b.A >= 0) | (b.bcast((seq_kl <= o.off_policy_mask).to(b.cdt)) > 0)
        metrics["off_policy_mask_frac"] = b.mmean((~kept).to(b.cdt))
        keep = kept if keep is None else keep & kept
    return keep


def top_quantile_mask(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """``valid & (x >= quantile_{1 - q}(x[valid]))``, the quantile interpolated linearly (``torch.quantile``'s
    default), computed with a fixed-size sort: no host sync, and it traces under ``torch.compile``."""
    flat = torch.where(valid, x, math.inf).reshape(-1)                              # [N]
    if flat.numel() == 0:
        return valid.clone()
    srt = flat.sort().values                                                        # loss tokens first
    n = valid.sum()
    pos = (1.0 - q) * (n - 1).clamp(min=0).to(x.dtype)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    frac = pos - lo.to(x.dtype)
    v_lo, v_hi = srt.gather(0, lo.view(1)).squeeze(0), srt.gather(0, hi.view(1)).squeeze(0)
    threshold = v_lo + (v_hi - v_lo) * frac
    threshold = torch.where(frac == 0, v_lo, threshold)                             # no inf - inf at the top
    return valid & (x >= threshold)


def evaluate(spec: LossSpec, b: Batch, o: Opts) -> PolicyLossOutput:
    """The loss of the prepared batch ``b``: the spec's terms, then the shared masks, weights, KL, aggregation,
    entropy bonus and metrics."""
    terms = spec.terms(b, o)
    metrics = dict(terms.metrics)
    c = terms.token
    if c is not None:
        keep = _policy_masks(b, o, metrics) if spec.family == "clipped" else None
        if keep is not None:
            c = torch.where(keep, c, 0.0)
        if b.tw is not None:
            c = c * b.tw
        if b.w_is is not None and not terms.weighted:
            c = c * b.w_is
    if o.beta != 0:
        kl = kl_term(b, o)
        metrics["kl_ref_mean"] = b.mmean(kl)
        if o.get("kl_is_weighted"):
            if terms.ratio is None:
                raise ValueError(f"kl_is_weighted needs an importance ratio; loss_type={spec.name!r} has none "
                                 f"without old_logp")
            kl = kl * terms.ratio
        c = o.beta * kl if c is None else c + o.beta * kl

    loss = b.zero() if c is None else b.aggregate(c, o.agg, o)
    if terms.unit is not None:
        denom = b.norms.num_pairs if spec.unit == "pair" else b.norms.num_seqs
        loss = loss + torch.where(terms.unit_valid, terms.unit, 0.0).sum() / denom.clamp(min=1)
    if o.entropy_coef != 0:
        loss = loss - o.entropy_coef * b.aggregate(b.H, o.agg, o)
    return PolicyLossOutput(loss, _metrics(b, o, metrics, loss))


def _metrics(b: Batch, o: Opts, metrics: Dict[str, torch.Tensor], loss: torch.Tensor) -> Dict[str, torch.Tensor]:
    if b.old is not None:
        d_old = b.l_sg - b.old
        if o.log_ratio_clamp is not None:
            d_old = d_old.clamp(-o.log_ratio_clamp, o.log_ratio_clamp)
        metrics["approx_kl_old"] = b.mmean(torch.exp(-d_old) - 1.0 + d_old)
    if b.w_is is not None:
        n_loss = b.is_tokens.sum().clamp(min=1)                    # rejected tokens count as weight 0
        metrics["is_weight_mean"] = torch.where(b.is_tokens, b.w_is, 0.0).sum() / n_loss
        key = "is_frac_truncated" if o.is_mode.endswith("truncate") else "is_frac_masked"
        metrics[key] = (b.is_hit & b.is_tokens).sum().to(b.cdt) / n_loss
    if b.H is not None:
        metrics["entropy_mean"] = b.mmean(b.H)
    metrics["num_tokens"] = b.n_tok.detach()
    metrics["num_seqs"] = b.nonempty.sum().to(b.cdt)
    metrics["loss"] = loss.detach()
    return {k: v.detach() for k, v in metrics.items()}


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
    token_weights: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    baseline: Optional[torch.Tensor] = None,
    teacher_logp: Optional[torch.Tensor] = None,
    teacher_kl: Optional[torch.Tensor] = None,
    divergence: Optional[torch.Tensor] = None,
    ref_kl: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    loss_type: str = "ppo",
    check_inputs: bool = True,
    **options,
) -> PolicyLossOutput:
    r"""The policy loss named ``loss_type`` on per-token log-probs ``logp``; returns ``(loss, metrics)``.

    Layouts (every input follows ``logp``'s):
        - padded: ``logp [B, T]``, ``mask [B, T]``, per-token inputs ``[B, T]``, ``advantages [B]`` or ``[B, T]``.
        - packed: ``logp [N]`` with ``cu_seqlens`` (int32/int64 ``[B + 1]``, from 0 to N, as flash-attn varlen),
          per-token inputs ``[N]``, ``advantages [B]`` or ``[N]``.
        ``rewards`` and ``baseline`` are ``[B]``. ``mask`` (bool or 0/1; ``None``: every token) is 0 for prompt,
        padding and tool/observation tokens. Masked positions may hold anything, even NaN: they are never read.

    ``targets`` (integer, ``logp``'s shape): the token ids behind ``logp``. Positions whose target is
    ``ignore_index`` are then no loss tokens, whatever ``mask`` says, exactly as in ``fused_policy_loss``. Pass
    them whenever the targets are padded with ``ignore_index``: ``linear_logprobs`` (like ``cross_entropy``) gives
    log-prob 0 there, and without ``targets`` a mask of ones would count those zeros as loss tokens.

    Inputs: ``old_logp`` (the policy that generated the data, or its recompute), ``ref_logp`` (for ``beta``),
    ``sampler_logp`` (the inference engine's, for ``is_mode``), ``entropy`` (for ``entropy_coef`` and
    ``top_entropy_quantile``), ``token_weights`` (a detached weight on each policy term), ``rewards`` and
    ``baseline`` (the regression family). Distillation (``docs/losses.md`` section 9), every one shaped like
    ``logp``: ``teacher_logp`` (the teacher's log-probs of the tokens, for ``opd``), ``teacher_kl`` (the per-token
    ``KL(p_S || p_T)``, detached: ``opd``'s vOPD baseline), ``divergence`` (``kd``'s per-token divergence, with its
    gradient), ``ref_kl`` (the per-token ``KL(pi || pi_ref)`` with its gradient, for ``kl_estimator="exact"``);
    ``rlcore.fused_policy_loss`` computes them from the heads.

    ``loss_type``: a key of ``rlcore.LOSSES`` (the table in ``docs/losses.md`` gives each loss's formula, defaults
    and the peer setting it equals). ``options``: the keyword options that loss takes (``rlcore.LOSSES[name].options``;
    each is described in ``rlcore.losses.OPTIONS``), for example ``agg``, ``eps_low``, ``eps_high``, ``beta``,
    ``is_mode``, ``num_tokens``. An option the loss does not take is a ``ValueError``.

    ``check_inputs``: check ``cu_seqlens``'s values (a host sync on CUDA). Pass ``False`` in a hot loop whose
    ``cu_seqlens`` is known good; nothing else here ever syncs.

    Metrics (detached 0-d tensors): ``loss``, ``num_tokens``, ``num_seqs``; ratio-based losses: ``ratio_mean/min/max``,
    ``clip_frac_low/high``; ``approx_kl_old`` (k3 of the clamped ``l - l_old``) when ``old_logp`` is given;
    ``is_weight_mean`` with ``is_frac_truncated`` or ``is_frac_masked``; ``kl_ref_mean``; ``entropy_mean``; and each
    loss's own (``docs/losses.md``).

    An all-masked batch gives loss 0 and zero gradients.

    Example::

        out = rlcore.policy_loss(logp, adv, mask, old_logp=old, loss_type="gspo")
        out.loss.backward()
    """
    spec, opts = resolve(loss_type, options)
    if targets is not None:
        mask = _mask_from_targets(targets, ignore_index, logp, mask)
    batch = prepare(logp, advantages, mask, spec=spec, opts=opts, cu_seqlens=cu_seqlens, old_logp=old_logp,
                    ref_logp=ref_logp, sampler_logp=sampler_logp, entropy=entropy, token_weights=token_weights,
                    rewards=rewards, baseline=baseline, teacher_logp=teacher_logp, teacher_kl=teacher_kl,
                    divergence=divergence, ref_kl=ref_kl, check_inputs=check_inputs)
    return evaluate(spec, batch, opts)


def _mask_from_targets(targets, ignore_index, logp, mask):
    """``mask`` with the positions whose target is ``ignore_index`` removed (``[B, T]`` or ``[N]``, bool)."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got {_describe(targets)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {_describe(ignore_index)}")
    if isinstance(logp, torch.Tensor) and tuple(targets.shape) != tuple(logp.shape):
        raise ValueError(f"targets must have logp's shape {tuple(logp.shape)}, got {tuple(targets.shape)}")
    keep = targets != ignore_index
    if mask is None:
        return keep
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else _describe(mask)}")
    return keep & (mask if mask.dtype == torch.bool else mask != 0)

