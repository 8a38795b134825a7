"""Rollouts: engines that sample completions with the sampler's own log-probs, and multi-turn trajectories.

A :class:`RolloutEngine` takes token-id prompts and returns, per prompt, the sampled token ids and the log-prob the
sampler gave each one (at the sampling temperature). Two engines ship:

- :class:`TransformersEngine`: ``model.generate`` with ``output_scores``; the scores are the processed logits
  (divided by the temperature, no top-k/top-p), so their ``log_softmax`` at the sampled token is exactly the
  sampler's log-prob.
- :class:`VLLMEngine` (``rlcore.trainer.vllm_engine``, imported only when asked for): vLLM's sampler log-probs and
  in-place weight sync.

:func:`rollout` drives an engine through a task's turns (tool calls answered by the environment, whose tokens are
masked out of the loss) and :func:`collate` turns trajectories into a padded :class:`RolloutBatch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["Sample", "RolloutEngine", "TransformersEngine", "Trajectory", "RolloutBatch", "rollout", "collate"]


@dataclass
class Sample:
    """One sampled continuation: ``tokens`` (ending at the first stop token, if any) and the sampler's log-probs."""

    tokens: List[int]
    logprobs: List[float]


class RolloutEngine(ABC):
    """Samples continuations of token-id prompts, with the log-prob the sampler gave each sampled token."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
                 stop_ids: Sequence[int]) -> List[Sample]:
        """One :class:`Sample` per prompt. ``temperature == 0`` is greedy (log-probs then at temperature 1)."""

    @abstractmethod
    def load_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Sync the sampler to the policy's (full, unsharded) weights."""


class TransformersEngine(RolloutEngine):
    """Sampling with ``model.generate``.

    ``own_copy=False``: ``model`` is the live policy (on-policy sampling, nothing to sync). ``own_copy=True``:
    ``model`` is the engine's own copy, which changes only on :meth:`load_weights`: a lagged sampler (OAPL), or an
    unsharded copy of an FSDP2 policy. The caller makes that copy (a sharded module cannot be deep-copied).
    """

    def __init__(self, model, *, pad_id: int, own_copy: bool = False):
        self.model = model
        self.own_copy = own_copy
        self.pad_id = pad_id

    def load_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        if self.own_copy:
            self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, stop_ids):
        model = self.model
        device = next(model.parameters()).device
        input_ids, attention_mask = _left_pad(prompts, self.pad_id, device)    # [B, P]
        sample = temperature > 0
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_k=0 if sample else None,
                top_p=1.0 if sample else None, pad_token_id=self.pad_id, eos_token_id=list(stop_ids),
                output_scores=True, return_dict_in_generate=True)
        finally:
            model.train(was_training)
        new = out.sequences[:, input_ids.shape[1]:]                                  # [B, S]
        scores = torch.stack(out.scores, dim=1).float()                             # [B, S, V] (logits / temperature)
        logp = torch.log_softmax(scores, dim=-1).gather(-1, new[..., None])[..., 0]  # [B, S]
        return [_cut(row.tolist(), lp.tolist(), stop_ids) for row, lp in zip(new, logp)]


def _left_pad(prompts, pad_id: int, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cut(tokens: List[int], logprobs: List[float], stop_ids) -> Sample:
    """Keep the tokens up to and including the first stop token (the rest is padding after it)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return Sample(tokens[:i + 1], logprobs[:i + 1])
    return Sample(tokens, logprobs)


# ----------------------------------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A prompt and everything after it. ``policy[t]``: token t was written by the policy (a loss token);
    prompt and observation tokens are not. ``sampler_logp[t]``: the sampler's log-prob of token t (0 elsewhere)."""

    prompt: str
    tokens: List[int]
    policy: List[bool]
    sampler_logp: List[float]
    completion: str = ""
    reward: float = 0.0
    turns: int = 0


def rollout(engine: RolloutEngine, task, prompts: Sequence[str], *, n: int, max_new_tokens: int,
            temperature: float) -> List[Trajectory]:
    """``n`` trajectories per prompt (contiguous: a group), through up to ``task.max_turns`` policy turns.

    A turn ends at EOS, at one of ``task.stop_text``'s characters (a tool call), or after ``max_new_tokens``. After a
    tool call the environment's observation (``task.observe``) is appended as non-policy tokens and the policy
    writes again, seeing it.
    """
    tok = task.tokenizer
    stop_ids = [tok.EOS] + tok.encode(task.stop_text)
    trajs = [Trajectory(p, tok.encode(p, bos=True), [], [], "") for p in prompts for _ in range(n)]
    for t in trajs:
        t.policy = [False] * len(t.tokens)
        t.sampler_logp = [0.0] * len(t.tokens)
    active = list(range(len(trajs)))
    for turn in range(task.max_turns):
        if not active:
            break
        samples = engine.generate([trajs[i].tokens for i in active], max_new_tokens=max_new_tokens,
                                  temperature=temperature, stop_ids=stop_ids)
        still = []
        for i, s in zip(active, samples):
            t = trajs[i]
            t.tokens += s.tokens
            t.policy += [True] * len(s.tokens)
            t.sampler_logp += s.logprobs
            t.turns += 1
            t.completion = tok.decode(t.tokens[len(tok.encode(t.prompt, bos=True)):])
            ended_in_call = bool(s.tokens) and s.tokens[-1] != tok.EOS and s.tokens[-1] in stop_ids
            if ended_in_call and turn + 1 < task.max_turns:
                obs = task.observe(t.prompt, t.completion)
                if obs is not None:
                    ids = tok.encode(obs)
                    t.tokens += ids
                    t.policy += [False] * len(ids)
                    t.sampler_logp += [0.0] * len(ids)
                    t.completion += obs
                    still.append(i)
        active = still
    return trajs


@dataclass
class RolloutBatch:
    """Trajectories as padded tensors. The loss is over ``targets = input_ids[:, 1:]``: ``loss_mask [B, T - 1]``
    marks the policy's tokens, ``sampler_logp [B, T - 1]`` is aligned with them."""

    input_ids: torch.Tensor          # [B, T] right-padded
    attention_mask: torch.Tensor     # [B, T]
    loss_mask: torch.Tensor          # [B, T - 1] bool
    sampler_logp: torch.Tensor       # [B, T - 1] fp32
    rewards: torch.Tensor            # [B] fp32
    prompts: List[str] = field(default_factory=list)

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                            self.sampler_logp.to(device), self.rewards.to(device), self.prompts)

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The batch restricted to the rows ``rows`` (an index or bool tensor ``[B]``)."""
        idx = rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows
        return RolloutBatch(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx],
                            self.sampler_logp[idx], self.rewards[idx], [self.prompts[i] for i in idx.tolist()])


def collate(trajs: Sequence[Trajectory], pad_id: int, device=None) -> RolloutBatch:
    B, T = len(trajs), max(len(t.tokens) for t in trajs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    pol = torch.zeros((B, T), dtype=torch.bool)
    smp = torch.zeros((B, T), dtype=torch.float32)
    for i, t in enumerate(trajs):
        L = len(t.tokens)
        ids[i, :L] = torch.tensor(t.tokens)
        att[i, :L] = 1
        pol[i, :L] = torch.tensor(t.policy)
        smp[i, :L] = torch.tensor(t.sampler_logp)
    batch = RolloutBatch(ids, att, pol[:, 1:].clone(), smp[:, 1:].clone(),
                         torch.tensor([t.reward for t in trajs], dtype=torch.float32), [t.prompt for t in trajs])
    return batch if device is None else batch.to(device)
