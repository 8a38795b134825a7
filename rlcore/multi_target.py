"""Several targets per position for ``linear_logprobs``: ``targets [..., K]`` gives the ``K`` log-probs of each
position from one pass over the vocabulary, e.g. a student scored on a served teacher's top-k ids.

Exact, and the log-probs kernels stay as they are: for each row, one of its ids ``b`` (the valid one with the largest
logit) goes through ``rlcore::linear_logprobs``, which gives ``log p_b = z_b - lse`` with its full-vocabulary
gradient; the gaps ``d_k = z_k - z_b`` come from ``rlcore::gathered_logit_gaps`` (``K`` dot products per row with the
differences of head rows ``W[t_k] - W[b]``, a block of rows at a time), and ::

    log p_k = d_k + log p_b

Its gradient is the multi-target one: ``sum_k g_k ([v == t_k] - p_v)``, the kernel's ``-G p_v`` term (``G = sum_k g_k``)
plus a scatter over the ``K`` ids and the base (the gaps op's backward, an ``index_add`` into ``dW`` and ``db``).
Slots equal to ``ignore_index`` give 0 and no gradient; a row whose ids are all ignored gives entropy 0 as well.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import chunked

__all__ = ["multi_target_logprobs", "gathered_logits", "GATHER_CHUNK_ELEMENTS"]

# Rows per block of the gathered dot products: C * K * H gathered head rows (FP32) per block, 16 MiB by default.
GATHER_CHUNK_ELEMENTS = int(os.environ.get("RLCORE_GATHER_CHUNK_ELEMENTS", 2**22))


def _rows(K: int, H: int) -> int:
    return max(1, GATHER_CHUNK_ELEMENTS // max(K * H, 1))


def _rows_h(hidden, valid, sl, cdt):
    """A block of rows in the compute dtype, zero where no slot of the row is valid (so NaN there never spreads)."""
    return torch.where(valid[sl].any(1, keepdim=True), hidden[sl].to(cdt), 0.0)


@torch.no_grad()
def gathered_logits(hidden, weight, bias, ids, inv_temp: float) -> torch.Tensor:
    """``z [N, K] = (hidden[n] . weight[ids[n, k]] + bias[ids[n, k]]) * inv_temp`` (no gradient), a block of rows
    at a time; ``ids`` in ``[0, V)``."""
    N, K = ids.shape
    cdt = chunked.compute_dtype(hidden.dtype, weight.dtype)
    z = hidden.new_empty((N, K), dtype=cdt)
    step = _rows(K, hidden.shape[1])
    for s in range(0, N, step):
        sl = slice(s, s + step)
        z[sl] = torch.bmm(weight[ids[sl]].to(cdt), hidden[sl].to(cdt)[:, :, None]).squeeze(-1)
        if bias is not None:
            z[sl] += bias[ids[sl]].to(cdt)
    return z.mul_(inv_temp)


@torch.library.custom_op("rlcore::gathered_logit_gaps", mutates_args=())
@chunked.autocast_off
def _logit_gaps_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                   base: torch.Tensor, valid: torch.Tensor, inv_temp: float, targets: torch.Tensor, ignore_index: int,
                   check_targets: bool) -> torch.Tensor:
    """``d [N, K] = z[ids] - z[base]``, the gap of each target's logit to the row's base id's, computed as
    ``((W[ids] - W[base]) . h + b[ids] - b[base]) * inv_temp`` (no cancellation of two large dot products; exactly 0
    where ``ids == base``), 0 where ``valid [N, K]`` is False. ``ids [N, K]`` and ``base [N]`` in ``[0, V)``.
    ``check_targets``: first raise on ``targets`` (the user's ids) outside ``[0, V)`` that are not ``ignore_index``,
    here, inside the op, where ``torch.compile`` does not trace the host sync."""
    if check_targets:
        from .logprobs import _check_target_range

        _check_target_range(targets, weight.shape[0], ignore_index)
    N, K = ids.shape
    cdt = chunked.compute_dtype(hidden.dtype, weight.dtype)
    d = hidden.new_zeros((N, K), dtype=cdt)
    step = _rows(K, hidden.shape[1])
    for s in range(0, N, step):
        sl = slice(s, s + step)
        rows = weight[ids[sl]].to(cdt) - weight[base[sl]].to(cdt)[:, None, :]        # [C, K, H]
        dc = torch.bmm(rows, _rows_h(hidden, valid, sl, cdt)[:, :, None]).squeeze(-1)  # [C, K]
        if bias is not None:
            dc += bias[ids[sl]].to(cdt) - bias[base[sl]].to(cdt)[:, None]
        d[sl] = torch.where(valid[sl] & (ids[sl] != base[sl, None]), dc * inv_temp, 0.0)
    return d


@_logit_gaps_op.register_fake
def _(hidden, weight, bias, ids, base, valid, inv_temp, targets, ignore_index, check_targets):
    return hidden.new_empty(ids.shape, dtype=chunked.compute_dtype(hidden.dtype, weight.dtype))


@torch.library.custom_op("rlcore::gathered_logit_gaps_backward", mutates_args=())
@chunked.autocast_off
def _logit_gaps_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], ids: torch.Tensor, base: torch.Tensor, valid: torch.Tensor,
                            inv_temp: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh [N, H], dW [V, H], db [V])`` in the inputs' dtypes; an empty ``[0]`` tensor where ``needs`` is False.
    Slots equal to the base id (constant gap 0) and invalid slots carry no gradient."""
    N, K = ids.shape
    H = hidden.shape[1]
    cdt = chunked.compute_dtype(hidden.dtype, weight.dtype)
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    dh = hidden.new_zeros((N, H), dtype=cdt) if need_dh else None
    dw = weight.new_zeros(weight.shape, dtype=cdt) if need_dw else None
    db = weight.new_zeros((weight.shape[0],), dtype=cdt) if need_db else None
    g = torch.where(valid & (ids != base[:, None]), grad.to(cdt), 0.0) * inv_temp    # [N, K]
    g_base = -g.sum(1)                                                               # [N]
    step = _rows(K, H)
    for s in range(0, N, step):
        sl = slice(s, s + step)
        if dh is not None:
            rows = weight[ids[sl]].to(cdt) - weight[base[sl]].to(cdt)[:, None, :]    # [C, K, H]
            dh[sl] = torch.bmm(g[sl, None, :], rows).squeeze(1)                      # [C, H]
        idx = torch.cat([ids[sl].reshape(-1), base[sl]])
        coef = torch.cat([g[sl].reshape(-1), g_base[sl]])
        if dw is not None:
            h = _rows_h(hidden, valid, sl, cdt)
            hk = torch.cat([h[:, None, :].expand(-1, K, -1).reshape(-1, H), h])
            dw.index_add_(0, idx, coef[:, None] * hk)
        if db is not None:
            db.index_add_(0, idx, coef)
    empty = hidden.new_empty((0,))
    return (dh.to(hidden.dtype) if need_dh else empty, dw.to(weight.dtype) if need_dw else empty.clone(),
            db.to(bias.dtype) if need_db else empty.clone())


@_logit_gaps_backward_op.register_fake
def _(grad, hidden, weight, bias, ids, base, valid, inv_temp, needs):
    return (hidden.new_empty(hidden.shape) if needs[0] else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if needs[1] else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if needs[2] and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, base, valid, inv_temp, _, _, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, base, valid)
    ctx.inv_temp = inv_temp


def _backward(ctx, grad):
    hidden, weight, bias, ids, base, valid = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 10
    grads = _logit_gaps_backward_op(grad, hidden, weight, bias, ids, base, valid, ctx.inv_temp, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * 7)


torch.library.register_autograd("rlcore::gathered_logit_gaps", _backward, setup_context=_setup_context)


def multi_target_logprobs(hidden, weight, bias, targets, temperature: float, ignore_index: int, precision: str,
                          backend: str, check_targets: bool):
    """``hidden [N, H]``, ``targets [N, K]`` (validated) -> ``(logp [N, K], entropy [N])``, as ``linear_logprobs``."""
    from .logprobs import _linear_logprobs_op

    V = weight.shape[0]
    valid = targets != ignore_index                                                  # [N, K]
    safe = torch.where(valid, targets, 0).long().clamp(0, V - 1)   # indexable; bad ids raise in the gaps op
    z = gathered_logits(hidden, weight, bias, safe, 1.0 / temperature)              # [N, K], no gradient
    col = torch.where(valid, z, float("-inf")).argmax(1, keepdim=True)               # [N, 1]: the row's base slot
    base = safe.gather(1, col)[:, 0]                                                 # [N]
    rows = valid.any(1)
    hidden = torch.where(rows[:, None], hidden, 0.0)   # rows with no valid id: zeros, so a NaN there reaches no dW
    logp_b, ent, _ = _linear_logprobs_op(hidden, weight, bias, torch.where(rows, base, ignore_index),
                                         temperature, ignore_index, precision, backend, False)
    gaps = _logit_gaps_op(hidden, weight, bias, safe, base, valid, 1.0 / temperature, targets, ignore_index,
                          check_targets)                                              # [N, K]
    logp = torch.where(torch.isneginf(z), float("-inf"), gaps + logp_b[:, None])      # masked vocabulary: -inf
    return torch.where(valid, logp, 0.0), ent
