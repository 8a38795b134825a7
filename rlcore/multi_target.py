"""Several targets per position for ``linear_logprobs``: ``targets [..., K]`` gives the ``K`` log-probs of each
position from one pass over the vocabulary, e.g. a student scored on a served teacher's top-k ids.

Exact, and the log-probs kernels stay as they are: for each row, one of its ids ``b`` (the valid one with the largest
logit) goes through ``rlcore::linear_logprobs``, which gives ``log p_b = z_b - lse`` with its full-vocabulary
gradient; the ``K`` target logits ``z_k`` come from ``rlcore::gathered_logits`` (``K`` dot products per row, a block of
rows at a time), and ::

    log p_k = z_k - z_b + log p_b

Its gradient is the multi-target one: ``sum_k g_k ([v == t_k] - p_v)``, the kernel's ``-G p_v`` term (``G = sum_k g_k``)
plus a scatter over the ``K`` ids (the gathered op's backward, an ``index_add`` into ``dW`` and ``db``).
Slots equal to ``ignore_index`` give 0 and no gradient; a row whose ids are all ignored gives entropy 0 as well.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import chunked

__all__ = ["multi_target_logprobs", "GATHER_CHUNK_ELEMENTS"]

# Rows per block of the gathered dot products: C * K * H gathered head rows (FP32) per block, 16 MiB by default.
GATHER_CHUNK_ELEMENTS = int(os.environ.get("RLCORE_GATHER_CHUNK_ELEMENTS", 2**22))


def _rows(K: int, H: int) -> int:
    return max(1, GATHER_CHUNK_ELEMENTS // max(K * H, 1))


@torch.library.custom_op("rlcore::gathered_logits", mutates_args=())
def _gathered_logits_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                        valid: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """``z [N, K] = (hidden[n] . weight[ids[n, k]] + bias[ids[n, k]]) * inv_temp`` in the compute dtype, 0 where
    ``valid [N, K]`` is False. ``ids`` must lie in ``[0, V)`` everywhere (ignored slots hold any valid id)."""
    N, K = ids.shape
    cdt = chunked.compute_dtype(hidden.dtype, weight.dtype)
    z = hidden.new_zeros((N, K), dtype=cdt)
    step = _rows(K, hidden.shape[1])
    for s in range(0, N, step):
        sl = slice(s, s + step)
        h = torch.where(valid[sl].any(1, keepdim=True), hidden[sl].to(cdt), 0.0)     # [C, H]
        w = weight[ids[sl]].to(cdt)                                                  # [C, K, H]
        zc = torch.bmm(w, h[:, :, None]).squeeze(-1)                                 # [C, K]
        if bias is not None:
            zc += bias[ids[sl]].to(cdt)
        z[sl] = torch.where(valid[sl], zc * inv_temp, 0.0)
    return z


@_gathered_logits_op.register_fake
def _(hidden, weight, bias, ids, valid, inv_temp):
    return hidden.new_empty(ids.shape, dtype=chunked.compute_dtype(hidden.dtype, weight.dtype))


@torch.library.custom_op("rlcore::gathered_logits_backward", mutates_args=())
def _gathered_logits_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], ids: torch.Tensor, valid: torch.Tensor, inv_temp: float,
                                 needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh [N, H], dW [V, H], db [V])`` in the inputs' dtypes; an empty ``[0]`` tensor where ``needs`` is False."""
    N, K = ids.shape
    H = hidden.shape[1]
    cdt = chunked.compute_dtype(hidden.dtype, weight.dtype)
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    dh = hidden.new_zeros((N, H), dtype=cdt) if need_dh else None
    dw = weight.new_zeros(weight.shape, dtype=cdt) if need_dw else None
    db = weight.new_zeros((weight.shape[0],), dtype=cdt) if need_db else None
    g = torch.where(valid, grad.to(cdt), 0.0) * inv_temp                             # [N, K]
    step = _rows(K, H)
    for s in range(0, N, step):
        sl = slice(s, s + step)
        idx = ids[sl].reshape(-1)
        if dh is not None:
            dh[sl] = torch.bmm(g[sl, None, :], weight[ids[sl]].to(cdt)).squeeze(1)  # [C, H]
        if dw is not None:
            h = torch.where(valid[sl].any(1, keepdim=True), hidden[sl].to(cdt), 0.0)
            dw.index_add_(0, idx, (g[sl, :, None] * h[:, None, :]).reshape(-1, H))
        if db is not None:
            db.index_add_(0, idx, g[sl].reshape(-1))
    empty = hidden.new_empty((0,))
    return (dh.to(hidden.dtype) if need_dh else empty, dw.to(weight.dtype) if need_dw else empty.clone(),
            db.to(bias.dtype) if need_db else empty.clone())


@_gathered_logits_backward_op.register_fake
def _(grad, hidden, weight, bias, ids, valid, inv_temp, needs):
    return (hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if needs[1] else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, valid, inv_temp = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, valid)
    ctx.inv_temp = inv_temp


def _backward(ctx, grad):
    hidden, weight, bias, ids, valid = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 6
    grads = _gathered_logits_backward_op(grad, hidden, weight, bias, ids, valid, ctx.inv_temp, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None)


torch.library.register_autograd("rlcore::gathered_logits", _backward, setup_context=_setup_context)


def multi_target_logprobs(hidden, weight, bias, targets, temperature: float, ignore_index: int, precision: str,
                          backend: str, check_targets: bool):
    """``hidden [N, H]``, ``targets [N, K]`` (validated) -> ``(logp [N, K], entropy [N])``, as ``linear_logprobs``."""
    from .logprobs import _check_target_range, _linear_logprobs_op

    V = weight.shape[0]
    if check_targets:
        _check_target_range(targets, V, ignore_index)
    valid = targets != ignore_index                                                  # [N, K]
    safe = torch.where(valid, targets, 0).long()
    z = _gathered_logits_op(hidden, weight, bias, safe, valid, 1.0 / temperature)    # [N, K]
    col = torch.where(valid, z.detach(), float("-inf")).argmax(1, keepdim=True)      # [N, 1]: the row's base slot
    base = torch.where(valid.any(1), safe.gather(1, col)[:, 0], ignore_index)
    logp_b, ent, _ = _linear_logprobs_op(hidden, weight, bias, base, temperature, ignore_index, precision, backend,
                                         False)
    z_b = z.gather(1, col)
    logp = torch.where(torch.isneginf(z), float("-inf"), z - z_b + logp_b[:, None])  # all -inf: no 0 * inf below
    return torch.where(valid, logp, 0.0), ent
