"""Triton kernels for reductions over packed sequences: per-segment sums, and their adjoint, the broadcast.

Packed layout (flash-attn varlen): ``B`` sequences laid end to end along a token axis of length ``N``; sequence ``b``
holds tokens ``[cu_seqlens[b], cu_seqlens[b + 1])``. ``x`` carries ``K`` per-token quantities as rows ``[K, N]``::

    segment_sum:        out[k, b] = sum_{t = cu[b]}^{cu[b+1] - 1} x[k, t]            [K, N] -> [K, B]
    segment_broadcast:  out[k, t] = s[k, b]  for cu[b] <= t < cu[b + 1], else 0        [K, B] -> [K, N]

The two are each other's adjoint (``<segment_sum(x), s> = <x, segment_broadcast(s)>``), so each is the other's
backward.

Neither kernel needs the host to know the segment lengths, so neither ever syncs with it: the grid depends only on
shapes (``B``, ``K``, ``N``), and the offsets are read from ``cu_seqlens`` inside the kernels.

``_segment_sum_kernel``: one program per ``(segment, block of BLOCK_K rows)``. It reads its segment's bounds from
``cu_seqlens`` and walks the tokens in ``BLOCK_N`` chunks (a runtime loop), adding each ``[BLOCK_K, BLOCK_N]`` tile
into an FP32 (float64 for float64 input) accumulator of the same shape, then reduces the tile once. Each output has
one owner: no atomics, the result is deterministic.

``_segment_broadcast_kernel``: one program per block of ``BLOCK_N`` tokens, looping over the ``K`` rows. Each token
finds its segment by a binary search over ``cu_seqlens`` (``ceil(log2(B + 1))`` steps, all programs the same count,
``cu_seqlens`` stays in L1/L2), then the program gathers ``s[k, seg]`` and writes ``out[k, tokens]``. Tokens are
split evenly whatever the segment lengths: one 32k-token sequence among short ones does not serialize onto one
program, and every token is written exactly once (0 outside ``[cu[0], cu[-1])``), so ``out`` needs no memset.

The sum keeps the per-segment grid (``B`` programs): a token-parallel sum would need atomics (not deterministic) or
a second pass. Both ops move ``K N`` elements, microseconds at RL batch sizes; the per-segment imbalance only
matters when a few very long segments meet a large ``K``, which the RL losses (``K`` of 1 to 4) never do.

Robustness to unchecked ``cu_seqlens``: token indices are masked to ``[0, N)`` and segment indices stay in
``[0, B)``, so out-of-range or decreasing offsets give meaningless values but never an out-of-bounds access.

All offsets are int64: token indices come from int64 loads of ``cu_seqlens`` (int32 or int64) or from an int64
program offset, and row offsets ``k * stride`` are int64 products (``K N`` can exceed 2^31).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import is_interpreter

__all__ = [
    "SegmentConfig",
    "SUM_CONFIG",
    "BROADCAST_CONFIG",
    "CONFIGS",
    "default_config",
    "segment_sum_fwd",
    "segment_broadcast_fwd",
    "is_interpreter",
]


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _segment_sum_kernel(
    x_ptr, cu_ptr, out_ptr,
    N, K,
    stride_xk, stride_xn, stride_ok, stride_ob,
    ACC_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[k, b] = sum(x[k, cu[b]:cu[b+1]])`` for the rows ``k`` of this program's block, accumulated in FP32
    (float64 when ``ACC_FP64``), stored in the output's dtype. Grid: ``(B, cdiv(K, BLOCK_K))``."""
    i_b = tl.program_id(0)
    i_k = tl.program_id(1)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)                            # [BLOCK_K]
    m_k = o_k < K
    # Segment bounds, clamped to [0, N] so that unchecked offsets cannot address outside x.
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + i_b).to(tl.int64), 0), N)
    end = tl.minimum(tl.load(cu_ptr + i_b + 1).to(tl.int64), N)
    o_n = tl.arange(0, BLOCK_N).to(tl.int64)                               # [BLOCK_N]
    p_x = x_ptr + o_k[:, None].to(tl.int64) * stride_xk + (start + o_n)[None, :] * stride_xn
    if ACC_FP64:
        b_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float64)
    else:
        b_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # Runtime trip count read from cu_seqlens: the host never learns the lengths. (A decreasing pair gives <= 0.)
    for i_n in range(0, tl.cdiv(end - start, BLOCK_N)):
        m_n = o_n < end - start - i_n * BLOCK_N
        b_x = tl.load(p_x, mask=m_k[:, None] & m_n[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
        b_acc += b_x.to(b_acc.dtype)
        p_x += BLOCK_N * stride_xn
    b_sum = tl.sum(b_acc, axis=1)                                          # [BLOCK_K]
    p_o = out_ptr + o_k.to(tl.int64) * stride_ok + i_b.to(tl.int64) * stride_ob
    tl.store(p_o, b_sum.to(out_ptr.dtype.element_ty), mask=m_k)


@triton.jit
def _segment_broadcast_kernel(
    s_ptr, cu_ptr, out_ptr,
    N, K, B, SEARCH_STEPS,
    stride_sk, stride_sb, stride_ok, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[k, t] = s[k, seg(t)]`` with ``seg(t)`` the segment holding token ``t``; 0 for tokens outside
    ``[cu[0], cu[B])``. Grid: ``(cdiv(N, BLOCK_N),)``; ``SEARCH_STEPS = ceil(log2(B + 1))`` (from the shape)."""
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)               # [BLOCK_N] token ids, int64
    m_n = o_n < N
    # seg(t) = #{b in 1..B : cu[b] <= t} (torch.searchsorted(cu[1:], t, right=True)), by bisection: the count lies
    # in [lo, hi]; a step takes hi - lo to at most floor((hi - lo) / 2), so SEARCH_STEPS steps bring it from B to 0.
    b_lo = tl.zeros((BLOCK_N,), dtype=tl.int64)
    b_hi = tl.zeros((BLOCK_N,), dtype=tl.int64) + B
    for _ in range(0, SEARCH_STEPS):
        b_mid = (b_lo + b_hi) // 2
        m_open = b_lo < b_hi
        b_cu = tl.load(cu_ptr + 1 + b_mid, mask=m_open, other=0).to(tl.int64)
        m_right = m_open & (b_cu <= o_n)
        b_lo = tl.where(m_right, b_mid + 1, b_lo)
        b_hi = tl.where(m_open & ~m_right, b_mid, b_hi)
    b_seg = b_lo                                                           # [BLOCK_N] in [0, B]
    b_first = tl.load(cu_ptr).to(tl.int64)
    m_in = m_n & (b_seg < B) & (o_n >= b_first)                            # tokens inside a segment
    b_seg = tl.where(m_in, b_seg, 0)
    o_k0 = tl.arange(0, BLOCK_K)
    for i_k in range(0, tl.cdiv(K, BLOCK_K)):
        o_k = (i_k * BLOCK_K + o_k0).to(tl.int64)                          # [BLOCK_K]
        m_k = o_k < K
        p_s = s_ptr + o_k[:, None] * stride_sk + b_seg[None, :] * stride_sb
        b_s = tl.load(p_s, mask=m_k[:, None] & m_in[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
        p_o = out_ptr + (o_k[:, None] * stride_ok + o_n[None, :] * stride_on)
        tl.store(p_o, b_s.to(out_ptr.dtype.element_ty), mask=m_k[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentConfig:
    BLOCK_K: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_K=self.BLOCK_K, BLOCK_N=self.BLOCK_N)


# Fixed configs, compiled for sm_80 and sm_90 by tests/test_gpu_compile.py (no spills; 26-39 registers for the sum,
# 64-79 for the broadcast's int64 bisection). Both kernels are memory-bound streams with no dot, so the config only
# has to keep every lane busy and every access coalesced:
# - BLOCK_K = 1: K is a handful of per-token quantities (1 to 4 in the RL losses). One row per tile means no masked
#   lanes at K = 1, and each tile is one contiguous run of a row (rows are N apart in memory).
# - BLOCK_N = 1024 with 4 warps: 8 elements per thread, 128 apart, so every warp-wide access covers 32 consecutive
#   elements (fully coalesced). Segment starts are arbitrary, so the compiler cannot prove alignment for wider
#   vector loads anyway. The sum carries an 8-register accumulator per thread (16 for float64).
# - num_stages = 1: the sum's loop has no dot for Triton's pipeliner to overlap; the 8 independent loads per thread
#   per step, and several programs per SM, hide the memory latency instead.
SUM_CONFIG = SegmentConfig(BLOCK_K=1, BLOCK_N=1024, num_warps=4, num_stages=1)
BROADCAST_CONFIG = SegmentConfig(BLOCK_K=1, BLOCK_N=1024, num_warps=4, num_stages=1)
# The interpreter runs numpy per program: small tiles keep CPU tests fast, and BLOCK_K = 2 with BLOCK_N = 8 make the
# row masks and the multi-chunk token loop run at test sizes.
INTERPRETER_CONFIG = SegmentConfig(BLOCK_K=2, BLOCK_N=8, num_warps=1, num_stages=1)

CONFIGS = {"segment_sum": SUM_CONFIG, "segment_broadcast": BROADCAST_CONFIG}


def default_config(kind: str) -> SegmentConfig:
    """The launch config of ``kind`` in ``CONFIGS`` (the small interpreter config under ``TRITON_INTERPRET=1``)."""
    return INTERPRETER_CONFIG if is_interpreter() else CONFIGS[kind]


# ----------------------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------------------


def segment_sum_fwd(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``x [K, N]`` (any strides, any float dtype), ``cu_seqlens [B + 1]`` int32/int64 on x's device -> ``[K, B]``
    in x's dtype, accumulated in FP32 (float64 for float64 ``x``). No host sync."""
    K, N = x.shape
    B = cu_seqlens.shape[0] - 1
    if K == 0 or B == 0 or N == 0:
        return x.new_zeros((K, B))
    cu_seqlens = cu_seqlens.contiguous()
    out = x.new_empty((K, B))                                              # [K, B]
    cfg = default_config("segment_sum")
    _segment_sum_kernel[(B, triton.cdiv(K, cfg.BLOCK_K))](
        x, cu_seqlens, out,
        N, K,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        ACC_FP64=x.dtype == torch.float64,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
    )
    return out


def segment_broadcast_fwd(s: torch.Tensor, cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """``s [K, B]`` (any strides, any float dtype), ``cu_seqlens [B + 1]`` -> ``[K, N]`` in s's dtype, with
    ``out[k, t] = s[k, seg(t)]`` and 0 for tokens outside ``[cu[0], cu[B])``. No host sync."""
    K, B = s.shape
    if K == 0 or N == 0 or B == 0:                                         # B == 0: every token lies outside
        return s.new_zeros((K, N))
    cu_seqlens = cu_seqlens.contiguous()
    out = s.new_empty((K, N))                                              # [K, N]
    cfg = default_config("segment_broadcast")
    _segment_broadcast_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
        s, cu_seqlens, out,
        N, K, B, B.bit_length(),                                           # ceil(log2(B + 1)) bisection steps
        s.stride(0), s.stride(1), out.stride(0), out.stride(1),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
    )
    return out
