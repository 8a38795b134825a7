"""The policy: a Hugging Face causal LM whose base model gives hidden states, and whose LM-head weight goes to
rlcore's fused head. The ``[B, T, V]`` logits are never formed in the update (nor for old/reference log-probs).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import torch
from torch import nn

import rlcore

__all__ = ["attn_implementation", "build_model", "load_pretrained", "quiet_transformers", "load_teacher",
           "hidden_states", "head_weight", "PolicyObjective", "batch_logprobs", "teacher_scores"]


def attn_implementation(device: torch.device) -> str:
    """flash-attention when flash-attn is importable and the model runs on a GPU, else PyTorch's SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_model(cfg, vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int, device: torch.device):
    """``cfg.model`` (a local path) through ``AutoModelForCausalLM``, or a tiny random Llama from a config.

    The tiny model has ``cfg.model_heads`` heads of ``model_hidden / model_heads`` (32 by default: vLLM's CPU
    attention takes head sizes 32, 64, 80, ...) and an untied head, so the LM-head weight is its own parameter.
    """
    if cfg.model is not None:
        return load_pretrained(cfg.model, cfg.dtype, device)
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError:
        raise ImportError("rlcore.trainer needs transformers: pip install 'rlcore[hf]'") from None
    dtype = getattr(torch, cfg.dtype)
    attn = attn_implementation(device)
    if cfg.model_hidden % cfg.model_heads:
        raise ValueError(f"model_hidden ({cfg.model_hidden}) must be a multiple of model_heads "
                         f"({cfg.model_heads})")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.model_hidden, intermediate_size=4 * cfg.model_hidden,
        num_hidden_layers=cfg.model_layers, num_attention_heads=cfg.model_heads,
        num_key_value_heads=cfg.model_heads, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, attn_implementation=attn)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off (loading and writing a tiny model would print two per run), then restored."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def load_pretrained(path: str, dtype: str, device: torch.device):
    """A local model dir (``save_pretrained``'s) through ``AutoModelForCausalLM`` in ``dtype``, on ``device``."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError("rlcore.trainer needs transformers: pip install 'rlcore[hf]'") from None
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation(device))
    return model.to(device)


def load_teacher(path: str, cfg, vocab_size: int, device: torch.device) -> "PolicyObjective":
    """The frozen teacher at ``path``, scoring at the student's temperature and head precision.

    Raises :class:`~rlcore.trainer.ConfigError` (field ``teacher``) when its LM head is not over the student's
    ``vocab_size`` tokens, and (field ``top_k``) when ``cfg.top_k`` exceeds that vocabulary."""
    from .config import ConfigError

    model = load_pretrained(path, cfg.dtype, device).requires_grad_(False).eval()
    rows = head_weight(model).shape[0]
    if rows != vocab_size:
        raise ConfigError("teacher", path, f"a model over the student's vocabulary of {vocab_size} tokens",
                          f"its LM head has {rows} rows: the teacher must score the student's token ids")
    if cfg.top_k is not None and cfg.top_k > vocab_size:
        raise ConfigError("top_k", cfg.top_k, f"at most the vocabulary size, {vocab_size}")
    return PolicyObjective(model, temperature=cfg.temperature, precision=cfg.head_precision)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states ``[B, T, H]`` of ``input_ids [B, T]``, from the base model (no head).

    Positions count real tokens only (``cumsum(mask) - 1``), as ``generate`` numbers a left-padded prompt, so the
    teacher-forced pass sees exactly what the sampler saw.
    """
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)             # [B, T]
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state


def head_weight(model) -> torch.Tensor:
    """The LM-head weight ``[V, H]``; a head with a bias is rejected (rlcore takes one, but HF heads have none)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the model's LM head has a bias; rlcore.trainer expects a bias-free head")
    return head.weight


class PolicyObjective(nn.Module):
    """The policy update as one module, so DDP and FSDP2 see every parameter used inside ``forward``.

    ``forward(batch, mode="loss", **loss_kwargs)`` -> ``rlcore.PolicyLossOutput`` from ``fused_policy_loss``;
    ``mode="logprobs"`` -> the ``[B, T - 1]`` log-probs of the batch's targets (0 off the loss mask).
    """

    def __init__(self, model, *, temperature: float, precision: str):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.precision = precision

    def forward(self, input_ids, attention_mask, loss_mask, mode: str = "loss", **loss_kwargs):
        h = hidden_states(self.model, input_ids, attention_mask)[:, :-1]           # [B, T - 1, H]
        w = head_weight(self.model)                                                  # [V, H]
        targets = input_ids[:, 1:]                                                   # [B, T - 1]
        if mode == "logprobs":
            return self.head_logprobs(h, w, targets, loss_mask)
        if mode != "loss":
            raise ValueError(f"mode must be 'loss' or 'logprobs', got {mode!r}")
        advantages = loss_kwargs.pop("advantages")
        return rlcore.fused_policy_loss(h, w, targets, advantages, loss_mask, temperature=self.temperature,
                                        precision=self.precision, **loss_kwargs)


    def head_logprobs(self, h, w, targets, loss_mask):
        """``[B, T - 1]`` log-probs of ``targets`` under the head ``w`` on ``h`` (0 off ``loss_mask``)."""
        targets = torch.where(loss_mask, targets, -100)
        return rlcore.linear_logprobs(h, w, targets, temperature=self.temperature, precision=self.precision)


@torch.no_grad()
def teacher_scores(teacher: PolicyObjective, batch):
    """The teacher's view of ``batch``, no grad: its hidden states ``[B, T - 1, H_T]``, its LM head ``[V, H_T]`` and
    the fp32 log-probs ``[B, T - 1]`` it gives the sampled tokens (0 off the loss mask). One pass of its backbone;
    the log-probs come from its head through rlcore, so no ``[B, T, V]`` logits are formed."""
    h = hidden_states(teacher.model, batch.input_ids, batch.attention_mask)[:, :-1]
    w = head_weight(teacher.model)
    return h, w, teacher.head_logprobs(h, w, batch.targets, batch.loss_mask).float()


@torch.no_grad()
def batch_logprobs(objective: nn.Module, batch) -> torch.Tensor:
    """``[B, T - 1]`` fp32 log-probs of ``batch``'s policy tokens under ``objective``'s model (old/ref log-probs)."""
    return objective(batch.input_ids, batch.attention_mask, batch.loss_mask, mode="logprobs").float()
