"""OpenRLHF's policy loss computed by rlcore: ``rlcore.integrations.openrlhf.PolicyLoss``, a drop-in for
``openrlhf.models.PolicyLoss`` (OpenRLHF 0.11.2): the same constructor, the same call and the same return tuple
``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. It does not import OpenRLHF.

Mapping onto :func:`rlcore.policy_loss`:

- ``policy_loss_type="ppo"``: rlcore ``ppo`` with ``eps_low`` / ``eps_high`` = ``clip_eps_low`` / ``clip_eps_high``
  and ``dual_clip``; ``"gspo"``: rlcore ``gspo`` (the sequence ratio, one advantage per sequence: OpenRLHF's
  per-token advantages must be constant over each sequence's action tokens), anchored at ``rollout_log_probs`` when
  the correction is on, as OpenRLHF does.
- ``token_level_loss``: ``agg="token-mean"`` (``num_tokens = batch_num_tokens``), else ``"seq-mean-token-mean"``
  (``num_seqs = global_batch_size``, forced for gspo); with a global count the loss is multiplied by ``dp_size``.
- the vLLM mismatch correction ``is_correction_level="token"``, ``mode="mask"``, ``gating="ratio"`` with
  ``threshold=(low, high)`` is rlcore's ``is_mode="token_mask"`` (``is_min=low``, ``is_cap=high``,
  ``sampler_logp=rollout_log_probs``). The other corrections (sequence level: OpenRLHF gates on the geometric mean,
  rlcore's sequence weight is the product; ``mode="clip"``: two-sided, rlcore truncates above only; the
  ``binary_kl`` / ``tv`` gates) have no exact rlcore equivalent: the constructor raises ``ValueError`` naming the
  setting (use OpenRLHF's own class for those).

``actor_forward`` is OpenRLHF's ``Actor.forward`` without the ``[B, T, V]`` logits (unpacked text batches).

In a Ray job, the workers import OpenRLHF's classes themselves; install both there with
``ray.init(runtime_env={"worker_process_setup_hook": "rlcore.integrations.openrlhf.patch"})``: :func:`patch`
replaces ``openrlhf.models.PolicyLoss`` (and the name the PPO actor imported) and ``Actor.forward`` in that process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..losses import policy_loss

__all__ = ["PolicyLoss", "actor_forward", "patch"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1e-8)


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (same arguments), computed by :func:`rlcore.policy_loss`; see the module docstring."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: Optional[float] = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: Sequence[float] = (0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        for name, value, allowed in (("is_correction_level", is_correction_level, ("off", "token", "seq")),
                                     ("is_correction_mode", is_correction_mode, ("mask", "clip")),
                                     ("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if is_correction_level != "off" and policy_loss_type == "ppo":
            for name, value, exact in (("is_correction_level", is_correction_level, "token"),
                                       ("is_correction_mode", is_correction_mode, "mask"),
                                       ("is_correction_gating", is_correction_gating, "ratio")):
                if value != exact:
                    raise ValueError(f"{name}={value!r} has no exact rlcore equivalent (rlcore takes the token-level "
                                     "ratio mask); use openrlhf.models.PolicyLoss for it")
        self.clip_eps_low, self.clip_eps_high = float(clip_eps_low), float(clip_eps_high)
        self.dual_clip = None if dual_clip is None else float(dual_clip)
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = bool(token_level_loss) and policy_loss_type != "gspo"
        self.is_correction_level = is_correction_level
        self.is_correction_threshold = tuple(float(x) for x in is_correction_threshold)

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None, rollout_log_probs: Optional[torch.Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None):
        """``[B, T]`` inputs -> ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (the last two ``None``
        without the correction)."""
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required with is_correction_level != 'off'")
        opts = dict(eps_low=self.clip_eps_low, eps_high=self.clip_eps_high, dual_clip=self.dual_clip)
        global_count = False
        if self.token_level_loss:
            opts["agg"] = "token-mean"
            if batch_num_tokens is not None:
                opts["num_tokens"], global_count = float(batch_num_tokens), True
        else:
            opts["agg"] = "seq-mean-token-mean"
            if global_batch_size is not None:
                opts["num_seqs"], global_count = float(global_batch_size), True
        if self.policy_loss_type == "ppo":
            anchor = old_log_probs
            extra = {}
            if correcting:
                low, high = self.is_correction_threshold
                extra = dict(sampler_logp=rollout_log_probs, is_mode="token_mask", is_min=low, is_cap=high)
            out = policy_loss(log_probs, advantages, mask, old_logp=anchor, loss_type="ppo", **extra, **opts)
            ratio = torch.exp((log_probs - anchor).clamp(-20.0, 20.0))
        else:
            anchor = rollout_log_probs if correcting else old_log_probs
            out = policy_loss(log_probs, _per_sequence(advantages, mask), mask, old_logp=anchor, loss_type="gspo",
                              **opts)
            m = mask.to(log_probs.dtype)
            seq = ((log_probs - anchor) * m).sum(-1) / m.sum(-1).clamp(min=1)
            ratio = seq.exp()[:, None] * m
        loss = out.loss * dp_size if global_count else out.loss
        with torch.no_grad():
            r, a = ratio.detach(), advantages.detach()
            clip_ratio = _masked_mean((r.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * a < r * a).float(),
                                      mask)
            ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)
            vllm_kl = is_filter_ratio = None
            if correcting and self.policy_loss_type == "ppo":
                low, high = self.is_correction_threshold
                w = (old_log_probs - rollout_log_probs).exp()
                is_filter_ratio = _masked_mean(((w < low) | (w > high)).float(), mask)
                vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def _per_sequence(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` from ``[B, T]`` advantages constant over each sequence's action tokens (else ``ValueError``)."""
    m = mask.to(advantages.dtype)
    adv = (advantages * m).sum(-1) / m.sum(-1).clamp(min=1)
    spread = ((advantages - adv[:, None]).abs() * m).amax(-1) if m.numel() else adv
    if bool((spread > 1e-6 * adv.abs().clamp(min=1)).any()):
        raise ValueError("policy_loss_type='gspo' takes one advantage per sequence, but the advantages vary within "
                         "a sequence")
    return adv


def actor_forward(self, sequences: torch.LongTensor, action_mask: Optional[torch.Tensor] = None,
                  attention_mask: Optional[torch.Tensor] = None, return_output: bool = False,
                  allgather_logits: bool = False, return_logprobs: bool = False, ring_attn_group=None,
                  packed_seq_lens=None, return_entropy: bool = False, **mm_inputs):
    """OpenRLHF's ``Actor.forward`` (same arguments and returns) with the log-probs and entropies from rlcore's head on
    the backbone's hidden states: no ``[B, T, V]`` logits (the returned ``output`` has ``logits=None``). Packed
    samples, vision-language inputs and calls that ask for the logits themselves run OpenRLHF's original forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from . import hf

    original = type(self)._rlcore_original_forward
    wants_logits = action_mask is None and not return_logprobs
    if getattr(self, "packing_samples", False) or getattr(self, "is_vlm", False) or mm_inputs or wants_logits:
        return original(self, sequences, action_mask=action_mask, attention_mask=attention_mask,
                        return_output=return_output, allgather_logits=allgather_logits,
                        return_logprobs=return_logprobs, ring_attn_group=ring_attn_group,
                        packed_seq_lens=packed_seq_lens, return_entropy=return_entropy, **mm_inputs)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    hidden = hf.hidden_states(self.model, sequences, attention_mask=attention_mask, position_ids=position_ids)
    rolled = torch.roll(sequences, shifts=-1, dims=1)
    out = hf.head_of(self.model).logprobs(hidden, rolled, temperature=float(self.temperature),
                                          return_entropy=return_entropy)
    log_probs, entropy = out if return_entropy else (out, None)
    output = CausalLMOutputWithPast(logits=None)
    if return_entropy:
        assert return_output
        output.entropy = entropy[:, :-1]
    log_probs = log_probs[:, :-1]
    if action_mask is None:
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


def patch() -> None:
    """In the current process (a Ray worker's setup hook): replace OpenRLHF's ``PolicyLoss`` with this drop-in and
    ``Actor.forward`` with :func:`actor_forward`."""
    import importlib

    for name in ("openrlhf.models", "openrlhf.models.loss", "openrlhf.trainer.ray.ppo_actor",   # 0.11.2's users
                 "openrlhf.models.actor"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "PolicyLoss"):
            mod.PolicyLoss = PolicyLoss
        actor = getattr(mod, "Actor", None)
        if actor is not None and not hasattr(actor, "_rlcore_original_forward"):
            actor._rlcore_original_forward = actor.forward
            actor.forward = actor_forward
