"""rlcore's losses in verl's policy-loss registry: importing this module registers each clipped-family loss of
``rlcore.LOSSES`` as ``"rlcore_" + loss_type`` (``get_policy_loss_fn("rlcore_gspo")``; in a run,
``actor_rollout_ref.actor.policy_loss.loss_mode=rlcore_gspo``). In Ray workers it is imported through
``VERL_USE_EXTERNAL_MODULES=rlcore.integrations.verl``, which verl reads in every worker.

Each registered function has verl's signature ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
config, rollout_is_weights) -> (loss, metrics)`` and verl's normalisation:

- ``loss_agg_mode`` is rlcore's ``agg`` (the same names; losses over whole sequences such as ``gmpo`` average
  per sequence); ``config.global_batch_info`` gives ``num_tokens`` (``batch_num_tokens``), ``num_seqs``
  (``global_batch_size``), ``agg_constant`` (``loss_scale_factor``, default the response length) and the loss is
  multiplied by ``dp_size``, as verl's ``agg_loss`` does (so FSDP's gradient mean over ranks gives the global loss).
  ``dp_size > 1`` without the global count the mode needs is a ``ValueError``, as in verl.
- the loss options come from the actor config: ``clip_ratio_low`` / ``clip_ratio_high`` (falling back to
  ``clip_ratio``) are ``eps_low`` / ``eps_high``; ``clip_ratio_c`` is ``dual_clip`` for ``ppo``, ``dapo`` and
  ``dr_grpo`` (verl's ``vanilla`` always dual-clips) and ``dppo_ratio_cap`` for ``dppo_*``; ``tau_pos`` /
  ``tau_neg`` are ``sapo_tau_pos`` / ``_neg``; ``policy_loss.clip_cov_ratio`` / ``kl_cov_ratio`` are ``cov_ratio``,
  ``policy_loss.clip_cov_lb`` / ``_ub``, ``ppo_kl_coef`` (``kl_cov_coef``) and ``dro_beta`` likewise.
- ``rollout_is_weights`` (verl's precomputed mismatch weights) are rlcore's ``token_weights``: they multiply each
  token's policy term after clipping, as in verl.
- ``gspo`` takes one advantage per sequence: verl's per-token advantages must be constant over each sequence's
  response tokens (they are for GRPO-style estimators), else ``ValueError``; ``rlcore_gspo_token`` takes any.

The fused log-prob path: importing this module also adds ``actor_rollout_ref.model.fused_kernel_options.impl_backend=
rlcore`` (with ``use_fused_kernels=True``) to ``patch_forward_with_backends``: the model's forward then computes the
packed ``[1, nnz]`` log-probs and entropies through rlcore's head (:func:`forward_with_rlcore_backend`).

Not registered: the regression family (``apo``, ``oapl``, ``kimi``, ``rebel``), which needs rewards and baselines that
verl's policy-loss signature does not carry. :func:`register` adds a loss under another name with fixed options.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import LOSSES
from ..losses import policy_loss

__all__ = ["register", "registered", "loss_options", "forward_with_rlcore_backend", "PREFIX", "BACKEND"]

PREFIX = "rlcore_"
_DUAL_CLIP = ("ppo", "dapo", "dr_grpo")      # the losses verl's "vanilla" (always dual-clipped) corresponds to
_registered: Dict[str, str] = {}


def _get(cfg, name: str, default=None):
    """``cfg.name`` for a dataclass config or an OmegaConf ``DictConfig`` (``None`` when absent)."""
    if cfg is None:
        return default
    if hasattr(cfg, "get") and not hasattr(type(cfg), "__dataclass_fields__"):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def loss_options(loss_type: str, config, loss_agg_mode: str, horizon: int) -> Dict[str, Any]:
    """rlcore options of ``loss_type`` read from verl's actor ``config`` (see the module docstring); ``horizon`` is
    the response length (verl's default ``loss_scale_factor``)."""
    spec = LOSSES[loss_type]
    takes = set(spec.options)
    clip = _get(config, "clip_ratio", 0.2)
    pl = _get(config, "policy_loss")
    opts: Dict[str, Any] = {}
    if "eps_low" in takes:
        opts["eps_low"] = float(_get(config, "clip_ratio_low", clip))
        opts["eps_high"] = float(_get(config, "clip_ratio_high", clip))
    if loss_type in _DUAL_CLIP:
        opts["dual_clip"] = float(_get(config, "clip_ratio_c", 3.0))
    if "dppo_ratio_cap" in takes:
        opts["dppo_ratio_cap"] = float(_get(config, "clip_ratio_c", 3.0))
    if "sapo_tau_pos" in takes:
        opts["sapo_tau_pos"] = float(_get(config, "tau_pos", spec.default("sapo_tau_pos")))
        opts["sapo_tau_neg"] = float(_get(config, "tau_neg", spec.default("sapo_tau_neg")))
    if "cov_ratio" in takes:
        key = "clip_cov_ratio" if loss_type == "clip_cov" else "kl_cov_ratio"
        opts["cov_ratio"] = float(_get(pl, key, spec.default("cov_ratio")))
    for ours, theirs in (("clip_cov_lb", "clip_cov_lb"), ("clip_cov_ub", "clip_cov_ub"),
                         ("kl_cov_coef", "ppo_kl_coef"), ("dro_beta", "dro_beta")):
        if ours in takes and _get(pl, theirs) is not None:
            opts[ours] = float(_get(pl, theirs))
    if spec.unit == "token":
        opts["agg"] = loss_agg_mode
    info = _get(config, "global_batch_info") or {}
    dp = int(info.get("dp_size", 1) or 1)
    n_tok, n_seq = info.get("batch_num_tokens"), info.get("global_batch_size")
    token_mode = spec.unit == "token" and loss_agg_mode in ("token-mean",)
    if token_mode:
        if n_tok is None and dp > 1:
            raise ValueError("global_batch_info['batch_num_tokens'] is required when dp_size > 1 (token-mean)")
        if n_tok is not None:
            opts["num_tokens"] = float(n_tok)
    elif loss_agg_mode != "token-sum" or spec.unit != "token":
        if n_seq is None and dp > 1:
            raise ValueError(f"global_batch_info['global_batch_size'] is required when dp_size > 1 ({loss_agg_mode})")
        if n_seq is not None:
            opts["num_seqs"] = float(n_seq)
    if loss_agg_mode == "seq-mean-token-sum-norm" and spec.unit == "token":
        scale = info.get("loss_scale_factor")
        opts["agg_constant"] = float(horizon if scale is None else scale)
    return opts


def _seq_advantages(advantages: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """``[B]`` from verl's ``[B, T]`` advantages, which must be constant over each sequence's response tokens."""
    m = mask.to(advantages.dtype)
    count = m.sum(-1).clamp(min=1)
    adv = (advantages * m).sum(-1) / count                                   # [B]
    spread = ((advantages - adv[:, None]).abs() * m).amax(-1) if m.numel() else adv
    if bool((spread > 1e-6 * adv.abs().clamp(min=1)).any()):
        raise ValueError(f"{PREFIX}{name} takes one advantage per sequence, but verl passed advantages that vary "
                         f"within a sequence; use {PREFIX}gspo_token (token-level advantages)")
    return adv


def _make(loss_type: str, fixed: Optional[Dict[str, Any]] = None):
    spec = LOSSES[loss_type]
    fixed = dict(fixed or {})

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights=None):
        if config is None:
            raise ValueError(f"{PREFIX}{loss_type}: verl's actor config is required (its clip ratios and "
                             "global_batch_info define the loss)")
        mask = response_mask.bool()
        opts = loss_options(loss_type, config, loss_agg_mode, horizon=response_mask.shape[-1])
        opts.update(fixed)
        adv = _seq_advantages(advantages, mask, loss_type) if spec.seq_advantages else advantages
        out = policy_loss(log_prob, adv, mask, old_logp=old_log_prob, token_weights=rollout_is_weights,
                          loss_type=loss_type, **opts)
        dp = int((_get(config, "global_batch_info") or {}).get("dp_size", 1) or 1)
        loss = out.loss * dp
        metrics = {f"actor/{PREFIX}{k}": float(v.detach().float().item()) for k, v in out.metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        return loss, metrics

    loss_fn.__name__ = f"{PREFIX}{loss_type}"
    loss_fn.__doc__ = f"rlcore's {loss_type!r} loss with verl's policy-loss signature ({spec.peer or spec.doc})."
    return loss_fn


def register(name: str, loss_type: str, **options) -> None:
    """Register rlcore's ``loss_type`` in verl's registry as ``name``, with ``options`` fixed (over the ones read
    from the config). Raises ``ValueError`` for a loss verl's signature cannot feed (the regression family)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(map(repr, LOSSES))}")
    spec = LOSSES[loss_type]
    missing = [x for x in spec.needs if x not in ("old_logp",)]
    if spec.family != "clipped" or missing:
        raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing) or 'rewards'}, which verl's policy-loss "
                         "signature does not pass")
    register_policy_loss(name)(_make(loss_type, options))
    _registered[name] = loss_type


def registered() -> Dict[str, str]:
    """``{verl name: rlcore loss_type}`` registered by this module."""
    return dict(_registered)


def _register_all() -> None:
    for loss_type, spec in LOSSES.items():
        if spec.family == "clipped" and all(x == "old_logp" for x in spec.needs):
            register(PREFIX + loss_type, loss_type)


# ----------------------------------------------------------------------------------------------------------------------
# the fused log-prob path: fused_kernel_options.impl_backend=rlcore
# ----------------------------------------------------------------------------------------------------------------------

BACKEND = "rlcore"


def forward_with_rlcore_backend(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                                output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                                temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's fused-kernel forward (the signature and output of ``forward_with_torch_backend``: per-position
    ``log_probs`` and ``entropy`` of the rolled labels, ``[1, nnz]`` on verl's packed inputs), by rlcore's head
    (``rlcore.integrations.hf``: the model's scale and soft cap, inside the head module's call)."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    from . import hf

    if return_dict is False:
        raise NotImplementedError("the rlcore backend returns a dict (CausalLMOutputForPPO)")
    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("the rlcore backend needs labels, shift_labels or input_ids")
    log_probs, entropy = hf.head_of(self).logprobs(outputs[0], rolled, temperature=temperature, return_entropy=True)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _add_backend() -> None:
    """Teach ``verl.models.transformers.monkey_patch.patch_forward_with_backends`` the ``"rlcore"`` backend (text
    models; the others keep verl's own choice)."""
    from verl.models.transformers import monkey_patch

    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "_rlcore", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            from . import hf

            hf.head_of(model)                     # raises on a head rlcore cannot reproduce
            model._verl_fused_kernels_backend = BACKEND
            model.__class__.forward = forward_with_rlcore_backend
            return None
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._rlcore = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


_register_all()
_add_backend()
