"""``linear_divergence``: per-token divergence between a student and a teacher head, from hidden states, without logits.

For every position, with ``z_S = (h_S W_S^T + b_S) / T``, ``z_T = (h_T W_T^T + b_T) / T``, ``p = softmax(z_S)`` (student)
and ``q = softmax(z_T)`` (teacher)::

    reverse_kl   KL(p || q) = sum_v p_v (log p_v - log q_v)
    forward_kl   KL(q || p) = sum_v q_v (log q_v - log p_v)
    jsd          beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

Per-row statistics ``stats [4, N]`` (saved for the backward): ``lse_S``, ``lse_T``, and two components ``c1, c2``:
for the KLs the divergence ``D`` itself and ``mu``, the mean logit gap (``E_p[z_S - z_T]`` for the reverse KL,
``E_q[z_T - z_S]`` for the forward one); ``KL(p || m)`` and ``KL(q || m)`` for the JSD (``D = beta c1 + (1-beta) c2``).

Gradients with respect to the logits of one row (``ls = log p``, ``lt = log q``, ``lm = log m``, upstream ``g``), then
times ``1 / T`` for the raw logits ``h W^T + b``::

    reverse_kl   dz_S = g p (ls - lt - D)  = g p (z_S - z_T - mu)         dz_T = g (q - p)
    forward_kl   dz_S = g (p - q)                    dz_T = g q (lt - ls - D) = g q (z_T - z_S - mu)
    jsd          dz_S = g beta p (ls - lm - c1)      dz_T = g (1 - beta) q (lt - lm - c2)

The KLs' gradients use the ``mu`` form: the normalisers cancel there analytically, so logits of 1e4 leave no
``lse_S - lse_T`` rounding (~1e-3 at that size) in the gradient of a position whose distributions are near one-hot.

Layers, bottom up (as in ``rlcore.logprobs``):
    backends      the chunked PyTorch path below (a block of rows at a time; exact, the reference of the others),
                  ``rlcore.kernels.divergence`` (Triton: one online pass over vocabulary tiles of both heads) and
                  ``csrc/divergence_cpu.cpp`` (compiled CPU, through ``rlcore.cpp``: the same pass on oneDNN GEMM tiles)
    torch ops     ``rlcore::linear_divergence`` and ``rlcore::linear_divergence_backward``, with fakes and an
                  autograd formula, so ``torch.compile(fullgraph=True)`` sees one op;
                  ``rlcore::linear_divergence_reduced``: a weighted sum whose gradients the forward forms in the same
                  pass over each block of rows
    public        ``linear_divergence``: argument checks, ``[..., H]`` flattening, the top-k support
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from typing import Optional

import torch

from . import chunked, cpp

__all__ = ["linear_divergence", "linear_divergence_reference", "teacher_topk", "opd_advantages", "support_divergence",
           "KINDS", "REDUCTIONS", "BACKENDS", "chunked_divergence_fwd", "chunked_divergence_bwd",
           "chunked_divergence_fused", "combine"]

KINDS = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "triton", "torch", "cpp")
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MIXED = ((torch.bfloat16, torch.float32), (torch.float16, torch.float32))
_FP32_MAX = torch.finfo(torch.float32).max
# Both heads' [C, V] blocks and a few temporaries are live at once: half the single-head chunk of rlcore.chunked.
CHUNK_ELEMENTS = int(os.environ.get("RLCORE_DIVERGENCE_CHUNK_ELEMENTS", chunked.CHUNK_ELEMENTS // 2))


def _kernels():
    """The Triton kernels, imported on first use (``TRITON_INTERPRET`` is read when they are decorated)."""
    return importlib.import_module(".kernels.divergence", __package__)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked PyTorch backend
# ----------------------------------------------------------------------------------------------------------------------


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _head_logits(h, w, b, valid, inv_temp):
    """``(h W^T + b) * inv_temp`` of a block of rows ``[C, V]``; rows not ``valid`` read as 0 (even if they hold NaN)."""
    h = torch.where(valid[:, None], h.to(w.dtype), 0.0)
    z = h @ w.T
    if b is not None:
        z += b
    return z.mul_(inv_temp), h


def _xlogy_diff(p, a, b):
    """``p (a - b)`` with 0 wherever ``p == 0`` (masked vocabulary, underflow): never ``0 * inf``."""
    return torch.where(p > 0, p * (a - b), 0.0)


def _log_mixture(ls, lt, beta):
    """``log(beta exp(ls) + (1 - beta) exp(lt))``."""
    return torch.logaddexp(ls + math.log(beta), lt + math.log1p(-beta))


def combine(stats: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """The divergence ``[N]`` from ``stats [4, N]`` (see the module doc)."""
    if kind == "jsd":
        return beta * stats[2] + (1.0 - beta) * stats[3]
    return stats[2]


def chunked_divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, inv_temp: float):
    """``hs [N, H_S]``, ``ws [V, H_S]``, ``ht [N, H_T]``, ``wt [V, H_T]``, biases ``[V] | None``, ``valid [N]`` bool.

    Returns ``stats [4, N]`` in the compute dtype (float64 for float64 inputs, else float32); rows not ``valid`` 0.
    """
    N, V = hs.shape[0], ws.shape[0]
    cdt = chunked.compute_dtype(hs.dtype, ws.dtype, ht.dtype, wt.dtype)
    ws, wt = ws.to(cdt), wt.to(cdt)
    bs, bt = (None if b is None else b.to(cdt) for b in (bs, bt))
    stats = torch.zeros((4, N), dtype=cdt, device=hs.device)
    step = _rows_per_chunk(V)
    for s in range(0, N, step):
        sl = slice(s, s + step)
        ok = valid[sl]
        zs, _ = _head_logits(hs[sl], ws, bs, ok, inv_temp)     # [C, V]
        zt, _ = _head_logits(ht[sl], wt, bt, ok, inv_temp)
        stats[:, sl] = torch.where(ok, _block_stats(zs, zt, kind, beta), 0.0)
        del zs, zt
    return stats


def _block_stats(zs, zt, kind: str, beta: float):
    """``stats [4, C]`` of one block of rows from both heads' logits ``[C, V]``, which it overwrites (log p, log q)."""
    lse_s, lse_t = zs.logsumexp(-1), zt.logsumexp(-1)
    gap = zs - zt if kind != "jsd" else None                # z_S - z_T
    ls, lt = zs.sub_(lse_s[:, None]), zt.sub_(lse_t[:, None])  # log p, log q, in place
    if kind == "reverse_kl":
        p = ls.exp()
        c1, c2 = _xlogy_diff(p, ls, lt).sum(-1), _xlogy_diff(p, gap, 0.0).sum(-1)
    elif kind == "forward_kl":
        q = lt.exp()
        c1, c2 = _xlogy_diff(q, lt, ls).sum(-1), _xlogy_diff(q, 0.0, gap).sum(-1)
    else:
        lm = _log_mixture(ls, lt, beta)
        c1, c2 = _xlogy_diff(ls.exp(), ls, lm).sum(-1), _xlogy_diff(lt.exp(), lt, lm).sum(-1)
    return torch.stack([lse_s, lse_t, c1, c2])


def _dz_blocks(zs, zt, g, stats_c, kind: str, beta: float, inv_temp: float, need_s: bool, need_t: bool):
    """Gradients with respect to the raw logits of both heads for one block of rows (module doc); ``None`` where
    not needed. ``zs``/``zt`` are the logits ``[C, V]``, ``g [C]`` the upstream gradient (0 on masked rows)."""
    ls, lt = zs - stats_c[0][:, None], zt - stats_c[1][:, None]
    p, q = ls.exp(), lt.exp()
    mu = stats_c[3][:, None]
    gs = g[:, None] * inv_temp
    dzs = dzt = None
    if kind == "reverse_kl":
        if need_s:
            dzs = torch.where(p > 0, p * (zs - zt - mu), 0.0) * gs
        if need_t:
            dzt = (q - p) * gs
    elif kind == "forward_kl":
        if need_s:
            dzs = (p - q) * gs
        if need_t:
            dzt = torch.where(q > 0, q * (zt - zs - mu), 0.0) * gs
    else:
        lm = _log_mixture(ls, lt, beta)
        if need_s:
            dzs = torch.where(p > 0, p * (ls - lm - stats_c[2][:, None]), 0.0) * (gs * beta)
        if need_t:
            dzt = torch.where(q > 0, q * (lt - lm - stats_c[3][:, None]), 0.0) * (gs * (1.0 - beta))
    return dzs, dzt


def _grad_buffers(hs, ws, bs, ht, wt, bt, cdt, needs: tuple) -> list:
    """Zeroed ``(dh_S, dW_S, db_S, dh_T, dW_T, db_T)`` in ``cdt``, ``None`` where not needed or there is no bias."""
    out = []
    for (h, w, b), (n_dh, n_dw, n_db) in (((hs, ws, bs), needs[:3]), ((ht, wt, bt), needs[3:])):
        out += [torch.zeros(h.shape, dtype=cdt, device=h.device) if n_dh else None,
                torch.zeros(w.shape, dtype=cdt, device=w.device) if n_dw else None,
                torch.zeros(w.shape[0], dtype=cdt, device=w.device) if (n_db and b is not None) else None]
    return out


def _add_block_grads(out: list, sl: slice, dzs, dzt, hs_c, ht_c, ws, wt, inv_temp: float) -> None:
    """Add one block of rows' gradients with respect to the scaled logits ``dz [C, V]`` (``None``: not needed),
    times ``inv_temp``, to the buffers of ``out``."""
    for i, (dz, h_c, w) in enumerate(((dzs, hs_c, ws), (dzt, ht_c, wt))):
        if dz is None:
            continue
        chunked.add_head_grads(*out[3 * i: 3 * i + 3], sl, dz.mul_(inv_temp), h_c, w)


def chunked_divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind: str, beta: float, inv_temp: float,
                           needs: tuple):
    """Gradients ``(dh_S, dW_S, db_S, dh_T, dW_T, db_T)`` in the compute dtype, ``None`` where ``needs`` (six bools,
    same order) is False or there is no bias. Recomputes both heads' logits per block of rows."""
    V = ws.shape[0]
    cdt = stats.dtype
    ws, wt = ws.to(cdt), wt.to(cdt)
    bs, bt = (None if b is None else b.to(cdt) for b in (bs, bt))
    g = torch.where(valid, grad.to(cdt), 0.0)               # masked rows carry no gradient, even a NaN one
    need_s, need_t = any(needs[:3]), any(needs[3:])
    out = _grad_buffers(hs, ws, bs, ht, wt, bt, cdt, needs)
    step = _rows_per_chunk(V)
    for s in range(0, hs.shape[0], step):
        sl = slice(s, s + step)
        ok = valid[sl]
        zs, hs_c = _head_logits(hs[sl], ws, bs, ok, inv_temp)
        zt, ht_c = _head_logits(ht[sl], wt, bt, ok, inv_temp)
        dzs, dzt = _dz_blocks(zs, zt, g[sl], stats[:, sl], kind, beta, 1.0, need_s, need_t)
        del zs, zt
        _add_block_grads(out, sl, dzs, dzt, hs_c, ht_c, ws, wt, inv_temp)
        del dzs, dzt
    return tuple(out)


def _kept(zs, zt, keep: bool):
    """The logits for ``_block_stats`` (which overwrites them): copies when the gradient step still needs them."""
    return (zs.clone(), zt.clone()) if keep else (zs, zt)


def chunked_divergence_fused(weights, hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, inv_temp: float,
                             needs: tuple):
    """``(stats [4, N], dh_S, dW_S, db_S, dh_T, dW_T, db_T)``: the forward's statistics and the gradients of
    ``sum_i weights_i D_i`` (``weights [N]``, known in the forward) in one pass over blocks of rows, each block's
    logits formed once (four GEMMs to the separate forward and backward's six)."""
    N, V = hs.shape[0], ws.shape[0]
    cdt = chunked.compute_dtype(hs.dtype, ws.dtype, ht.dtype, wt.dtype)
    ws, wt = ws.to(cdt), wt.to(cdt)
    bs, bt = (None if b is None else b.to(cdt) for b in (bs, bt))
    g = torch.where(valid, weights.to(cdt), 0.0)
    need_s, need_t = any(needs[:3]), any(needs[3:])
    stats = torch.zeros((4, N), dtype=cdt, device=hs.device)
    out = _grad_buffers(hs, ws, bs, ht, wt, bt, cdt, needs)
    step = _rows_per_chunk(V)
    for s in range(0, N, step):
        sl = slice(s, s + step)
        ok = valid[sl]
        zs, hs_c = _head_logits(hs[sl], ws, bs, ok, inv_temp)
        zt, ht_c = _head_logits(ht[sl], wt, bt, ok, inv_temp)
        st = torch.where(ok, _block_stats(*_kept(zs, zt, need_s or need_t), kind, beta), 0.0)
        stats[:, sl] = st
        if need_s or need_t:
            dzs, dzt = _dz_blocks(zs, zt, g[sl], st, kind, beta, 1.0, need_s, need_t)
            _add_block_grads(out, sl, dzs, dzt, hs_c, ht_c, ws, wt, inv_temp)
        del zs, zt
    return (stats, *out)


def _divergence_from_logprobs(ls, lt, kind: str, beta: float):
    """The divergence of each row of log-probabilities ``ls`` (student) and ``lt`` (teacher), ``[..., V]``:
    differentiable plain PyTorch, for the materialised reference and the top-k support."""
    if kind == "reverse_kl":
        return _xlogy_diff(ls.exp(), ls, lt).sum(-1)
    if kind == "forward_kl":
        return _xlogy_diff(lt.exp(), lt, ls).sum(-1)
    lm = _log_mixture(ls, lt, beta)
    return beta * _xlogy_diff(ls.exp(), ls, lm).sum(-1) + (1.0 - beta) * _xlogy_diff(lt.exp(), lt, lm).sum(-1)


def linear_divergence_reference(hidden, weight, teacher_hidden, teacher_weight, *, kind="reverse_kl", beta=0.5,
                                temperature=1.0, bias=None, teacher_bias=None, mask=None, top_k=None,
                                compute_dtype: Optional[torch.dtype] = torch.float64,
                                softmax_dtype: torch.dtype = torch.float32):
    """The materialised reference of ``linear_divergence``: both ``[..., V]`` logit tensors, for tests and baselines.

    ``compute_dtype`` is the head GEMMs' dtype (``None``: the inputs' own, what a trainer does today); the softmax math
    runs in at least ``softmax_dtype``. With ``top_k``, the support is the teacher's ``top_k`` largest logits."""
    def logits(h, w, b):
        dtype = compute_dtype or h.dtype
        z = torch.nn.functional.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
        return z.to(torch.promote_types(z.dtype, softmax_dtype)) / temperature

    zs, zt = logits(hidden, weight, bias), logits(teacher_hidden, teacher_weight, teacher_bias)
    if top_k is not None:
        ids = zt.detach().topk(top_k, dim=-1).indices
        zs, zt = zs.gather(-1, ids), zt.gather(-1, ids)
    div = _divergence_from_logprobs(zs.log_softmax(-1), zt.log_softmax(-1), kind, beta)
    if mask is not None:
        div = torch.where(mask, div, 0.0)
    return div


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------


def _modes(hs, ws, ht, wt, kind: str):
    """Each head's Triton ``KernelMode`` for pass ``kind``: ``linear_logprobs``'s mapping at ``precision="default"``."""
    from .logprobs import _kernel_mode

    return _kernel_mode("default", hs.dtype, ws.dtype, kind), _kernel_mode("default", ht.dtype, wt.dtype, kind)


def _out_dtype(*tensors) -> torch.dtype:
    return chunked.compute_dtype(*(t.dtype for t in tensors))


@torch.library.custom_op("rlcore::linear_divergence", mutates_args=())
@chunked.autocast_off
def _linear_divergence_op(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    valid: torch.Tensor, kind: str, beta: float, temperature: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hs [N, H_S]``, ``ws [V, H_S]``, ``ht [N, H_T]``, ``wt [V, H_T]``, ``valid [N]`` -> ``(div [N], stats [4, N])``.

    ``stats`` (``lse_S, lse_T, c1, c2``) is a separate, non-differentiable output for the backward."""
    N = hs.shape[0]
    dtype = _out_dtype(hs, ws, ht, wt)
    if N == 0:
        return hs.new_empty((0,), dtype=dtype), hs.new_empty((4, 0), dtype=dtype)
    if backend == "triton":
        stats = _kernels().divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind, beta, 1.0 / temperature,
                                          _modes(hs, ws, ht, wt, "fwd"))
    elif backend == "cpp":
        stats = cpp.divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind, beta, 1.0 / temperature)
    else:
        stats = chunked_divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind, beta, 1.0 / temperature)
    return torch.where(valid, combine(stats, kind, beta), 0.0), stats


@_linear_divergence_op.register_fake
def _(hs, ws, bs, ht, wt, bt, valid, kind, beta, temperature, backend):
    dtype = _out_dtype(hs, ws, ht, wt)
    n = hs.shape[0]
    return hs.new_empty((n,), dtype=dtype), hs.new_empty((4, n), dtype=dtype)


@torch.library.custom_op("rlcore::linear_divergence_backward", mutates_args=())
@chunked.autocast_off
def _linear_divergence_backward_op(
    grad: torch.Tensor,
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    valid: torch.Tensor, stats: torch.Tensor, kind: str, beta: float, temperature: float, backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh_S, dW_S, db_S, dh_T, dW_T, db_T)``, contiguous, each in its input's dtype; a gradient not asked for
    (``needs[i]`` False, or no bias) is an empty ``[0]`` tensor."""
    inputs = (hs, ws, bs, ht, wt, bt)
    needs = tuple(bool(n) and x is not None for n, x in zip(needs, inputs))
    if hs.shape[0] == 0:
        grads = tuple(x.new_zeros(x.shape) if n else None for n, x in zip(needs, inputs))
    elif backend == "triton":
        grads = _kernels().divergence_bwd(grad.contiguous(), hs, ws, bs, ht, wt, bt, valid, stats, kind, beta,
                                          1.0 / temperature, needs, _modes(hs, ws, ht, wt, "bwd"))
    elif backend == "cpp":
        grads = cpp.divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind, beta, 1.0 / temperature, needs)
    else:
        grads = chunked_divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind, beta, 1.0 / temperature,
                                       needs)
    return tuple(g.to(x.dtype).contiguous() if n else hs.new_empty((0,)) for g, n, x in zip(grads, needs, inputs))


@_linear_divergence_backward_op.register_fake
def _(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind, beta, temperature, backend, needs):
    inputs = (hs, ws, bs, ht, wt, bt)
    return tuple(x.new_empty(x.shape) if (n and x is not None) else hs.new_empty((0,)) for n, x in zip(needs, inputs))


def _setup_context(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, valid, kind, beta, temperature, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid, output[1])
    ctx.args = (kind, beta, temperature, backend)


def _backward(ctx, grad, _grad_stats):
    hs, ws, bs, ht, wt, bt, valid, stats = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    if grad is None or not any(needs):
        return (None,) * 11
    grads = _linear_divergence_backward_op(grad, hs, ws, bs, ht, wt, bt, valid, stats, *ctx.args, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * 5)


torch.library.register_autograd("rlcore::linear_divergence", _backward, setup_context=_setup_context)


@torch.library.custom_op("rlcore::linear_divergence_reduced", mutates_args=())
@chunked.autocast_off
def _linear_divergence_reduced_op(
    hs: torch.Tensor, ws: torch.Tensor, bs: Optional[torch.Tensor],
    ht: torch.Tensor, wt: torch.Tensor, bt: Optional[torch.Tensor],
    valid: torch.Tensor, weights: torch.Tensor, kind: str, beta: float, temperature: float, backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """``(loss [], div [N], dh_S, dW_S, db_S, dh_T, dW_T, db_T)``: ``loss = sum_i weights_i div_i`` and its gradients
    in the compute dtype (the backward scales them, then rounds once to each input's dtype; an empty ``[0]`` where
    ``needs[i]`` is False or there is no bias), all from the forward: on the chunked (``backend="torch"``) and compiled
    CPU (``"cpp"``) backends, one pass over blocks of rows forms each block's logits once (four GEMMs). ``div`` and
    the gradients are outputs without gradients of their own."""
    inputs = (hs, ws, bs, ht, wt, bt)
    needs = tuple(bool(n) and x is not None for n, x in zip(needs, inputs))
    dtype = _out_dtype(hs, ws, ht, wt)
    w = torch.where(valid, weights.to(dtype), 0.0)
    if hs.shape[0] == 0:
        stats = hs.new_zeros((4, 0), dtype=dtype)
        grads = tuple(x.new_zeros(x.shape, dtype=dtype) if n else None for n, x in zip(needs, inputs))
    else:
        fused = cpp.divergence_fused if backend == "cpp" else chunked_divergence_fused
        stats, *grads = fused(w, hs, ws, bs, ht, wt, bt, valid, kind, beta, 1.0 / temperature, needs)
    div = torch.where(valid, combine(stats, kind, beta), 0.0).to(dtype)
    grads = tuple(g.to(dtype).contiguous() if n else hs.new_empty((0,), dtype=dtype)
                  for g, n in zip(grads, needs))
    return ((w * div).sum(), div, *grads)


@_linear_divergence_reduced_op.register_fake
def _(hs, ws, bs, ht, wt, bt, valid, weights, kind, beta, temperature, backend, needs):
    dtype = _out_dtype(hs, ws, ht, wt)
    inputs = (hs, ws, bs, ht, wt, bt)
    grads = tuple(x.new_empty(x.shape, dtype=dtype) if (n and x is not None) else hs.new_empty((0,), dtype=dtype)
                  for n, x in zip(needs, inputs))
    return (hs.new_empty((), dtype=dtype), hs.new_empty((hs.shape[0],), dtype=dtype), *grads)


def _setup_reduced(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)     # no zero [V, H] stand-ins for the gradient outputs' own (absent) gradients
    ctx.save_for_backward(*output[2:])
    ctx.dtypes = [None if x is None else x.dtype for x in inputs[:6]]


def _backward_reduced(ctx, grad, *_):
    needs = ctx.needs_input_grad[:6]
    grads = ((g * grad.to(g.dtype)).to(dt) if (n and grad is not None) else None
             for g, n, dt in zip(ctx.saved_tensors, needs, ctx.dtypes))
    return (*grads, *(None,) * 7)


torch.library.register_autograd("rlcore::linear_divergence_reduced", _backward_reduced, setup_context=_setup_reduced)


# ----------------------------------------------------------------------------------------------------------------------
# Top-k support
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@chunked.autocast_off
def teacher_topk(ht, wt, bt, valid, k: int, inv_temp: float) -> torch.Tensor:
    """``ids [N, k]``: the teacher's ``k`` largest logits at each position (ties in ``torch.topk``'s order), found a
    block of rows at a time; rows not ``valid`` give id 0."""
    N = ht.shape[0]
    cdt = chunked.compute_dtype(ht.dtype, wt.dtype)
    wt, bt = wt.to(cdt), (None if bt is None else bt.to(cdt))
    ids = torch.zeros((N, k), dtype=torch.long, device=ht.device)
    step = _rows_per_chunk(wt.shape[0])
    for s in range(0, N, step):
        sl = slice(s, s + step)
        zt, _ = _head_logits(ht[sl], wt, bt, valid[sl], inv_temp)
        ids[sl] = torch.where(valid[sl, None], zt.topk(k, dim=-1).indices, 0)
        del zt
    return ids


def _topk_divergence(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, temperature: float, k: int,
                     backend: str):
    """The divergence over the teacher's top-``k`` support, both distributions renormalised there: the ``k``
    log-probs of each head come from multi-target ``linear_logprobs`` (one pass per head, no logits), the rest is
    ``[N, k]`` PyTorch, differentiated by autograd."""
    from .logprobs import linear_logprobs

    ignore = -1
    ids = torch.where(valid[:, None], teacher_topk(ht, wt, bt, valid, k, 1.0 / temperature), ignore)
    rows = valid[:, None]
    lp = [linear_logprobs(torch.where(rows, h, 0.0), w, ids, bias=b, temperature=temperature, ignore_index=ignore,
                          backend=backend, check_targets=False)                     # masked rows: zeros, not NaN
          for h, w, b in ((hs, ws, bs), (ht, wt, bt))]
    return support_divergence(lp[0], lp[1], kind=kind, beta=beta, mask=valid)


def support_divergence(logp: torch.Tensor, teacher_logp: torch.Tensor, *, kind: str = "reverse_kl", beta: float = 0.5,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The divergence on a ``K``-id support at each position, ``[..., K] -> [...]``: both distributions renormalised
    there (``log_softmax`` over the last dimension), then ``kind`` as in :func:`linear_divergence`. This is the
    definition of ``linear_divergence(top_k=K)``, whose support is the teacher's top-``K`` ids; here the support is
    whatever the ids behind ``logp`` and ``teacher_logp`` are (a served teacher's top-k ids and log-probs, and the
    student's log-probs of the same ids from multi-target ``rlcore.linear_logprobs(targets=[..., K])``). The inputs'
    normalisation does not matter. ``mask`` (``[...]`` bool): False gives 0 and no gradient, even where the inputs
    hold NaN. Differentiable plain PyTorch in both inputs (detach ``teacher_logp`` for a fixed teacher)."""
    for name, x in (("logp", logp), ("teacher_logp", teacher_logp)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(f"{name} must be a floating-point tensor [..., K], got {type(x).__name__}")
    if teacher_logp.shape != logp.shape or logp.shape[-1] == 0:
        raise ValueError(f"teacher_logp must have logp's shape [..., K] = {tuple(logp.shape)} with K >= 1, got "
                         f"{tuple(teacher_logp.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != tuple(logp.shape[:-1])):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(logp.shape[:-1])}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask is not None:
        logp, teacher_logp = (torch.where(mask[..., None], x, 0.0) for x in (logp, teacher_logp))
    ls, lt = logp.log_softmax(-1), teacher_logp.log_softmax(-1)                       # renormalised there
    div = _divergence_from_logprobs(ls, lt, kind, beta)
    return div if mask is None else torch.where(mask, div, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# On-policy distillation
# ----------------------------------------------------------------------------------------------------------------------


def opd_advantages(logp: torch.Tensor, teacher_logp: torch.Tensor, kl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token advantages of on-policy distillation, ``A_t = sg(r_t - b_t)``, for ``rlcore.policy_loss(logp, A,
    mask, loss_type="reinforce")``, whose ``c_t = -A_t l_t`` is then the OPD term ``-sg(r_t - b_t) l_t``.

    ``r_t = log pi_T(y_t) - log pi_S(y_t)`` (``teacher_logp - logp``, both ``[...]``, e.g. from ``linear_logprobs``);
    ``b_t = -kl``: the vOPD control variate, ``kl`` the per-token reverse KL ``KL(p_S || p_T)`` from
    ``linear_divergence`` (full vocabulary, or ``top_k``); ``None``: no baseline. Everything is detached: the
    baseline's expectation under the student is 0, so it lowers the variance without biasing the gradient.
    """
    if not isinstance(logp, torch.Tensor) or not isinstance(teacher_logp, torch.Tensor):
        raise TypeError("logp and teacher_logp must be tensors")
    if teacher_logp.shape != logp.shape or (kl is not None and kl.shape != logp.shape):
        raise ValueError(f"teacher_logp and kl must have logp's shape {tuple(logp.shape)}, got "
                         f"{tuple(teacher_logp.shape)} and {None if kl is None else tuple(kl.shape)}")
    adv = teacher_logp.detach() - logp.detach()
    return adv if kl is None else adv + kl.detach().to(adv.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------------


def _check_head(prefix: str, hidden, weight, bias) -> None:
    """Types, dtypes and shapes of one head (``prefix`` is "" for the student, "teacher_" for the teacher)."""
    names = (f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias")
    for name, x in zip(names, (hidden, weight, bias)):
        if x is None and name.endswith("bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name.endswith('bias') else ''}, "
                            f"got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{names[0]} must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{names[1]} must have shape [V, H] with H = {names[0]}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{names[1]} must have at least one row (V >= 1)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{names[2]} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    pair = (hidden.dtype, weight.dtype)
    if pair[0] != pair[1] and pair not in _MIXED and torch.float64 not in pair:
        raise TypeError(f"{names[0]} ({hidden.dtype}) and {names[1]} ({weight.dtype}) must share a dtype, or be "
                        "bf16/fp16 hidden states with a float32 head")


def _check_inputs(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask, kind, beta, temperature,
                  top_k, backend) -> str:
    """Validate everything that can be checked from metadata; returns the resolved backend."""
    _check_head("", hidden, weight, bias)
    _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if tuple(teacher_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden must have the student's positions, shape {tuple(hidden.shape[:-1])} + [H_T], "
                         f"got {tuple(teacher_hidden.shape)}")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher_weight must have the student's vocabulary, V = weight.shape[0] = {weight.shape[0]} "
                         f"rows, got {teacher_weight.shape[0]}")
    for name, x in (("weight", weight), ("bias", bias), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias), ("mask", mask)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}; inputs must share a device")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor or None, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"mask must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                             f"got {tuple(mask.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a Python float, got {type(beta).__name__}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd' (at 0 or 1 the JSD is identically 0), got {beta}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0 and 1.0 / temperature < _FP32_MAX):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if not 1 <= top_k <= weight.shape[0]:
            raise ValueError(f"top_k must be in [1, V] = [1, {weight.shape[0]}], got {top_k}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fp64 = torch.float64 in (hidden.dtype, weight.dtype, teacher_hidden.dtype, teacher_weight.dtype)
    if backend == "auto":
        # CPU: the compiled backend, which runs the chunked path itself where it cannot be built (decided where the op
        # runs, never while torch.compile traces this function).
        return "torch" if fp64 else {"cuda": "triton", "cpu": "cpp"}.get(hidden.device.type, "torch")
    if backend == "cpp":
        if fp64:
            raise TypeError("backend='cpp' does not take float64 inputs; use backend='torch' (or 'auto')")
        if hidden.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors (got {hidden.device}); use backend='auto' or 'triton'")
    if backend == "triton":
        if fp64:
            raise TypeError("backend='triton' does not take float64 inputs; use backend='torch' (or 'auto')")
        from .kernels.common import is_interpreter     # on first use: importing rlcore imports no Triton

        if hidden.device.type != "cuda" and not is_interpreter():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {hidden.device}), or TRITON_INTERPRET=1 set "
                             "before rlcore's kernels are first imported")
    return backend


def linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    teacher_grad: bool = False,
    reduction: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token divergence between the student's and the teacher's next-token distributions, in FP32, from hidden
    states: neither ``[N, V]`` logit matrix is ever formed (see the module doc for the math).

    Args:
        hidden: ``[..., H_S]`` the student's final hidden states (bf16, fp16, fp32; float64 on the torch backend).
        weight: ``[V, H_S]`` the student's LM head.
        teacher_hidden: ``[..., H_T]`` the teacher's hidden states at the same positions (``H_T`` may differ).
        teacher_weight: ``[V, H_T]`` the teacher's LM head, over the same vocabulary.
        kind: ``"reverse_kl"`` (``KL(p_S || p_T)``, what on-policy distillation minimises), ``"forward_kl"``
            (``KL(p_T || p_S)``) or ``"jsd"`` (``beta KL(p_S || m) + (1 - beta) KL(p_T || m)``,
            ``m = beta p_S + (1 - beta) p_T``).
        beta: the JSD's mixture weight, in ``(0, 1)``; unused by the KLs.
        temperature: both heads' logits are divided by it.
        bias, teacher_bias: optional ``[V]`` biases of the heads.
        mask: optional ``[...]`` bool; positions where it is False give 0 and no gradient (even holding NaN).
        top_k: restrict both distributions to the teacher's ``top_k`` most probable ids at each position and
            renormalise them there before taking the divergence (``None``: the full vocabulary).
        teacher_grad: also differentiate through the teacher's tensors (by default they are detached).
        reduction: ``"none"`` (the per-token ``[...]``), ``"sum"`` or ``"mean"`` (over the positions ``mask`` keeps; 0
            when it keeps none): a 0-d loss. Reduced on the chunked and compiled CPU backends, the
            full-vocabulary divergence forms its gradients in the forward, in the same pass over each block of rows
            as the values, when a gradient is needed (four GEMMs of the heads instead of six); the backward then only
            scales them. Triton keeps its online forward and backward kernels (the per-token op, reduced).
        backend: ``"auto"`` (Triton on CUDA; on CPU the compiled ``"cpp"`` backend, or the chunked PyTorch path where
            it cannot be built; float64: the chunked path), ``"triton"``, ``"torch"`` or ``"cpp"`` (CPU; with
            ``top_k`` the support's log-probs come from ``linear_logprobs`` on the same backend).

    Returns:
        ``div [...]`` float32 (float64 for float64 inputs), differentiable in ``hidden``, ``weight`` and ``bias``;
        a 0-d tensor of that dtype with ``reduction="sum"`` or ``"mean"``.

    Example::

        >>> hs, Ws = torch.randn(4, 7, 64), torch.randn(1000, 64)
        >>> ht, Wt = torch.randn(4, 7, 96), torch.randn(1000, 96)
        >>> linear_divergence(hs, Ws, ht, Wt, kind="jsd", beta=0.3).shape
        torch.Size([4, 7])
    """
    backend = _check_inputs(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask, kind, beta,
                            temperature, top_k, backend)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not teacher_grad:
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    lead = hidden.shape[:-1]
    n = math.prod(lead)
    hs = hidden.reshape(n, hidden.shape[-1])
    ht = teacher_hidden.reshape(n, teacher_hidden.shape[-1])
    valid = mask.reshape(n) if mask is not None else torch.ones(n, dtype=torch.bool, device=hidden.device)
    if top_k is not None:
        div = _topk_divergence(hs, weight, bias, ht, teacher_weight, teacher_bias, valid, kind, float(beta),
                              float(temperature), int(top_k), backend)
    elif reduction != "none" and backend in ("torch", "cpp"):
        return _reduced(hs, weight, bias, ht, teacher_weight, teacher_bias, valid, kind, float(beta),
                        float(temperature), backend, reduction)
    else:
        div, _ = _linear_divergence_op(hs, weight, bias, ht, teacher_weight, teacher_bias, valid, kind, float(beta),
                                       float(temperature), backend)
    if reduction == "sum":
        return div.sum()
    if reduction == "mean":
        return div.sum() / valid.sum().clamp(min=1)
    return div.view(lead)


def _reduced(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, temperature: float, backend: str,
             reduction: str) -> torch.Tensor:
    """``sum`` or ``mean`` of the full-vocabulary divergence through ``rlcore::linear_divergence_reduced``."""
    weights = valid.to(_out_dtype(hs, ws, ht, wt))
    if reduction == "mean":
        weights = weights / valid.sum().clamp(min=1)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x is not None and x.requires_grad for x in (hs, ws, bs, ht, wt, bt)]
    return _linear_divergence_reduced_op(hs, ws, bs, ht, wt, bt, valid, weights, kind, beta, temperature, backend,
                                         needs)[0]
