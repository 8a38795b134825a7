"""The plain-PyTorch, materialised reference of every rlcore op. Tests, ``rlcore.validate`` and the benchmarks use it.

It builds the full ``[N, V]`` logits, so it is for checking and baselines only.

- ``compute_dtype=torch.float64`` gives the ground truth every kernel is judged against.
- ``compute_dtype=None`` is what a trainer does today: the head GEMM in the input dtype (bf16 logits for bf16
  inputs), then an FP32 ``log_softmax`` and a gather. rlcore's bf16 error must be no worse than this one's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear_logprobs_reference"]


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: Optional[torch.dtype] = torch.float64,
    softmax_dtype: torch.dtype = torch.float32,
    softcap: float = 0.0,
):
    """Materialised log-probs (and entropy) of ``targets`` under ``softmax(cap(hidden @ weight.T + bias) / temperature)``,
    ``cap(a) = softcap * tanh(a / softcap)`` for ``softcap > 0`` (in the GEMM's dtype, as the models do), else the
    identity.

    Args:
        hidden: ``[..., H]``.
        weight: ``[V, H]``.
        targets: ``[...]`` integer ids; positions equal to ``ignore_index`` give 0 and no gradient.
        compute_dtype: dtype of the head GEMM; ``None`` keeps the input dtype (``weight`` is cast to ``hidden``'s).
        softmax_dtype: minimum dtype of the softmax math (the logits are promoted to it).

    Returns:
        ``logp [...]`` or ``(logp, entropy)``, in the promoted softmax dtype.

    Equivalent to::

        logits = cap(F.linear(hidden, weight, bias)).to(softmax_dtype) / temperature      # [..., V]
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    """
    dtype = compute_dtype if compute_dtype is not None else hidden.dtype
    h = hidden.to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    logits = F.linear(h, w, b)                                              # [..., V]
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.to(torch.promote_types(logits.dtype, softmax_dtype)) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)                            # [..., V]
    valid = targets != ignore_index                                         # [...]
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)            # [...]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    if not return_entropy:
        return logp
    # -sum p log p, with 0 log 0 = 0 for masked (-inf) vocabulary entries; written so no NaN reaches the gradient.
    finite = torch.isfinite(logp_all)
    logp_safe = torch.where(finite, logp_all, zero)
    ent = -(logp_all.exp() * logp_safe).sum(-1)                             # [...]
    return logp, torch.where(valid, ent, zero)
