"""Triton kernels for the fused two-head divergence (``rlcore.linear_divergence``): student and teacher logit tiles are
formed side by side and folded at once, so neither ``[N, V]`` logit matrix exists. Math: ``rlcore/divergence.py``.

Forward (``_fwd_kernel``): ``cdiv(N, BLOCK_N) x SPLITS`` programs, as in ``linear_logprobs``'s forward; program
``(i_n, i_s)`` streams its vocabulary span in ``BLOCK_V`` tiles. Each step forms the student tile ``z_S`` (one GEMM
over ``H_S``) and the teacher tile ``z_T`` (one over ``H_T``; the hidden sizes may differ) and folds them into an
online state per row and head::

    m_S, s_S   running max and sum_v exp(z_S - m_S)                     (log-sum-exp of the student)
    m_T, s_T   the same for the teacher
    a          sum_v exp(z_S - m_S) (z_S - z_T)    reverse KL: KL(p||q) = a / s_S - lse_S + lse_T
               sum_v exp(z_T - m_T) (z_T - z_S)    forward KL: KL(q||p) = a / s_T - lse_T + lse_S

``a`` is rescaled with its head's ``s`` when the max moves; ``z_S - z_T`` does not depend on it. The span states
``[5, SPLITS, N]`` are merged by device-side torch ops (``_merge``). The JSD needs both normalisers before it can form
``log m``, so its forward takes a second pass (``_jsd_kernel``) over the same tiles with ``lse_S, lse_T`` known, summing
``KL(p||m)`` and ``KL(q||m)`` per span.

Backward: per vocabulary slice of ``C`` columns (``C`` as in ``linear_logprobs``'s backward), ``_dz_kernel`` recomputes
both tiles from the saved ``lse_S, lse_T`` and writes ``dz_S`` and/or ``dz_T`` (the formulas of ``rlcore/divergence.py``)
to ``[N, C]`` buffers in each head's GEMM dtype; ``linear_logprobs``'s ``_matmul`` then computes ``dW[slice] = dz^T h``
and ``dh += dz W[slice]`` per head. No atomics: deterministic. Masked rows load as zeros and get ``dz = 0``; the host
zeroes their hidden states before the ``dW`` GEMM, so a NaN there never reaches a gradient.

Row offsets are int64 (``N H`` and ``V H`` beyond 2^31 are safe); the kernels' tile helpers are ``linear_logprobs``'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import is_interpreter
from .linear_logprobs import (KernelConfig, KernelMode, _grouped_pid, _logits_tile, _matmul, _round_bf16,
                              _vocab_slice, _vocab_span)

__all__ = ["FWD_CONFIGS", "DZ_CONFIGS", "CONFIGS", "KIND_IDS", "default_config", "divergence_fwd", "divergence_bwd",
           "is_interpreter"]

KIND_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


@triton.jit
def _lse_update(b_m, b_s, b_z):
    """Fold a tile ``b_z [BLOCK_N, BLOCK_V]`` into a running ``(max, sum exp)``; returns the new pair and the
    rescale factor ``alpha`` of the old sums and the reference point. All -inf tiles are safe (reference 0)."""
    b_m_new = tl.maximum(b_m, tl.max(b_z, 1))
    b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp(b_m - b_ref)
    b_e = tl.exp(b_z - b_ref[:, None])
    return b_m_new, b_s * b_alpha + tl.sum(b_e, 1), b_alpha, b_e


@triton.jit
def _fwd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, valid_ptr, part_ptr,
    N, V, HS, HT, SPAN, SPLITS,
    stride_hsn, stride_hsh, stride_wsv, stride_wsh, stride_htn, stride_hth, stride_wtv, stride_wth,
    inv_temp,
    KIND: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    CAST_S: tl.constexpr, CAST_T: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Span states ``part [5, SPLITS, N]``: ``m_S, s_S, m_T, s_T, a`` (``a`` per ``KIND``, 0 for the JSD); the host
    turns ``a / s`` into ``mu`` and the divergence."""
    i_n, i_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLITS, GROUP)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_row = m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)

    b_ms = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_mt = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_st = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_a = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_start = i_s * SPAN
    v_end = tl.minimum(v_start + SPAN, V)
    if tl.max(m_row.to(tl.int32), 0) > 0:   # a block of masked rows: no GEMM; the host zeroes its outputs
        for v0 in range(v_start, v_end, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < v_end
            b_zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, o_n, o_v, m_row, m_v, HS,
                                stride_hsn, stride_hsh, stride_wsv, stride_wsh, inv_temp,
                                HAS_BIAS_S, CAST_S, DOT_S, UPCAST_S, BLOCK_N, BLOCK_V, BLOCK_H)
            b_zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, o_n, o_v, m_row, m_v, HT,
                                stride_htn, stride_hth, stride_wtv, stride_wth, inv_temp,
                                HAS_BIAS_T, CAST_T, DOT_T, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_H)
            b_ms, b_ss, b_as, b_es = _lse_update(b_ms, b_ss, b_zs)
            b_mt, b_st, b_at, b_et = _lse_update(b_mt, b_st, b_zt)
            if KIND == 0:
                b_a = b_a * b_as + tl.sum(tl.where(b_es > 0, b_es * (b_zs - b_zt), 0.0), 1)
            elif KIND == 1:
                b_a = b_a * b_at + tl.sum(tl.where(b_et > 0, b_et * (b_zt - b_zs), 0.0), 1)

    p_part = part_ptr + i_s.to(tl.int64) * N + o_n
    stride_part = tl.cast(SPLITS, tl.int64) * N
    tl.store(p_part, b_ms, mask=m_n)
    tl.store(p_part + stride_part, b_ss, mask=m_n)
    tl.store(p_part + 2 * stride_part, b_mt, mask=m_n)
    tl.store(p_part + 3 * stride_part, b_st, mask=m_n)
    tl.store(p_part + 4 * stride_part, b_a, mask=m_n)


@triton.jit
def _log_mixture(b_ls, b_lt, log_beta, log_1mbeta):
    """``log(beta exp(ls) + (1 - beta) exp(lt))``, stable, -inf where both are -inf."""
    b_x = b_ls + log_beta
    b_y = b_lt + log_1mbeta
    b_hi = tl.maximum(b_x, b_y)
    b_lo = tl.minimum(b_x, b_y)
    b_hi_safe = tl.where(b_hi == float("-inf"), 0.0, b_hi)
    return b_hi + tl.log(1.0 + tl.exp(b_lo - b_hi_safe))


@triton.jit
def _jsd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, valid_ptr, stats_ptr, part_ptr,
    N, V, HS, HT, SPAN, SPLITS,
    stride_hsn, stride_hsh, stride_wsv, stride_wsh, stride_htn, stride_hth, stride_wtv, stride_wth,
    inv_temp, log_beta, log_1mbeta,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    CAST_S: tl.constexpr, CAST_T: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """The JSD's second pass: per span, ``part [2, SPLITS, N]`` = partial ``KL(p||m)`` and ``KL(q||m)`` given the
    normalisers ``stats[0] = lse_S`` and ``stats[1] = lse_T``."""
    i_n, i_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLITS, GROUP)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_row = m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)
    b_c1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_c2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = i_s * SPAN
    v_end = tl.minimum(v_start + SPAN, V)
    if tl.max(m_row.to(tl.int32), 0) > 0:
        b_lse_s = tl.load(stats_ptr + o_n, mask=m_row, other=0.0)
        b_lse_t = tl.load(stats_ptr + N + o_n, mask=m_row, other=0.0)
        for v0 in range(v_start, v_end, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < v_end
            b_ls = _logits_tile(hs_ptr, ws_ptr, bs_ptr, o_n, o_v, m_row, m_v, HS,
                                stride_hsn, stride_hsh, stride_wsv, stride_wsh, inv_temp,
                                HAS_BIAS_S, CAST_S, DOT_S, UPCAST_S, BLOCK_N, BLOCK_V, BLOCK_H) - b_lse_s[:, None]
            b_lt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, o_n, o_v, m_row, m_v, HT,
                                stride_htn, stride_hth, stride_wtv, stride_wth, inv_temp,
                                HAS_BIAS_T, CAST_T, DOT_T, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_H) - b_lse_t[:, None]
            b_lm = _log_mixture(b_ls, b_lt, log_beta, log_1mbeta)
            b_p = tl.exp(b_ls)
            b_q = tl.exp(b_lt)
            b_c1 += tl.sum(tl.where(b_p > 0, b_p * (b_ls - b_lm), 0.0), 1)
            b_c2 += tl.sum(tl.where(b_q > 0, b_q * (b_lt - b_lm), 0.0), 1)
    p_part = part_ptr + i_s.to(tl.int64) * N + o_n
    stride_part = tl.cast(SPLITS, tl.int64) * N
    tl.store(p_part, b_c1, mask=m_n)
    tl.store(p_part + stride_part, b_c2, mask=m_n)


@triton.jit
def _dz_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, valid_ptr, stats_ptr, g_ptr, dzs_ptr, dzt_ptr,
    N, V, HS, HT, v_start, VC,
    stride_hsn, stride_hsh, stride_wsv, stride_wsh, stride_htn, stride_hth, stride_wtv, stride_wth,
    inv_temp, beta, log_beta, log_1mbeta,
    KIND: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    CAST_S: tl.constexpr, CAST_T: tl.constexpr, DOT_S: tl.constexpr, DOT_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """``dz_S`` and/or ``dz_T [N, VC]`` (contiguous) of the vocabulary slice ``[v_start, v_start + VC)``: gradients
    with respect to the raw logits ``h W^T + b`` of both heads, from the saved ``stats [4, N]``."""
    i_n, i_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    o_v = v_start + o_c
    m_n = o_n < N
    m_c = o_c < VC
    m_v = m_c & (o_v < V)
    m_row = m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)
    b_dzs = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    b_dzt = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(m_row.to(tl.int32), 0) > 0:
        b_g = tl.load(g_ptr + o_n, mask=m_row, other=0.0).to(tl.float32) * inv_temp
        b_lse_s = tl.load(stats_ptr + o_n, mask=m_row, other=0.0)
        b_lse_t = tl.load(stats_ptr + N + o_n, mask=m_row, other=0.0)
        b_c1 = tl.load(stats_ptr + 2 * N + o_n, mask=m_row, other=0.0)
        b_c2 = tl.load(stats_ptr + 3 * N + o_n, mask=m_row, other=0.0)
        b_zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, o_n, o_v, m_row, m_v, HS,
                            stride_hsn, stride_hsh, stride_wsv, stride_wsh, inv_temp,
                            HAS_BIAS_S, CAST_S, DOT_S, UPCAST_S, BLOCK_N, BLOCK_V, BLOCK_H)
        b_zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, o_n, o_v, m_row, m_v, HT,
                            stride_htn, stride_hth, stride_wtv, stride_wth, inv_temp,
                            HAS_BIAS_T, CAST_T, DOT_T, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_H)
        b_ls = b_zs - b_lse_s[:, None]
        b_lt = b_zt - b_lse_t[:, None]
        b_p = tl.where(m_row[:, None], tl.exp(b_ls), 0.0)
        b_q = tl.where(m_row[:, None], tl.exp(b_lt), 0.0)
        if KIND == 0:     # reverse KL, c2 = mu = E_p[z_S - z_T]
            if NEED_S:
                b_dzs = tl.where(b_p > 0, b_p * (b_zs - b_zt - b_c2[:, None]), 0.0) * b_g[:, None]
            if NEED_T:
                b_dzt = (b_q - b_p) * b_g[:, None]
        elif KIND == 1:   # forward KL, c2 = mu = E_q[z_T - z_S]
            if NEED_S:
                b_dzs = (b_p - b_q) * b_g[:, None]
            if NEED_T:
                b_dzt = tl.where(b_q > 0, b_q * (b_zt - b_zs - b_c2[:, None]), 0.0) * b_g[:, None]
        else:             # JSD, c1 = KL(p||m), c2 = KL(q||m)
            b_lm = _log_mixture(b_ls, b_lt, log_beta, log_1mbeta)
            if NEED_S:
                b_dzs = tl.where(b_p > 0, b_p * (b_ls - b_lm - b_c1[:, None]), 0.0) * (b_g * beta)[:, None]
            if NEED_T:
                b_dzt = tl.where(b_q > 0, b_q * (b_lt - b_lm - b_c2[:, None]), 0.0) * (b_g * (1.0 - beta))[:, None]
    p_dz = o_n[:, None].to(tl.int64) * VC + o_c[None, :]
    m_dz = m_n[:, None] & m_c[None, :]
    if NEED_S:
        if UPCAST_S:
            b_dzs = _round_bf16(b_dzs)  # the interpreter's store to bf16 truncates; the GPU's rounds to nearest
        tl.store(dzs_ptr + p_dz, b_dzs.to(dzs_ptr.dtype.element_ty), mask=m_dz)
    if NEED_T:
        if UPCAST_T:
            b_dzt = _round_bf16(b_dzt)
        tl.store(dzt_ptr + p_dz, b_dzt.to(dzt_ptr.dtype.element_ty), mask=m_dz)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------------

# Two logit tiles live at once (and, in the JSD and backward, their log-probabilities), so the tiles are smaller than
# the single-head kernel's. Every entry is compiled for sm_80 and sm_90 by tests/test_divergence_compile.py, which
# also rejects register spills: 64x128x64 (8 warps) and 64x64x64 (4) half tiles spill on sm_80 (12 and 144 bytes),
# as do 64x64x32 FP32 tiles under 3xTF32 (204) and, in the JSD pass on sm_90, 64x64x32 half tiles (8). The first
# entry of each list is the default.
FWD_CONFIGS = {
    "half": [KernelConfig(64, 128, 32, num_warps=8, num_stages=3), KernelConfig(32, 64, 64, num_warps=4, num_stages=3)],
    "fp32": [KernelConfig(64, 64, 16, num_warps=8, num_stages=3), KernelConfig(32, 64, 32, num_warps=4, num_stages=3)],
}
DZ_CONFIGS = FWD_CONFIGS   # the same two-tile GEMMs, without the vocabulary loop
CONFIGS = {"fwd": FWD_CONFIGS, "jsd": FWD_CONFIGS, "dz": DZ_CONFIGS}
INTERPRETER_CONFIG = KernelConfig(16, 32, 16, num_warps=1, num_stages=1, GROUP=2)


def _config_key(modes, dtypes) -> str:
    """FP32 tiles when either head computes in FP32 (upcast, or FP32 inputs), else the half-precision table."""
    fp32 = any(m.cast_fp32 or d == torch.float32 for m, d in zip(modes, dtypes))
    return "fp32" if fp32 else "half"


def default_config(kind: str, modes, dtypes) -> KernelConfig:
    """The launch config of ``kind`` in ``CONFIGS`` for the two heads' modes and hidden dtypes;
    ``RLCORE_CONFIG_INDEX`` picks another entry of the list."""
    if is_interpreter():
        return INTERPRETER_CONFIG
    configs = CONFIGS[kind][_config_key(modes, dtypes)]
    return configs[min(int(os.environ.get("RLCORE_CONFIG_INDEX", "0")), len(configs) - 1)]


def _upcast(mode: KernelMode, dtype: torch.dtype) -> bool:
    return is_interpreter() and not mode.cast_fp32 and dtype == torch.bfloat16


def _head_args(hs, ws, bs, ht, wt, bt, modes):
    """The pointer, stride and constexpr arguments both kernels take for the two heads."""
    ptrs = (hs, ws, bs if bs is not None else ws, ht, wt, bt if bt is not None else wt)
    strides = (hs.stride(0), hs.stride(1), ws.stride(0), ws.stride(1), ht.stride(0), ht.stride(1), wt.stride(0),
               wt.stride(1))
    meta = dict(HAS_BIAS_S=bs is not None, HAS_BIAS_T=bt is not None,
                CAST_S=modes[0].cast_fp32, CAST_T=modes[1].cast_fp32,
                DOT_S=modes[0].dot_precision, DOT_T=modes[1].dot_precision,
                UPCAST_S=_upcast(modes[0], hs.dtype), UPCAST_T=_upcast(modes[1], ht.dtype))
    return ptrs, strides, meta


def _merge_head(m, s):
    """``(lse, M, weights)`` of one head from its span states ``m, s [SPLITS, N]``."""
    big_m = m.amax(0)
    ref = torch.where(torch.isneginf(big_m), torch.zeros_like(big_m), big_m)
    w = torch.exp(m - ref)
    return ref + torch.log((s * w).sum(0)), w


def _mix_logs(beta: float):
    """``(log beta, log(1 - beta))`` for the JSD's mixture; unused (0) by the KLs, whose beta may be anything."""
    if not 0.0 < beta < 1.0:
        return 0.0, 0.0
    return math.log(beta), math.log1p(-beta)


def divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, inv_temp: float, modes):
    """``stats [4, N]`` float32 (``lse_S, lse_T, c1, c2``; rows not ``valid`` 0) of the validated inputs."""
    bs = bs.contiguous() if bs is not None else None
    bt = bt.contiguous() if bt is not None else None
    valid = valid.contiguous()
    N, HS = hs.shape
    V, HT = ws.shape[0], ht.shape[1]
    cfg = default_config("fwd", modes, (hs.dtype, ht.dtype))
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    span = _vocab_span(n_blocks, V, hs.device)
    splits = triton.cdiv(V, span)
    ptrs, strides, meta = _head_args(hs, ws, bs, ht, wt, bt, modes)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(), **meta)
    part = torch.empty((5, splits, N), device=hs.device, dtype=torch.float32)
    _fwd_kernel[(n_blocks * splits,)](*ptrs, valid, part, N, V, HS, HT, span, splits, *strides, inv_temp,
                                      KIND=KIND_IDS[kind], **launch)
    lse_s, w_s = _merge_head(part[0], part[1])
    lse_t, w_t = _merge_head(part[2], part[3])
    if kind == "reverse_kl":
        c2 = (part[4] * w_s).sum(0) / (part[1] * w_s).sum(0)      # mu = E_p[z_S - z_T]
        c1 = c2 - (lse_s - lse_t)
    elif kind == "forward_kl":
        c2 = (part[4] * w_t).sum(0) / (part[3] * w_t).sum(0)      # mu = E_q[z_T - z_S]
        c1 = c2 - (lse_t - lse_s)
    else:
        stats = torch.stack([lse_s, lse_t]).where(valid, 0.0).contiguous()
        part2 = torch.empty((2, splits, N), device=hs.device, dtype=torch.float32)
        _jsd_kernel[(n_blocks * splits,)](*ptrs, valid, stats, part2, N, V, HS, HT, span, splits, *strides, inv_temp,
                                          *_mix_logs(beta), **launch)
        c1, c2 = part2.sum(1).unbind(0)
    return torch.stack([lse_s, lse_t, c1, c2]).where(valid, 0.0)


def divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind: str, beta: float, inv_temp: float, needs,
                   modes):
    """``(dh_S, dW_S, db_S, dh_T, dW_T, db_T)``: FP32 ``dh`` and ``db``, ``dW`` in the weight's dtype, ``None`` where
    ``needs`` (six bools) is False. One vocabulary slice at a time: ``_dz_kernel``, then per head ``dW[slice] =
    dz^T h``, ``dh += dz W[slice]``, ``db[slice] = dz.sum(0)``."""
    bs = bs.contiguous() if bs is not None else None
    bt = bt.contiguous() if bt is not None else None
    valid, stats = valid.contiguous(), stats.contiguous()
    N, HS = hs.shape
    V, HT = ws.shape[0], ht.shape[1]
    need_s, need_t = any(needs[:3]), any(needs[3:])
    cfg = default_config("dz", modes, (hs.dtype, ht.dtype))
    cols = _vocab_slice(N, V, max(HS, HT))
    ptrs, strides, meta = _head_args(hs, ws, bs, ht, wt, bt, modes)
    f32 = dict(device=hs.device, dtype=torch.float32)
    heads = []
    for (h, w, b), (n_dh, n_dw, n_db), mode, need in (((hs, ws, bs), needs[:3], modes[0], need_s),
                                                       ((ht, wt, bt), needs[3:], modes[1], need_t)):
        dz_dtype = torch.float32 if mode.cast_fp32 else h.dtype
        heads.append(dict(
            h=torch.where(valid[:, None], h, 0.0) if n_dw else h,     # masked rows (maybe NaN) never reach dW
            w=w, mode=mode,
            buf=torch.empty(N * cols, device=h.device, dtype=dz_dtype) if need else None,
            dh=torch.empty((N, h.shape[1]), **f32) if n_dh else None,
            dw=torch.empty_like(w, memory_format=torch.contiguous_format) if n_dw else None,
            db=torch.empty((V,), **f32) if (n_db and b is not None) else None))
    for i, v0 in enumerate(range(0, V, cols)):
        c = min(cols, V - v0)
        dzs = heads[0]["buf"][: N * c].view(N, c) if need_s else stats
        dzt = heads[1]["buf"][: N * c].view(N, c) if need_t else stats
        _dz_kernel[(triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(c, cfg.BLOCK_V),)](
            *ptrs, valid, stats, grad, dzs, dzt, N, V, HS, HT, v0, c, *strides, inv_temp, beta, *_mix_logs(beta),
            KIND=KIND_IDS[kind], NEED_S=need_s, NEED_T=need_t,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(), **meta,
        )
        for head, dz, need in zip(heads, (dzs, dzt), (need_s, need_t)):
            if not need:
                continue
            if head["db"] is not None:
                head["db"][v0:v0 + c] = dz.sum(0, dtype=torch.float32)
            if head["dw"] is not None:
                _matmul(dz.T, head["h"], head["dw"][v0:v0 + c], head["mode"], accumulate=False)
            if head["dh"] is not None:
                _matmul(dz, head["w"][v0:v0 + c], head["dh"], head["mode"], accumulate=i > 0)
    return tuple(x for head in heads for x in (head["dh"], head["dw"], head["db"]))
