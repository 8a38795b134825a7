"""The algorithms as data: which rlcore loss, how advantages are formed, what anchors the log-ratio.

The trainer only orchestrates; this module turns rewards and log-probs into ``rlcore.fused_policy_loss`` keywords,
and holds the algorithm-specific state: A*PO's offline V* (cached to disk) and OAPL's buffer of the lagged
sampler's rollouts. The two distillation algorithms learn from a teacher's scores of the student's own samples
instead of the reward: the registry's ``opd`` and ``kd`` losses, given the teacher's head (``distill_kwargs``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import rlcore

__all__ = ["AlgoSpec", "ALGORITHMS", "REWARD_ALGOS", "loss_kwargs", "distill_kwargs", "offline_vstar",
           "SamplerBuffer"]


@dataclass(frozen=True)
class AlgoSpec:
    """One algorithm: an rlcore loss (``rlcore.LOSSES[loss_type]``, which holds its family, anchor and option
    defaults) and what only the trainer decides. ``advantage``: ``"normalized"`` ``(r - mean_g) / (std_g + 1e-6)``,
    ``"centered"`` ``r - mean_g`` (Dr. GRPO: no std division) or ``None`` (the regression family takes rewards, not
    advantages). ``distill``: ``"opd"`` or ``"kd"``, an algorithm that learns from a teacher, not the reward."""

    loss_type: str
    group_size: int                   # default samples per prompt
    prompts: int                      # default prompts per step
    lr: float                         # default learning rate (tuned on the demo's tiny model)
    advantage: Optional[str] = None
    agg: Optional[str] = None         # None: the loss's default
    drop_flat_groups: bool = False    # DAPO's dynamic sampling: a group whose rewards are all equal teaches nothing
    distill: Optional[str] = None     # "opd" / "kd": scored by a teacher, not by the reward

    @property
    def loss(self) -> rlcore.LossSpec:
        return rlcore.LOSSES[self.loss_type]

    @property
    def family(self) -> str:
        """``"clipped"``, ``"regression"`` or ``"distill"`` (the registry's)."""
        return self.loss.family

    @property
    def anchor(self) -> Optional[str]:
        """Regression: the log-probs ``Lam_i`` is measured against (``"ref_logp"``, ``"sampler_logp"``,
        ``"old_logp"``; the registry's)."""
        return self.loss.anchor

    @property
    def grouped(self) -> bool:
        """Does the algorithm compare samples of the same prompt (so needs ``group_size >= 2``)?"""
        return self.advantage is not None or self.anchor in ("sampler_logp", "old_logp")


ALGORITHMS: Dict[str, AlgoSpec] = {
    # the clipped family, group advantages
    "grpo": AlgoSpec("ppo", 8, 32, 3e-4, "normalized", agg="seq-mean-token-mean"),
    "dapo": AlgoSpec("dapo", 8, 32, 3e-4, "normalized", drop_flat_groups=True),
    "dr_grpo": AlgoSpec("dr_grpo", 8, 32, 3e-4, "centered"),
    "gspo": AlgoSpec("gspo", 8, 32, 3e-4, "normalized"),
    "cispo": AlgoSpec("cispo", 8, 32, 3e-4, "normalized"),
    # the squared-regression family
    "apo": AlgoSpec("apo", 1, 64, 5e-4),
    "oapl": AlgoSpec("oapl", 8, 32, 3e-4),
    "kimi": AlgoSpec("kimi", 8, 32, 3e-4),
    "rebel": AlgoSpec("rebel", 2, 64, 3e-4),
    # distillation from a teacher, on the student's own samples
    "opd": AlgoSpec("opd", 1, 32, 3e-4, distill="opd"),
    "kd": AlgoSpec("kd", 1, 32, 3e-4, distill="kd"),
}

# the algorithms that learn from the reward alone (what can train a teacher)
REWARD_ALGOS = tuple(name for name, spec in ALGORITHMS.items() if spec.distill is None)


def flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` bool: the samples of groups whose rewards are all equal (zero advantage, nothing to learn)."""
    r = rewards.view(-1, group_size)                                   # [P, G]
    flat = (r == r[:, :1]).all(dim=1)                                  # [P]
    return flat.repeat_interleave(group_size)                          # [B]


def loss_kwargs(cfg, rewards: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor,
                ref_logp: Optional[torch.Tensor] = None, baseline: Optional[torch.Tensor] = None,
                max_completion: int = 1) -> Dict:
    """The ``rlcore.fused_policy_loss`` keywords of ``cfg.algo`` for one rollout batch (everything but the head).

    ``rewards``/``baseline`` are ``[B]``; the log-probs ``[B, T]`` (token-aligned with the loss targets).
    ``max_completion``: the most tokens a completion can have (Dr. GRPO's constant denominator).
    """
    spec = cfg.spec
    kw: Dict = dict(loss_type=spec.loss_type, entropy_coef=cfg.entropy_coef)
    if spec.agg is not None:
        kw["agg"] = spec.agg
    if spec.loss_type == "dr_grpo":
        kw["agg_constant"] = float(max_completion)
    if spec.family == "clipped":
        kw["advantages"] = rlcore.group_advantages(rewards, cfg.group, normalize=spec.advantage == "normalized")
        kw["old_logp"] = old_logp
        for name in ("eps_low", "eps_high"):
            if getattr(cfg, name) is not None:
                kw[name] = getattr(cfg, name)
        if cfg.beta:
            kw.update(beta=cfg.beta, ref_logp=ref_logp)
        if cfg.is_mode is not None:
            kw.update(sampler_logp=sampler_logp, is_mode=cfg.is_mode, is_cap=cfg.is_cap)
        return kw
    kw["advantages"] = None
    kw["rewards"] = rewards
    if cfg.beta2 is not None:
        kw["beta2"] = cfg.beta2
    kw[spec.anchor] = {"ref_logp": ref_logp, "sampler_logp": sampler_logp, "old_logp": old_logp}[spec.anchor]
    if spec.loss_type == "apo":
        kw["baseline"] = baseline
    if "group_size" in spec.loss.options:
        kw["group_size"] = cfg.group
    if "beta1" in spec.loss.options:
        kw["beta1"] = cfg.beta1
    if "eta" in spec.loss.options:
        kw["eta"] = cfg.eta
    return kw


# ----------------------------------------------------------------------------------------------------------------------
# distillation: the teacher's scores of the student's samples
# ----------------------------------------------------------------------------------------------------------------------


def distill_kwargs(cfg, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_logp: torch.Tensor,
                   old_logp: torch.Tensor, sampler_logp: torch.Tensor) -> Dict:
    """The ``rlcore.fused_policy_loss`` keywords of ``opd`` and ``kd`` (the registry's losses, ``docs/losses.md``):
    the teacher's head at the student's positions (``teacher_hidden [B, T, H_T]``, ``teacher_weight [V, H_T]``),
    from which the loss takes the vOPD baseline's KL (opd) or the per-token divergence (kd) without logits.

    opd: ``c_t = -sg(r_t - b_t) l_t``, ``r_t = teacher_logp - sg(l_t)`` (``teacher_logp [B, T]``, already computed
    for the metrics, is passed on), ``b_t = -KL(p_S || p_T)`` over the vocabulary (``opd_baseline="full"``), the
    teacher's ``top_k`` (``"topk"``) or 0 (``"none"``). kd: ``c_t = D_t`` (``kd_kind``, ``jsd_beta``, ``top_k``).
    """
    spec = cfg.spec
    kw: Dict = dict(loss_type=spec.loss_type, advantages=None, entropy_coef=cfg.entropy_coef,
                    teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    if spec.loss_type == "opd":
        kw.update(opd_baseline=cfg.opd_baseline, teacher_logp=teacher_logp)
    else:
        kw.update(kd_kind=cfg.kd_kind, jsd_beta=cfg.jsd_beta)
    if cfg.top_k is not None:
        kw["top_k"] = cfg.top_k
    if cfg.is_mode is not None:
        kw.update(old_logp=old_logp, sampler_logp=sampler_logp, is_mode=cfg.is_mode, is_cap=cfg.is_cap)
    return kw


# ----------------------------------------------------------------------------------------------------------------------
# A*PO, stage 1: V* per prompt from pi_ref, offline
# ----------------------------------------------------------------------------------------------------------------------


def offline_vstar(prompts: Sequence[str], sample_rewards: Callable[[List[str], int], torch.Tensor], *,
                  samples: int, beta1: float, cache: Optional[Path], key: Dict, chunk: int = 64):
    """A*PO's offline stage: ``samples`` completions per prompt from pi_ref, ``V*(x) = rlcore.vstar(r, beta1)``.

    ``sample_rewards(prompts, n) -> [len(prompts), n]`` draws the rewards. Prompts that pi_ref never solves (pass
    rate 0, so ``V* = 0`` carries no signal) are dropped. The result is cached at ``cache`` under ``key`` (the
    reference weights' hash and the settings), so a resumed or repeated run skips the sampling.

    Returns ``(kept_prompts, vstar {prompt: float}, stats)``.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved.get("digest") == digest:
            return saved["prompts"], saved["vstar"], saved["stats"]
    rewards = torch.cat([sample_rewards(list(prompts[i:i + chunk]), samples)
                         for i in range(0, len(prompts), chunk)])                      # [P, N]
    v = rlcore.vstar(rewards.double(), beta1)                                          # [P]
    solved = (rewards > 0).any(dim=1)                                                  # [P]
    kept = [p for p, ok in zip(prompts, solved.tolist()) if ok]
    vstar = {p: float(x) for p, x, ok in zip(prompts, v.tolist(), solved.tolist()) if ok}
    stats = dict(apo_prompts=len(prompts), apo_kept=len(kept), apo_ref_pass_rate=float(rewards.mean()))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(digest=digest, prompts=kept, vstar=vstar, stats=stats), cache)
    return kept, vstar, stats


def state_digest(state_dict: Dict[str, torch.Tensor]) -> str:
    """A hash of a model's weights (which pi_ref the cached V* belongs to)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# OAPL: the lagged sampler's rollouts
# ----------------------------------------------------------------------------------------------------------------------


class SamplerBuffer:
    """The last ``capacity`` rollout batches of OAPL's lagged sampler. Each training step draws one at random, so
    the policy trains on data a few versions old, anchored at the sampler's own log-probs (not the policy's)."""

    def __init__(self, capacity: int):
        self.items: deque = deque(maxlen=capacity)

    def add(self, batch) -> None:
        self.items.append(batch)

    def draw(self, rng: random.Random):
        return self.items[rng.randrange(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> Dict:
        return dict(capacity=self.items.maxlen, items=list(self.items))

    def load_state_dict(self, state: Dict) -> None:
        self.items = deque(state["items"], maxlen=state["capacity"])
