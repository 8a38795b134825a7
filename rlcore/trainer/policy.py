"""The policy: a Hugging Face causal LM whose base model gives hidden states, and whose LM-head weight goes to
rlcore's fused head. The ``[B, T, V]`` logits are never formed in the update (nor for old/reference log-probs).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

import rlcore

__all__ = ["attn_implementation", "build_model", "hidden_states", "head_weight", "PolicyObjective"]


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
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError:
        raise ImportError("rlcore.trainer needs transformers: pip install 'rlcore[hf]'") from None
    dtype = getattr(torch, cfg.dtype)
    attn = attn_implementation(device)
    if cfg.model is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn)
    else:
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
    ``mode="logprobs"`` -> the ``[B, T - 1]`` log-probs of the batch's targets (0 off the loss mask), no grad.
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
            targets = torch.where(loss_mask, targets, -100)
            return rlcore.linear_logprobs(h, w, targets, temperature=self.temperature, precision=self.precision)
        if mode != "loss":
            raise ValueError(f"mode must be 'loss' or 'logprobs', got {mode!r}")
        advantages = loss_kwargs.pop("advantages")
        return rlcore.fused_policy_loss(h, w, targets, advantages, loss_mask, temperature=self.temperature,
                                        precision=self.precision, **loss_kwargs)


@torch.no_grad()
def batch_logprobs(objective: nn.Module, batch) -> torch.Tensor:
    """``[B, T - 1]`` fp32 log-probs of ``batch``'s policy tokens under ``objective``'s model (old/ref log-probs)."""
    return objective(batch.input_ids, batch.attention_mask, batch.loss_mask, mode="logprobs").float()
