"""rlcore in TRL's ``GRPOTrainer``: ``rlcore.integrations.trl.install(trainer, loss=False)``, one line after the
trainer is built; it returns the trainer.

The head (always): TRL computes per-token log-probs through a seam that rlcore takes over:

- TRL >= 1.15 (``"forward"``; tested on 1.16): ``add_fused_lm_head`` patched the policy's (and the reference
  model's) forward so that ``model(..., labels=..., fused_lm_head=True)`` returns ``.log_probs`` / ``.entropy``;
  ``install`` patches it again with rlcore's head (``rlcore.integrations.hf``: the model's own scale and soft cap,
  the fused kernels inside the head module's call). Without ``fused_lm_head`` the model's forward is the original
  one (generation).
- older TRL (``"method"``; 0.20 to 1.14, tested on 0.20.0): ``trainer._get_per_token_logps_and_entropies(model,
  input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy)`` itself, computed from the backbone's
  hidden states. TRL below 0.20 has no such method (``_get_per_token_logps`` only) and is refused.

The loss (``loss=True``): ``trainer._compute_loss`` becomes :func:`rlcore.policy_loss` with TRL's settings mapped
onto rlcore's options (see :func:`loss_settings`); a setting with no exact rlcore equivalent keeps TRL's own loss,
after a one-time ``UserWarning`` naming the setting; so does a loss type on a TRL older than the first release whose
formula and normaliser rlcore reproduces (``_LOSS_SINCE``, read from each release's source). TRL's metrics
``entropy`` and ``kl`` are logged under TRL's names; the clip fractions are rlcore's (``clip_frac_low``,
``clip_frac_high``, their own definitions, not TRL's ``clip_ratio/*``), under ``rlcore/``, as is ``kl_ref_mean``.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Dict, Tuple

import torch

from ..losses import policy_loss
from . import hf

__all__ = ["install", "loss_settings", "SUPPORTED_TRL", "Unsupported"]

SUPPORTED_TRL = ("0.20", "2")        # [lowest, below this major): 0.20 added _get_per_token_logps_and_entropies
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_warned: set = set()


class Unsupported(Exception):
    """A TRL setting rlcore does not compute exactly (its message names the setting)."""


def _version() -> str:
    import trl

    return trl.__version__


def _check_version(version: str) -> None:
    from packaging.version import Version

    v = Version(version)
    if not (Version(SUPPORTED_TRL[0]) <= v < Version(SUPPORTED_TRL[1])):
        raise ValueError(f"rlcore.integrations.trl supports TRL >= {SUPPORTED_TRL[0]} and < {SUPPORTED_TRL[1]} "
                         f"(GRPOTrainer._get_per_token_logps_and_entropies or the fused LM head); "
                         f"this is TRL {version}")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------------------------------


def _unwrap(model):
    """The model whose forward TRL patched: the PEFT base model or the model (accelerate's wrappers unwrapped)."""
    inner = getattr(model, "module", model)          # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") and hasattr(inner, "peft_config") else inner


def _is_fused_forward(model) -> bool:
    fwd = model.__dict__.get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames


def _score(model, hidden, labels, temperature, entropy: bool, precision: str):
    """``(log_probs, entropy | None, mask)`` of ``labels`` (``-100`` ignored) on ``hidden [B, T, H]``."""
    head = hf.head_of(model)
    mask = labels != -100
    flat_h, flat_m = hidden.reshape(-1, hidden.shape[-1]), mask.reshape(-1)
    if hidden.device.type == "cpu":
        idx = flat_m.nonzero().squeeze(1)
        out = head.logprobs(flat_h.index_select(0, idx), labels.reshape(-1).index_select(0, idx),
                            temperature=temperature, return_entropy=entropy, precision=precision)
        lp, ent = out if entropy else (out, None)

        def scatter(x):
            return None if x is None else x.new_zeros(flat_m.shape).index_copy(0, idx, x).view(mask.shape)
        return scatter(lp), scatter(ent), mask
    out = head.logprobs(hidden, labels, temperature=temperature, return_entropy=entropy, precision=precision)
    lp, ent = out if entropy else (out, None)
    return lp, ent, mask


def _fused_forward_for(model, temperature: float, entropy: bool, precision: str):
    """A forward with TRL's ``fused_lm_head`` keyword, computed by rlcore; the original forward otherwise."""
    from trl.trainer.utils import FusedCausalLMOutput

    original = types.MethodType(type(model).forward, model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return original(*args, **kwargs)
        if kwargs.get("output_router_logits") or getattr(cfg, "output_router_logits", False):
            raise ValueError("rlcore's TRL head does not compute the MoE router loss; install skips MoE models")
        hidden = hf.hidden_states(self, *args, **kwargs)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lp, ent, mask = _score(self, hidden, labels.to(hidden.device), temperature, entropy, precision)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-lp.sum() / count, log_probs=lp, entropy=ent, label_mask=mask)

    return forward


def _install_forward(model, temperature: float, entropy: bool, precision: str) -> None:
    target = _unwrap(model)
    hf.head_of(target)                                  # raises on a head rlcore cannot reproduce
    target.forward = types.MethodType(_fused_forward_for(target, temperature, entropy, precision), target)


def _precision(trainer) -> str:
    """TRL's ``cast_lm_head_to_fp32`` is rlcore's ``precision="fp32"`` (the head to FP32 accuracy)."""
    return "fp32" if getattr(trainer.args, "cast_lm_head_to_fp32", False) else "default"


def _per_token_logps_method(trainer, original):
    """``_get_per_token_logps_and_entropies`` computed by rlcore (text models; others keep ``original``)."""

    def method(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
               compute_aux_loss=False, **extra):
        if compute_aux_loss or any(extra.get(k) is not None for k in _MULTIMODAL):
            aux = dict(compute_aux_loss=compute_aux_loss) if _returns_aux(original) else {}     # TRL >= 1.9
            return original(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                            compute_entropy=compute_entropy, **aux, **extra)
        lm = _unwrap(model)
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[s:s + batch_size], attention_mask[s:s + batch_size]
            with self.accelerator.autocast():
                hidden = hf.hidden_states(lm, input_ids=ids, attention_mask=am)
            hidden = hidden[:, -logits_to_keep - 1:-1]
            labels = ids.masked_fill(am == 0, -100)[:, -logits_to_keep:]
            lp, ent, _ = _score(lm, hidden, labels, self.temperature, compute_entropy, _precision(self))
            logps.append(lp)
            ents.append(ent)
        out = (torch.cat(logps), torch.cat(ents) if compute_entropy else None)
        return out + (None,) if _returns_aux(original) else out

    return types.MethodType(method, trainer)


def _returns_aux(original) -> bool:
    import inspect

    return "compute_aux_loss" in inspect.signature(original).parameters


def _install_head(trainer, seam: str) -> str:
    if seam == "auto":
        seam = "forward" if _is_fused_forward(_unwrap(trainer.model)) else "method"
    entropy = True
    if seam == "forward":
        if not _is_fused_forward(_unwrap(trainer.model)):
            raise ValueError("seam='forward' needs TRL's fused LM head (model(..., fused_lm_head=True), TRL >= 1.15); "
                             "this trainer's model has none: use seam='method' or 'auto'")
        _install_forward(trainer.model, trainer.temperature, entropy, _precision(trainer))
        ref = getattr(trainer, "ref_model", None)
        if ref is not None and _is_fused_forward(_unwrap(ref)):
            _install_forward(ref, trainer.temperature, False, _precision(trainer))
    elif seam == "method":
        hf.head_of(_unwrap(trainer.model))
        original = trainer._get_per_token_logps_and_entropies
        trainer._get_per_token_logps_and_entropies = _per_token_logps_method(trainer, original)
    else:
        raise ValueError(f"seam must be 'auto', 'forward' or 'method', got {seam!r}")
    return seam


# ----------------------------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------------------------

# TRL loss_type -> (rlcore loss_type, aggregation) at importance_sampling_level="token"
_LOSSES = {
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "constant"),
    "dapo": ("ppo", "token-mean"),
    "luspo": ("ppo", "seq-mean-token-sum"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}
# the first TRL whose _compute_loss computes the loss type as rlcore's mapping does: grpo, bnpo and dr_grpo are
# unchanged since 0.20 (only where they divide by the accumulation steps moved: _divides_by_accumulation); for dapo,
# cispo, sapo and luspo, TRL's _compute_loss is the same from 1.10 to 1.16 (diffed), while 1.9's dapo and cispo
# normaliser lacks the rescaling by steps_per_generation and older releases differ further (not reproduced)
_LOSS_SINCE = {"grpo": "0.20", "bnpo": "0.20", "dr_grpo": "0.20", "dapo": "1.10", "luspo": "1.10", "cispo": "1.10",
               "sapo": "1.10"}


def _at_least(version: str, since: str) -> bool:
    from packaging.version import Version

    return Version(version) >= Version(since)


def _divides_by_accumulation(version: str, train: bool) -> bool:
    """Whether TRL's ``_compute_loss`` divides grpo, bnpo, dr_grpo (sapo, luspo) by the accumulation steps: not
    before 0.22 (the Trainer does it, outside ``_compute_loss``), always from 0.22, in training only from 0.27.1."""
    if not _at_least(version, "0.22"):
        return False
    return train or not _at_least(version, "0.27.1")


def loss_settings(trainer, version: str | None = None) -> Tuple[str, Dict[str, Any]]:
    """``(rlcore loss_type, options)`` equal to the trainer's TRL loss settings under TRL ``version`` (default: the
    installed one; per-batch counts are added per call); raises :class:`Unsupported` naming a setting with no exact
    equivalent."""
    args = trainer.args
    t = trainer.loss_type
    if t not in _LOSSES:
        raise Unsupported(f"loss_type={t!r}")
    version = _version() if version is None else version
    if not _at_least(version, _LOSS_SINCE[t]):
        raise Unsupported(f"loss_type={t!r} on TRL {version} (rlcore reproduces TRL's from {_LOSS_SINCE[t]})")
    for name, bad, what in (("top_entropy_quantile", getattr(trainer, "top_entropy_quantile", 1.0) < 1.0, "< 1"),
                            ("entropy_coef", getattr(trainer, "_entropy_bonus_enabled", False), "an entropy bonus"),
                            ("router_aux_loss_coef", getattr(trainer, "aux_loss_enabled", False), "an MoE aux loss")):
        if bad:
            raise Unsupported(f"{name} ({what})")
    loss_type, agg = _LOSSES[t]
    level = getattr(trainer, "importance_sampling_level", "token")
    if level not in ("token", "sequence"):
        raise Unsupported(f"importance_sampling_level={level!r}")
    opts: Dict[str, Any] = {"agg": agg, "ratio_level": level}
    if loss_type == "ppo":
        opts.update(eps_low=float(trainer.epsilon_low), eps_high=float(trainer.epsilon_high))
        delta = getattr(args, "delta", None)
        opts["dual_clip"] = None if delta is None else float(delta)
    elif loss_type == "cispo":
        opts.update(eps_low=None, eps_high=float(trainer.epsilon_high) - 1.0)   # TRL's cap is absolute
    else:
        opts.update(sapo_tau_pos=float(args.sapo_temperature_pos), sapo_tau_neg=float(args.sapo_temperature_neg))
    if agg == "constant":
        opts["agg_constant"] = float(trainer.max_completion_length)
    beta = float(getattr(trainer, "beta", 0.0))
    if beta != 0.0:
        opts.update(beta=beta, kl_estimator="k3", kl_is_weighted=bool(getattr(args, "use_bias_correction_kl", False)))
    threshold = getattr(trainer, "off_policy_mask_threshold", None)
    if threshold is not None:
        opts["off_policy_mask"] = float(threshold)
    return loss_type, opts


def _compute_loss_for(trainer, original):
    """``_compute_loss`` through :func:`rlcore.policy_loss`; ``original`` (TRL's) where a setting is unsupported."""

    def compute(self, model, inputs):
        try:
            loss_type, opts = loss_settings(self)
        except Unsupported as err:
            _warn_once(str(err), f"rlcore.integrations.trl: {err} has no exact rlcore equivalent; using TRL's own loss")
            return original(model, inputs)
        return _rlcore_loss(self, model, inputs, loss_type, opts)

    return types.MethodType(compute, trainer)


def _rlcore_loss(self, model, inputs, loss_type: str, opts: Dict[str, Any]):
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
    out = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_ids.size(1),
                                                  compute_entropy=True)
    logp, entropy = out[0], out[1]
    advantages = inputs["advantages"]
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    train = self.model.training
    B = logp.shape[0]
    agg = opts["agg"]
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        opts = dict(opts, num_seqs=float(B))                     # TRL averages over every row, empty or not
    if self.loss_type in ("dapo", "cispo"):
        n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        opts = dict(opts, num_tokens=n)
    extra = {}
    if self.beta != 0.0:
        extra["ref_logp"] = inputs["ref_per_token_logps"]
    if opts.get("off_policy_mask") is not None and "sampling_per_token_logps" in inputs:
        extra["sampler_logp"] = inputs["sampling_per_token_logps"]
    if self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False):     # TRL >= 0.23
        extra["token_weights"] = inputs["importance_sampling_ratio"].expand_as(logp)
    res = policy_loss(logp, advantages, mask.bool(), old_logp=old, loss_type=loss_type, **extra, **opts)
    loss = res.loss
    if self.loss_type not in ("dapo", "cispo") and _divides_by_accumulation(_version(), train):
        loss = loss / self.current_gradient_accumulation_steps
    _log_metrics(self, res.metrics, entropy, mask)
    return loss


def _log_metrics(self, metrics, entropy, mask) -> None:
    mode = "train" if self.model.training else "eval"
    m = mask.float()

    def global_mean(x):
        totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    self._metrics[mode]["entropy"].append(global_mean(entropy.detach()))
    for key in ("kl_ref_mean", "clip_frac_low", "clip_frac_high"):
        if key in metrics:
            value = self.accelerator.gather(metrics[key].reshape(1)).float().mean().item()
            self._metrics[mode][f"rlcore/{key}"].append(value)
    if "kl_ref_mean" in metrics:
        self._metrics[mode]["kl"].append(self._metrics[mode]["rlcore/kl_ref_mean"][-1])


# ----------------------------------------------------------------------------------------------------------------------
# install
# ----------------------------------------------------------------------------------------------------------------------


def install(trainer, loss: bool = False, seam: str = "auto"):
    """Replace TRL's LM head in ``trainer`` (a ``trl.GRPOTrainer``) with rlcore's, and with ``loss=True`` its loss
    too; returns ``trainer``. ``seam``: ``"auto"`` (TRL's fused-forward seam where present, 1.15 on, else the
    ``_get_per_token_logps_and_entropies`` method), ``"forward"`` or ``"method"``. Raises ``ValueError`` for a TRL
    outside the supported range, a trainer without the seams, or a head rlcore cannot reproduce exactly."""
    _check_version(_version())
    for name in ("model", "_get_per_token_logps_and_entropies", "_compute_loss"):
        if not hasattr(trainer, name):
            raise ValueError(f"install needs a trl GRPOTrainer: {type(trainer).__name__} has no {name}")
    trainer._rlcore_seam = _install_head(trainer, seam)
    if loss:
        original = trainer._compute_loss
        trainer._compute_loss = _compute_loss_for(trainer, original)
    return trainer

