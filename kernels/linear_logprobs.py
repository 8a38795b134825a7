"""Triton kernels for fused linear log-probs: ``log_softmax(h @ W.T + b) / T`` at the target, and entropy,
without ever holding the ``[N, V]`` logits.

Notation (one row ``n``, vocabulary ``v``)::

    a_v   = h . W_v + b_v                                  raw logits
    z_v   = cap(a_v) * inv_temp                            logits after the cap and the temperature
    lse   = log sum_v exp(z_v)
    p_v   = exp(z_v - lse)
    logp  = z_t - lse                                      t = target id
    ent   = -sum_v p_v log p_v = lse - sum_v p_v z_v

``cap`` is the identity, or with ``softcap = c > 0`` (the ``SOFTCAP`` variant of the forward and dz kernels; Gemma
2/3) ``cap(a) = c tanh(a / c)`` (``_tanh``: one exp, saturating at logits of 1e4 with no inf or NaN), whose slope
``cap'(a) = 1 - tanh^2(a / c)`` the dz kernel forms from the capped logits (``_cap_slope``). Without the cap the
kernels' code is unchanged (``_cap_scale``).

Forward (``_fwd_kernel``): ``cdiv(N, BLOCK_N) x SPLITS`` programs, rasterized in groups (``_grouped_pid``) so that
programs running together share their rows of ``h`` and tiles of ``W`` in L2. Program ``(i_n, i_s)`` streams the span
``[i_s * SPAN, (i_s + 1) * SPAN)`` in ``BLOCK_V`` tiles. Each tile of logits is one ``[BLOCK_N, H] x [H, BLOCK_V]`` GEMM
accumulated in FP32 over ``BLOCK_H`` slices of ``H``, then folded into an online log-sum-exp state per row::

    m  running max of z
    s  sum_v exp(z_v - m)
    a  sum_v exp(z_v - m) * (z_v - m)       (entropy numerator, kept relative to m so that logits of 1e4 do not cancel)
    zt the target logit, if it falls in this span (else 0)

The partial states of the ``SPLITS`` spans are written to a ``[4, SPLITS, N]`` FP32 buffer and merged by a few
device-side torch ops (``merge_partials``): ``lse = M + log S`` and ``ent = log S - A / S``. Splitting the vocabulary
keeps the GPU full when ``N`` is small.

Backward: the loss reaches the kernels as the upstream gradients ``g_lp = dL/dlogp`` and ``g_ent = dL/dent`` per row.
Differentiating the definitions above::

    dlogp/dz_v = [v == t] - p_v
    dent/dz_v  = -p_v (log p_v + ent) = -p_v (z_v - lse + ent)
    dz_v       = g_lp ([v == t] - p_v) - g_ent p_v (z_v - lse + ent)
    dlogits_v  = dz_v * inv_temp * cap'(a_v)        (chain rule through the temperature and the cap)
    dh   = dlogits @ W          dW = dlogits.T @ h          db = sum_n dlogits

The vocabulary is walked in slices of ``C`` columns (``C`` ~ max(2 H, 2^24 / N), so a slice's ``dz`` holds about
2 N H elements: as many bytes as FP32 ``dh`` in half precision). Per slice, ``_dz_kernel`` (``cdiv(N, BLOCK_N) x
cdiv(C, BLOCK_V)`` programs, rasterized in groups) recomputes each logit tile from the
saved ``lse`` (the one extra GEMM), forms ``dlogits`` in registers and writes it to a ``[N, C]`` buffer in the GEMM
dtype; ``_matmul_kernel`` then computes ``dW[slice] = dz^T @ h`` (complete over all rows, so written once, in the
weight's dtype) and ``dh += dz @ W[slice]`` (FP32 buffer). Every output tile has one owner: no atomics, the backward
is deterministic, and nothing of size ``[N, V]`` or FP32 ``[V, H]`` is held.

Why not the one-kernel scheme with atomics (each ``(row block, vocabulary tile)`` program adding its ``dz @ W`` and
``dz^T @ h`` into FP32 ``dh`` / ``dW``)? Its atomic traffic is ``(N / BLOCK_N + V / BLOCK_V) * ...``: at N = 16384,
H = 4096, V = 151936 with 64 x 128 tiles, about 1.6e11 + 0.8e11 FP32 atomics (~1 TB of L2 traffic) against a
GEMM floor of ~76 ms on an H100. The sliced scheme moves ``3 N V`` GEMM-dtype elements (dz written, read twice) and
``2 N H`` FP32 per slice, a few percent of the GEMM time at those shapes. (To be confirmed by measurement on a GPU.)

Precision is a pair of compile-time switches resolved by ``rlcore`` from the user's ``precision`` and the input dtypes:
``CAST_FP32`` (load tiles and upcast them to FP32) and ``DOT_PRECISION`` (``tl.dot``'s ``input_precision`` for FP32
operands: ``"tf32"``, ``"tf32x3"`` for FP32 accuracy on tensor cores, or ``"ieee"``). Half-precision operands go to the
tensor cores as they are: products of bf16/fp16 values are exact in the FP32 accumulator.

All pointer offsets along ``N`` and ``V`` are computed in int64, so ``N * H`` and ``V * H`` beyond 2^31 are safe.

Rows without gradient. A row whose target is ``ignore_index``, or whose upstream gradients are both 0, contributes
exactly nothing to ``dW``, ``db`` and ``dh`` (its ``dh`` is 0), even when its hidden state holds NaN or inf (left
padding under some attention masks does): ``_dz_kernel`` masks every use of such a row's logits, the dW GEMM loads
its hidden state as 0 (``ROWS=2``), and row blocks without a live row are skipped in the forward, the dz kernel and
both GEMMs (a zero trip count, or the device-built list of live K blocks: no host sync).

Roofline at H = 4096, V = 151936, N = 16384, bf16, on an H100 SXM (989 dense bf16 TFLOP/s, 3.35 TB/s HBM; cuBLAS
reaches ~700 TFLOP/s on such GEMMs, the practical ceiling used below). One head GEMM is 2 N H V = 2.04e13 FLOP:
~29 ms at 700 TFLOP/s.

- Forward (``_fwd_kernel``): 1 GEMM. HBM: W (1.25 GB) once per rasterization group of 16 row blocks (8 passes,
  ~10 GB, 3 ms) and h (134 MB) once per span: well under the 29 ms of MMAs, so compute-bound (~1500 FLOP/byte against
  a ridge of ~300). The epilogue (max, exp, two FMAs per logit: N V = 2.5e9 logits, the exps at the MUFU rate of
  ~4e12/s) costs ~0.6-1.5 ms if it does not overlap the MMAs. Predicted: 1.03-1.08x of one cuBLAS GEMM with the
  flat, pipelined (tile, slice) loop (the next tile's loads are in flight during the softmax update), ~1.15x when the
  pipeline drains at each tile (the old nested loop); target 1.1x.
- Backward: ``_dz_kernel`` is 1 GEMM (the recomputed logits) plus writing dz (N V bf16 = 5 GB, 1.5 ms, overlapped
  with the next tiles' MMAs); the dW and dh GEMMs are 2 GEMMs that read dz twice (10 GB, mostly from L2 within a
  slice) and dh's FP32 accumulator once per slice (2 N H 4 bytes x 19 slices = 10 GB, ~0.16 ms per slice, hidden
  in the GEMM epilogue). Forward + backward = 4 GEMMs against the 3-GEMM floor: 1.33x by construction, predicted
  ~1.40-1.45x with the overheads above (target 1.5x). Ignored rows (prompt tokens) are skipped in all four.
- Backward GEMMs, cuBLAS or Triton (``bwd_gemm``, ``RLCORE_BWD_GEMM``): Triton's 128x128x64 wgmma GEMM with 4 stages
  reaches roughly 85-95% of cuBLAS on large square bf16 GEMMs in Triton's own tutorial figures; the dW GEMM here has a
  transposed (M-major) A operand and an indirect K loop (the live-block list), which can only cost more, so cuBLAS is
  expected 10-25% faster on these two GEMMs: ~3-7 ms of a ~120 ms step. Its price is one host sync (to gather the
  live rows; ~20 us) and the gather (N H bf16 read and written, ~0.1 ms). ``auto`` therefore takes cuBLAS for half
  precision on CUDA; FP32 modes keep the Triton GEMM (3xTF32 has no cuBLAS counterpart), and so does CUDA-graph
  capture (nothing may sync). The prepared GPU run (``bench/gpu_session.sh``) times both, to confirm or reverse this.
- ``precision="fp32"`` with bf16 inputs (the bench's ``rlcore-triton-fp32``): the forward is the bf16 one (bf16
  products are exact in FP32); the backward's three GEMMs take upcast tiles in one tf32 pass (half the bf16 MMA rate)
  with dz kept in FP32 (twice the dz bytes). Predicted (1 + 3 x 2) / 4 = 1.75x of bf16 for fwd+bwd (target 2x). FP32
  inputs (3xTF32: three tf32 MMAs per product) are ~6x bf16's MMA time by construction.
- Memory: no [N, V] tensor; the backward holds one dz slice (max(2 N H, 2^24) elements) and an FP32 dh: ~0.4 GB at
  these shapes against the reference's ~10 GB of FP32 logits and their gradient (~4%; target 5%).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import is_interpreter

__all__ = [
    "KernelConfig",
    "KernelMode",
    "FWD_CONFIGS",
    "DZ_CONFIGS",
    "MATMUL_CONFIGS",
    "CONFIGS",
    "ARCHS",
    "arch_key",
    "candidate_configs",
    "default_config",
    "choose_config",
    "autotune_enabled",
    "tuning_key",
    "n_bucket",
    "linear_logprobs_fwd",
    "linear_logprobs_bwd",
    "merge_partials",
    "BWD_GEMMS",
    "bwd_gemm",
    "is_interpreter",
]


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(b_a, b_b, b_acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with FP32 accumulation. ``UPCAST`` is set only under the CPU interpreter for bf16 tiles: Triton
    3.9's interpreter multiplies bf16 tiles as their raw uint16 bits. bf16 products are exact in FP32, so upcasting
    first gives the same numbers the tensor cores do."""
    if UPCAST:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    return tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32. Only for the CPU interpreter, whose fp32 -> bf16 cast
    truncates; the GPU cast (``cvt.rn.bf16.f32``) already rounds to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _grouped_pid(i_pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Map a 1-D program id to ``(row block, column block)`` so that the programs running at the same time cover
    ``GROUP`` row blocks by a few column blocks: their row operand (h) and column operand (W) then stay in L2, as
    in a well-rasterized GEMM. Plain row-fastest order would give each resident program its own row block, re-read
    from HBM for every column step (~130 FLOP/byte at H = 4096, below an H100's ~300)."""
    i_group = i_pid // (GROUP * n_cols)
    first = i_group * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (i_pid % (GROUP * n_cols)) % size, (i_pid % (GROUP * n_cols)) // size


@triton.jit
def _tanh(x):
    """``tanh x`` in FP32 from one exp, accurate in relative terms for every ``x``: ``e = exp(-2 |x|)`` gives
    ``|tanh x| = (1 - e) / (1 + e)``; below ``|x| = 1/4``, where ``1 - e`` would cancel, the odd Taylor series to
    ``x^9`` (truncation < 1e-8 relative). ``|x|`` past ~44 underflows ``e`` to 0: ``+-1`` exactly, so logits of 1e4
    (and a -inf bias) saturate without an inf or a NaN. (Triton's libdevice ``tanh`` would do on a GPU, but the CPU
    interpreter has none.)"""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    big = (1.0 - e) / (1.0 + e)
    return tl.where(ax < 0.25, series, tl.where(x < 0, -big, big))


@triton.jit
def _cap_scale(b_a, m_v, softcap, inv_temp, SOFTCAP: tl.constexpr):
    """A raw logit tile ``a = h W^T + b [BLOCK_N, BLOCK_V]`` (FP32) -> the logits ``z = cap(a) * inv_temp``, -inf on
    the columns outside ``m_v``; ``cap(a) = softcap * tanh(a / softcap)`` with ``SOFTCAP`` (Gemma 2/3's soft cap), the
    identity without (the uncapped kernels' code is then what it was)."""
    if SOFTCAP:
        b_a = softcap * _tanh(b_a / softcap)
    return tl.where(m_v[None, :], b_a * inv_temp, float("-inf"))


@triton.jit
def _cap_slope(b_z, softcap, inv_temp):
    """``d cap(a) / d a = 1 - tanh^2(a / softcap)`` from the capped logits ``z = softcap tanh(a / softcap) inv_temp``
    themselves (``tanh = z / (softcap inv_temp)``), formed at the point of use rather than kept from the cap: one
    ``[BLOCK_N, BLOCK_V]`` tile fewer live, which 128 x 128 tiles need to spill nothing. Exactly 0 on -inf columns
    and where the cap saturates (``tanh = +-1`` gives ``|z| = softcap inv_temp``, the very product divided by);
    elsewhere its error is a few FP32 ulps of 1 in absolute terms (``z`` is rounded), not relative to the slope."""
    b_t = b_z / (softcap * inv_temp)
    return tl.maximum(1.0 - b_t * b_t, 0.0)


@triton.jit
def _head_tile(
    h_ptr, w_ptr, b_ptr, o_n, o_v, m_n, m_v, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The raw logit tile ``a[BLOCK_N, BLOCK_V] = h[o_n] @ W[o_v].T + b[o_v]`` in FP32 (0 on masked columns)."""
    o_h = tl.arange(0, BLOCK_H)
    p_h = h_ptr + o_n[:, None].to(tl.int64) * stride_hn + o_h[None, :] * stride_hh  # [BLOCK_N, BLOCK_H]
    p_w = w_ptr + o_v[None, :].to(tl.int64) * stride_wv + o_h[:, None] * stride_wh  # [BLOCK_H, BLOCK_V]
    b_z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for i_h in range(0, tl.cdiv(H, BLOCK_H)):
        m_h = o_h < H - i_h * BLOCK_H
        b_h = tl.load(p_h, mask=m_n[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(p_w, mask=m_h[:, None] & m_v[None, :], other=0.0)
        if CAST_FP32:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_z = _dot(b_h, b_w, b_z, DOT_PRECISION, UPCAST)
        p_h += BLOCK_H * stride_hh
        p_w += BLOCK_H * stride_wh
    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_z += b_b[None, :]
    return b_z


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, o_n, o_v, m_n, m_v, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
    HAS_BIAS: tl.constexpr, CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``z[BLOCK_N, BLOCK_V] = (h[o_n] @ W[o_v].T + b[o_v]) * inv_temp`` in FP32; columns outside ``m_v`` are -inf."""
    b_a = _head_tile(h_ptr, w_ptr, b_ptr, o_n, o_v, m_n, m_v, H, stride_hn, stride_hh, stride_wv, stride_wh,
                     HAS_BIAS, CAST_FP32, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    return _cap_scale(b_a, m_v, 1.0, inv_temp, False)


@triton.jit
def _online_lse_update(b_m, b_s, b_a, b_z):
    """Fold a logit tile ``b_z [BLOCK_N, BLOCK_V]`` into the running state ``(m, s, a)`` of each row (see module doc).

    Safe for tiles that are entirely -inf (masked vocabulary, padding columns): the reference point is then 0 and
    every term of the tile is exactly 0.
    """
    b_m_new = tl.maximum(b_m, tl.max(b_z, 1))
    b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp(b_m - b_ref)  # 0 while the row has seen only -inf
    # a is relative to the old max; move it to the new reference: sum e' (z - ref) = alpha (a + s (m - ref))
    b_a = tl.where(b_s > 0, b_alpha * (b_a + b_s * (b_m - b_ref)), 0.0)
    b_e = tl.exp(b_z - b_ref[:, None])
    b_zc = tl.where(b_e > 0, b_z - b_ref[:, None], 0.0)  # avoids 0 * -inf
    b_s = b_s * b_alpha + tl.sum(b_e, 1)
    b_a = b_a + tl.sum(b_e * b_zc, 1)
    return b_m_new, b_s, b_a


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, part_ptr, z_ptr,
    N, V, H, SPAN, SPLITS,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temp, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, Z_OUT: tl.constexpr, SOFTCAP: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    i_n, i_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLITS, GROUP)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(t_ptr + o_n, mask=m_n, other=ignore_index).to(tl.int64)  # [BLOCK_N]

    b_m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_zt = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_start = i_s * SPAN
    v_end = tl.minimum(v_start + SPAN, V)
    # One flat loop over (vocabulary tile, H slice) pairs instead of a vocabulary loop around an H loop: the software
    # pipeliner (num_stages) then prefetches the next tile's first slices of h and W while the current tile's
    # online-softmax update runs, instead of draining at every tile boundary (a 128-wide tile at H = 4096 is 64 slices,
    # so a drained pipeline idles the tensor cores ~num_stages / 64 of the time, plus the whole softmax update).
    n_h = tl.maximum(tl.cdiv(H, BLOCK_H), 1)   # H = 0: one all-masked slice, so each tile still gets its epilogue
    n_it = tl.cdiv(v_end - v_start, BLOCK_V) * n_h
    # A block whose targets are all ignored (prompt tokens, padding) has outputs 0: skip its GEMMs (a zero trip count,
    # so the loop stays a plain pipelinable scf.for). Its partials stay (-inf, 0, 0, 0); the host masks those rows.
    if tl.max((m_n & (b_t != ignore_index)).to(tl.int32), 0) == 0:
        n_it = 0
    o_h = tl.arange(0, BLOCK_H)
    b_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for it in range(0, n_it):
        i_v = it // n_h
        h0 = (it - i_v * n_h) * BLOCK_H
        o_v = v_start + i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < v_end
        m_h = o_h < H - h0
        p_h = h_ptr + o_n[:, None].to(tl.int64) * stride_hn + (h0 + o_h[None, :]) * stride_hh   # [BLOCK_N, BLOCK_H]
        p_w = w_ptr + o_v[None, :].to(tl.int64) * stride_wv + (h0 + o_h[:, None]) * stride_wh   # [BLOCK_H, BLOCK_V]
        b_h = tl.load(p_h, mask=m_n[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(p_w, mask=m_h[:, None] & m_v[None, :], other=0.0)
        if CAST_FP32:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = _dot(b_h, b_w, b_acc, DOT_PRECISION, UPCAST)
        if h0 + BLOCK_H >= H:  # the tile's last slice: fold its logits into the running state, start the next tile
            b_raw = b_acc   # h W^T + b (not b_a: that is the running entropy numerator)
            if HAS_BIAS:
                b_raw += tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
            b_z = _cap_scale(b_raw, m_v, softcap, inv_temp, SOFTCAP)
            if Z_OUT and SOFTCAP:   # stored at once: fewer values live through the update (no spills)
                p_z = z_ptr + o_n[:, None].to(tl.int64) * V + o_v[None, :]
                tl.store(p_z, b_z, mask=m_n[:, None] & m_v[None, :])
            b_zt += tl.sum(tl.where(o_v[None, :].to(tl.int64) == b_t[:, None], b_z, 0.0), 1)
            # The entropy numerator costs one FMA per logit next to an H-long dot product: always kept.
            b_m, b_s, b_a = _online_lse_update(b_m, b_s, b_a, b_z)
            if Z_OUT and not SOFTCAP:  # the single pass of the fused loss keeps the FP32 logits [N, V] of its slice
                p_z = z_ptr + o_n[:, None].to(tl.int64) * V + o_v[None, :]   # for dz (with a cap: above)
                tl.store(p_z, b_z, mask=m_n[:, None] & m_v[None, :])
            b_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)

    # part: [4, SPLITS, N] fp32, contiguous
    p_part = part_ptr + i_s.to(tl.int64) * N + o_n
    stride_part = tl.cast(SPLITS, tl.int64) * N
    tl.store(p_part, b_m, mask=m_n)
    tl.store(p_part + stride_part, b_s, mask=m_n)
    tl.store(p_part + 2 * stride_part, b_a, mask=m_n)
    tl.store(p_part + 3 * stride_part, b_zt, mask=m_n)


@triton.jit
def _dz_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, live_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr,
    N, V, H, v_start, VC,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temp, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, SOFTCAP: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """``dz[N, VC]`` (contiguous) for the vocabulary slice ``[v_start, v_start + VC)``: the gradient of the loss with
    respect to the raw logits ``h W^T + b`` of those columns, recomputed from the saved ``lse`` (one GEMM)."""
    i_n, i_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = i_v * BLOCK_V + tl.arange(0, BLOCK_V)   # column within the slice
    o_v = v_start + o_c                           # vocabulary id
    m_n = o_n < N
    m_c = o_c < VC
    m_v = m_c & (o_v < V)

    b_t = tl.load(t_ptr + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    # Rows that carry gradient (rlcore.chunked.live_rows: a kept target and a non-zero upstream gradient). The others
    # get dz = 0 exactly, whatever their logits (NaN padding included): every use of b_z below is masked by m_row.
    m_row = m_n & (tl.load(live_ptr + o_n, mask=m_n, other=0) != 0)
    b_dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # A block without such rows (prompt tokens, padding) has dz = 0: skip its GEMM.
    if tl.max(m_row.to(tl.int32), 0) > 0:
        b_glp = tl.load(glp_ptr + o_n, mask=m_row, other=0.0).to(tl.float32)
        b_lse = tl.load(lse_ptr + o_n, mask=m_row, other=0.0)
        b_a = _head_tile(
            h_ptr, w_ptr, b_ptr, o_n, o_v, m_n, m_v, H,
            stride_hn, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, CAST_FP32, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        b_z = _cap_scale(b_a, m_v, softcap, inv_temp, SOFTCAP)
        b_zr = b_z - b_lse[:, None]                        # log p, -inf on masked columns
        b_p = tl.where(m_row[:, None], tl.exp(b_zr), 0.0)  # [BLOCK_N, BLOCK_V]
        b_hit = o_v[None, :].to(tl.int64) == b_t[:, None]
        b_dz = tl.where(b_hit, b_glp[:, None], 0.0) - b_glp[:, None] * b_p
        if HAS_GRAD_ENT:
            b_gent = tl.load(gent_ptr + o_n, mask=m_row, other=0.0).to(tl.float32)
            b_ent = tl.load(ent_ptr + o_n, mask=m_row, other=0.0)
            if SOFTCAP:  # log p + ent from z, which the slope needs below: one tile (z) live, not two (z, log p)
                b_dz -= b_gent[:, None] * tl.where(b_p > 0, b_p * (b_z + (b_ent - b_lse)[:, None]), 0.0)
            else:
                b_dz -= b_gent[:, None] * tl.where(b_p > 0, b_p * (b_zr + b_ent[:, None]), 0.0)
        b_dz = b_dz * inv_temp  # d/d(cap(h W^T + b))
        if SOFTCAP:  # d/d(h W^T + b): the chain rule through the cap (masked: a dead row's NaN stays out)
            b_dz = tl.where(m_row[:, None], b_dz * _cap_slope(b_z, softcap, inv_temp), 0.0)
    if UPCAST:
        b_dz = _round_bf16(b_dz)  # the interpreter's store to bf16 truncates; the GPU's rounds to nearest
    p_dz = dz_ptr + (o_n[:, None].to(tl.int64) * VC + o_c[None, :])  # one int64 offset
    tl.store(p_dz, b_dz.to(dz_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _matmul_kernel(
    x_ptr, y_ptr, out_ptr, live_ptr, klist_ptr, kcount_ptr, M, N, K,
    stride_xm, stride_xk, stride_yk, stride_yn, stride_om, stride_on,
    ACCUMULATE: tl.constexpr, ROWS: tl.constexpr,
    CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[M, N] (+)= x[M, K] @ y[K, N]`` with FP32 accumulation, any strides (so ``x`` may be a transposed view),
    written in ``out``'s dtype. Each program owns one output tile: no atomics, deterministic.

    ``ROWS`` says which dimension runs over the op's rows (positions), whose liveness ``live_ptr [rows]`` holds:
    ``0`` none; ``1`` M (the dh GEMM): a tile without live rows skips its K loop and stores 0 (or leaves ``out``);
    ``2`` K (the dW GEMM): only the K blocks listed in ``klist_ptr[:kcount]`` (the row blocks with a live row, built
    on the device by ``_live_blocks``: no host sync) are visited, and ``y``'s dead rows load as 0, so a NaN in the
    hidden state of a row without gradient never meets the dot (0 * NaN would poison the whole of dW).
    """
    i_m, i_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_n = o_n < N
    p_x = x_ptr + o_m[:, None].to(tl.int64) * stride_xm + o_k[None, :].to(tl.int64) * stride_xk  # [BLOCK_M, BLOCK_K]
    p_y = y_ptr + o_k[:, None].to(tl.int64) * stride_yk + o_n[None, :].to(tl.int64) * stride_yn  # [BLOCK_K, BLOCK_N]
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_k = tl.cdiv(K, BLOCK_K)
    if ROWS == 1:
        # a zero trip count rather than an `if` around the loop: the loop stays the pipeliner's plain scf.for
        if tl.max((tl.load(live_ptr + o_m, mask=m_m, other=0) != 0).to(tl.int32), 0) == 0:
            n_k = 0
    if ROWS == 2:
        n_k = tl.load(kcount_ptr)
    for i_k in range(0, n_k):
        if ROWS == 2:
            i_blk = tl.load(klist_ptr + i_k)
        else:
            i_blk = i_k
        k0 = tl.cast(i_blk, tl.int64) * BLOCK_K  # 64-bit: a transposed view steps whole rows of dz per K slice
        m_k = o_k < K - k0
        if ROWS == 2:
            m_k = m_k & (tl.load(live_ptr + k0 + o_k, mask=m_k, other=0) != 0)
        b_x = tl.load(p_x + k0 * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_y = tl.load(p_y + k0 * stride_yk, mask=m_k[:, None] & m_n[None, :], other=0.0)
        if CAST_FP32:
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        b_acc = _dot(b_x, b_y, b_acc, DOT_PRECISION, UPCAST)
    p_o = out_ptr + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :].to(tl.int64) * stride_on
    m_o = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        b_acc += tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
    if ROUND_BF16:
        b_acc = _round_bf16(b_acc)  # interpreter only, as in _dz_kernel
    tl.store(p_o, b_acc.to(out_ptr.dtype.element_ty), mask=m_o)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelMode:
    """How the GEMM tiles are computed; resolved by ``rlcore`` from ``precision`` and the input dtypes."""

    cast_fp32: bool       # upcast loaded tiles to FP32 before tl.dot
    dot_precision: str    # tl.dot input_precision for FP32 operands: "tf32" | "tf32x3" | "ieee"


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int
    GROUP: int = 16   # row blocks per rasterization group (see _grouped_pid)

    def meta(self) -> dict:
        return dict(BLOCK_N=self.BLOCK_N, BLOCK_V=self.BLOCK_V, BLOCK_H=self.BLOCK_H, GROUP=self.GROUP)


@dataclass(frozen=True)
class MatmulConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, GROUP_M=self.GROUP_M)


# Config tables per architecture ("sm80": A100-class, "sm90": H100/H200) and operand class ("half": bf16/fp16 tiles,
# "fp32": upcast tiles under tf32 / 3xTF32). The first entry of each list is the fixed default; the others are what
# RLCORE_AUTOTUNE=1 times (and RLCORE_CONFIG_INDEX=i forces). Every entry is compiled for its architecture by
# tests/test_gpu_compile.py (no GPU needed) with the specialisations a real launch produces, for every bias / entropy
# variant, and must: fit the block's shared-memory limit (sm_80 163 KiB, sm_90 227 KiB), spill no register, run its
# dots on the tensor cores (wgmma on sm_90), and software-pipeline its inner loop.
#
# Reasons, per kernel (register counts: see the gate's table):
# - fwd, half, sm90: 128x128 logit tiles on 8 warps = two warp groups, each a 64x128 wgmma with a 64-register FP32
#   accumulator per thread, which leaves room for the tile's softmax update (another 64 live values) without spills.
#   4 stages of 64-wide H slices (4 x 32 KiB of shared memory) keep ~3 slices of h and W in flight across the flat
#   (tile, slice) loop, which at ~3.3 TB/s and 128 FLOP/byte per slice hides HBM/L2 latency. The alternative, a
#   64-row tile on 8 warps (169 registers, no spill with the single pass's logits store; on 4 warps it spills 24
#   bytes there), doubles the row blocks for small N; 3 stages trade latency hiding for shared memory.
# - fwd, half, sm80: mma.sync keeps the accumulator in the issuing warp's registers, and with the flat loop's
#   epilogue a 128x128 tile on 8 warps needs 255 registers and spills 28-44 bytes (the gate's figures), so the
#   default is 128x64 (186 registers, 255 with the single pass's logits store, no spill in either; the 128 rows
#   share each W tile, the larger operand) at 4 stages (73 KiB). 128x64 on 4 warps spills on sm_90 too, and is not
#   shipped. (Two blocks per SM would need <= 128 registers at 8 warps: none of these tiles gets there.)
# - fp32 (tf32 / 3xTF32) tiles: 3xTF32 keeps hi and lo parts of both operands, so the H slice is 16-32 wide and the
#   output tile 64x128 (larger ones spill on sm_80).
# - dz: the forward's logit GEMM without the vocabulary loop, plus the [BLOCK_N, BLOCK_V] store of dz: the same tiles.
# - matmul (dW, dh): classic GEMM tiles; 128x128x64 on 8 warps at 4 stages on sm_90 (the Triton tutorial's Hopper
#   choice), 3 stages on sm_80. 128x256 tiles spill on both (their 128-register accumulator plus addresses).
_HALF_FWD_SM90 = [
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),   # 244-254 registers, 128 KiB: one block per SM
    KernelConfig(64, 128, 64, num_warps=8, num_stages=4),    # 169 registers: twice the row blocks for small N
    KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
]
_HALF_FWD_SM80 = [
    KernelConfig(128, 64, 64, num_warps=8, num_stages=4),    # 186 registers, 73 KiB
    KernelConfig(64, 128, 64, num_warps=8, num_stages=4),    # 196 registers
]
_FP32_FWD = [
    KernelConfig(64, 128, 16, num_warps=8, num_stages=3),
    KernelConfig(128, 64, 16, num_warps=8, num_stages=3),
    KernelConfig(64, 64, 32, num_warps=4, num_stages=3),
]
FWD_CONFIGS = {
    "sm90": {"half": _HALF_FWD_SM90, "fp32": _FP32_FWD},
    "sm80": {"half": _HALF_FWD_SM80, "fp32": _FP32_FWD},
}
DZ_CONFIGS = {
    "sm90": {"half": [KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
                      KernelConfig(64, 128, 64, num_warps=4, num_stages=4)],
             "fp32": [KernelConfig(64, 128, 16, num_warps=8, num_stages=3),
                      KernelConfig(64, 64, 32, num_warps=4, num_stages=3)]},
    "sm80": {"half": [KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
                      KernelConfig(64, 128, 64, num_warps=8, num_stages=4)],
             "fp32": [KernelConfig(64, 128, 16, num_warps=8, num_stages=3),
                      KernelConfig(64, 64, 32, num_warps=4, num_stages=3)]},
}
MATMUL_CONFIGS = {
    "sm90": {"half": [MatmulConfig(128, 128, 64, num_warps=8, num_stages=4),
                      MatmulConfig(128, 128, 64, num_warps=8, num_stages=3),
                      MatmulConfig(128, 64, 64, num_warps=4, num_stages=4)],
             "fp32": [MatmulConfig(128, 128, 16, num_warps=8, num_stages=3),
                      MatmulConfig(64, 128, 32, num_warps=8, num_stages=3)]},
    "sm80": {"half": [MatmulConfig(128, 128, 64, num_warps=8, num_stages=3),
                      MatmulConfig(128, 64, 64, num_warps=4, num_stages=4),
                      MatmulConfig(64, 128, 64, num_warps=4, num_stages=4)],
             "fp32": [MatmulConfig(128, 128, 16, num_warps=8, num_stages=3),
                      MatmulConfig(64, 128, 32, num_warps=8, num_stages=3)]},
}
ARCHS = {"sm80": 80, "sm90": 90}
# The interpreter runs numpy per block: small tiles keep CPU validation fast and exercise the edge masks.
INTERPRETER_CONFIG = KernelConfig(16, 32, 16, num_warps=1, num_stages=1, GROUP=2)
INTERPRETER_MATMUL_CONFIG = MatmulConfig(16, 32, 16, num_warps=1, num_stages=1, GROUP_M=2)

# Vocabulary spans of the forward are multiples of this, so every shipped BLOCK_V tiles a span exactly.
_SPAN_QUANTUM = 256
# Forward programs to aim for: enough to fill the SMs a couple of times over even when N is small; and at least
# _MIN_SPLITS vocabulary spans, so that a rasterization group (GROUP row blocks x spans) shares its h rows in L2.
_TARGET_PROGRAMS_PER_SM = 2
_MIN_SPLITS = 8


def _config_key(mode: KernelMode, dtype: torch.dtype) -> str:
    return "fp32" if (mode.cast_fp32 or dtype == torch.float32) else "half"


CONFIGS = {"fwd": FWD_CONFIGS, "dz": DZ_CONFIGS, "matmul": MATMUL_CONFIGS}


def arch_key(device: torch.device) -> str:
    """The config table of ``device``: ``"sm90"`` from compute capability 9 up, else ``"sm80"``."""
    if device.type != "cuda":
        return "sm90"
    return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"


def candidate_configs(kind: str, mode: KernelMode, dtype: torch.dtype, arch: str = "sm90") -> list:
    """The configs ``kind`` may launch with on ``arch`` for this operand class, the default first."""
    return CONFIGS[kind][arch][_config_key(mode, dtype)]


def default_config(kind: str, mode: KernelMode, dtype: torch.dtype, arch: str = "sm90"):
    """The fixed launch config for ``kind``; ``RLCORE_CONFIG_INDEX`` picks another entry of its list."""
    if is_interpreter():
        return INTERPRETER_MATMUL_CONFIG if kind == "matmul" else INTERPRETER_CONFIG
    configs = candidate_configs(kind, mode, dtype, arch)
    index = int(os.environ.get("RLCORE_CONFIG_INDEX", "0"))
    return configs[min(index, len(configs) - 1)]


# ---- opt-in autotuning -----------------------------------------------------------------------------------------------

_TUNED: dict = {}   # in-process cache: key -> index into the candidate list


def autotune_enabled() -> bool:
    """``RLCORE_AUTOTUNE=1`` (read at each call) on a GPU; never under the interpreter."""
    return os.environ.get("RLCORE_AUTOTUNE", "0") == "1" and not is_interpreter()


def n_bucket(N: int) -> int:
    """Rows rounded up to a power of two (at least 256): one tuning per bucket, not per batch size."""
    return max(256, triton.next_power_of_2(max(N, 1)))


def tuning_key(kind: str, H: int, V: int, dtype: torch.dtype, mode: KernelMode, arch: str, N: int) -> str:
    return f"{kind}|H={H}|V={V}|{dtype}|{mode.cast_fp32}:{mode.dot_precision}|{arch}|N<={n_bucket(N)}"


def _cache_path():
    path = os.environ.get("RLCORE_AUTOTUNE_CACHE")
    return path or os.path.join(os.path.expanduser("~"), ".cache", "rlcore", f"autotune-triton{triton.__version__}.json")


def _load_disk_cache() -> dict:
    import json

    try:
        with open(_cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_disk_cache(entries: dict) -> None:
    import json

    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home: the in-process cache still holds the choice


def choose_config(kind, mode, dtype, device, H, V, N, bench=None, timer=None, role=""):
    """The config to launch ``kind`` with. Off (default): ``default_config``. With ``RLCORE_AUTOTUNE=1``: time each
    candidate once per ``tuning_key`` (H, V, dtype, mode, architecture, N bucket) by ``bench(cfg)`` (a launch on
    scratch outputs) under ``timer`` (default ``triton.testing.do_bench``), keep the fastest in the process and in a
    JSON file (``RLCORE_AUTOTUNE_CACHE``, default ``~/.cache/rlcore/autotune-triton<version>.json``, keyed also by
    the device name). A candidate that fails to launch (out of resources) counts as infinitely slow."""
    arch = arch_key(device)
    if is_interpreter() or not autotune_enabled() or bench is None:
        return default_config(kind, mode, dtype, arch)
    configs = candidate_configs(kind, mode, dtype, arch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = f"{name}|{role}|{tuning_key(kind, H, V, dtype, mode, arch, N)}"
    if key not in _TUNED:
        disk = _load_disk_cache()
        if key in disk and 0 <= disk[key]["index"] < len(configs):
            _TUNED[key] = disk[key]["index"]
        else:
            timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40))
            times = []
            for cfg in configs:
                try:
                    times.append(float(timer(lambda cfg=cfg: bench(cfg))))
                except Exception:   # noqa: BLE001 - OutOfResources and kin: this candidate cannot run here
                    times.append(float("inf"))
            best = min(range(len(configs)), key=times.__getitem__)
            _TUNED[key] = best
            disk = _load_disk_cache()
            disk[key] = {"index": best, "config": repr(configs[best]), "ms": times}
            _save_disk_cache(disk)
    return configs[_TUNED[key]]


def _upcast(mode: KernelMode, dtype: torch.dtype) -> bool:
    return is_interpreter() and not mode.cast_fp32 and dtype == torch.bfloat16


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of "SMs" so that the split-vocabulary merge is exercised


def _vocab_span(n_row_blocks: int, V: int, device: torch.device) -> int:
    target = _TARGET_PROGRAMS_PER_SM * _num_sms(device)
    splits = max(_MIN_SPLITS, triton.cdiv(target, max(n_row_blocks, 1)))
    splits = max(1, min(triton.cdiv(V, _SPAN_QUANTUM), splits))
    return triton.cdiv(triton.cdiv(V, splits), _SPAN_QUANTUM) * _SPAN_QUANTUM


# ----------------------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------------------


def merge_partials(part: torch.Tensor):
    """Merge the per-span states ``part [4, SPLITS, N]`` into ``(lse, ent, z_target)``, each ``[N]`` float32."""
    m, s, a, zt = part.unbind(0)                                  # [SPLITS, N] each
    big_m = m.amax(0)                                             # [N]
    ref = torch.where(torch.isneginf(big_m), torch.zeros_like(big_m), big_m)
    w = torch.exp(m - ref)                                        # [SPLITS, N]
    big_s = (s * w).sum(0)
    big_a = torch.where(s > 0, w * (a + s * (m - ref)), torch.zeros_like(a)).sum(0)
    log_s = torch.log(big_s)
    return ref + log_s, log_s - big_a / big_s, zt.sum(0)


def linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp: float, ignore_index: int, mode: KernelMode,
                        z_out=None, softcap: float = 0.0):
    """Launch the forward. ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` (validated).

    Returns ``(lse, ent, z_target)`` as float32 ``[N]`` tensors. ``z_out``: an FP32 ``[N, V]`` contiguous tensor that
    receives the logits (after bias, cap and temperature) as they are formed (the fused loss's single pass).
    ``softcap > 0``: the logits are
    ``softcap * tanh((h W^T + b) / softcap) * inv_temp`` (the ``SOFTCAP`` variant of the kernel; 0 launches the
    uncapped one).
    """
    targets = targets.contiguous()                      # the kernels index targets and bias with unit stride
    bias = bias.contiguous() if bias is not None else None
    N, H = hidden.shape
    V = weight.shape[0]

    def launch(cfg):
        n_blocks = triton.cdiv(N, cfg.BLOCK_N)
        span = _vocab_span(n_blocks, V, hidden.device)
        splits = triton.cdiv(V, span)
        part = torch.empty((4, splits, N), device=hidden.device, dtype=torch.float32)
        _fwd_kernel[(n_blocks * splits,)](
            hidden, weight, bias if bias is not None else hidden, targets, part, z_out if z_out is not None else part,
            N, V, H, span, splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_temp, ignore_index, float(softcap) if softcap > 0 else 1.0,
            HAS_BIAS=bias is not None, Z_OUT=z_out is not None, SOFTCAP=softcap > 0,
            CAST_FP32=mode.cast_fp32, DOT_PRECISION=mode.dot_precision, UPCAST=_upcast(mode, hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
        )
        return part

    part = launch(choose_config("fwd", mode, hidden.dtype, hidden.device, H, V, N, bench=launch))
    return merge_partials(part)


def _matmul(x, y, out, mode: KernelMode, accumulate: bool, rows: int = 0, live=None) -> None:
    """``out (+)= x @ y`` with FP32 accumulation; ``x [M, K]`` and ``y [K, N]`` may be strided views. ``rows`` and
    ``live``: see ``_matmul_kernel``'s ROWS (for ``rows=2`` the list of live K blocks is built here, on the device)."""
    M, K = x.shape
    N = y.shape[1]

    def launch(cfg, out=out, accumulate=accumulate):
        klist, kcount = _live_blocks(live, cfg.BLOCK_K) if rows == 2 else (out, out)
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
        _matmul_kernel[grid](
            x, y, out, live if live is not None else out, klist, kcount, M, N, K,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            ACCUMULATE=accumulate, ROWS=rows, CAST_FP32=mode.cast_fp32, DOT_PRECISION=mode.dot_precision,
            UPCAST=_upcast(mode, x.dtype), ROUND_BF16=is_interpreter() and out.dtype == torch.bfloat16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
        )

    # tuned on a scratch output, never accumulating: the timing runs must not touch `out`
    bench = lambda cfg: launch(cfg, out=torch.empty_like(out), accumulate=False)  # noqa: E731
    n_rows, width = (K, M) if rows == 2 else (M, K)   # the op's rows, the vocabulary slice
    launch(choose_config("matmul", mode, x.dtype, x.device, N, width, n_rows, bench=bench, role=f"rows{rows}"))


def _live_blocks(live: torch.Tensor, block: int):
    """The row blocks of ``block`` rows that hold a live row, for the dW GEMM's K loop, computed on the device (no
    host sync): ``(order [n_blocks] int32, live blocks first, in order; count [1] int32)``."""
    n_blocks = triton.cdiv(live.numel(), block)
    padded = torch.nn.functional.pad(live, (0, n_blocks * block - live.numel()))
    any_live = padded.view(n_blocks, block).amax(1)                                    # [n_blocks] int8
    order = torch.argsort(1 - any_live, stable=True).to(torch.int32)
    return order, any_live.sum(dtype=torch.int32).reshape(1)


# The dz buffer of one vocabulary slice holds max(2 N H, 2^24) elements: as much again as dh's FP32 buffer, so the
# backward's extra memory stays O(N H), but never so few that a small batch walks the vocabulary in many tiny slices
# (each slice is three launches). Each slice costs one pass over dh (N H FP32 read and written); at N = 16384,
# H = 4096, V = 152k that is ~19 slices, a few percent of the GEMM time (see the module doc).
_DZ_BUFFER_FACTOR = 2
_DZ_BUFFER_MIN_ELEMENTS = 2**24
_SLICE_QUANTUM = 256


def _vocab_slice(N: int, V: int, H: int) -> int:
    """Columns of the vocabulary per backward slice."""
    if is_interpreter():
        return 64  # several slices even at test sizes, so the slice bookkeeping is exercised
    cols = max(_DZ_BUFFER_FACTOR * H, _DZ_BUFFER_MIN_ELEMENTS // max(N, 1))
    cols = max(_SLICE_QUANTUM, cols // _SLICE_QUANTUM * _SLICE_QUANTUM)
    return min(cols, triton.cdiv(V, _SLICE_QUANTUM) * _SLICE_QUANTUM)


BWD_GEMMS = ("auto", "triton", "torch")


def bwd_gemm(mode: KernelMode, dtype: torch.dtype, device: torch.device) -> str:
    """Which GEMMs the backward uses for dW and dh: ``"triton"`` (``_matmul_kernel``) or ``"torch"`` (``torch.mm``:
    cuBLAS on a GPU), from ``RLCORE_BWD_GEMM`` (``auto`` | ``triton`` | ``torch``; read at each call, so a benchmark
    can switch it).

    ``auto`` is ``torch`` for half-precision GEMMs on CUDA (see the module doc, "Backward GEMMs": cuBLAS is expected
    ~10-25% faster than a Triton GEMM at fixed tiles on these shapes, and the compaction it needs costs one host sync
    and a gather of the live rows, well under 1% of the backward), and ``triton`` for the FP32 modes (``tf32x3`` has no
    cuBLAS counterpart that keeps the error bar) and during CUDA-graph capture (the compaction syncs).
    """
    choice = os.environ.get("RLCORE_BWD_GEMM", "auto")
    if choice not in BWD_GEMMS:
        raise ValueError(f"RLCORE_BWD_GEMM must be one of {BWD_GEMMS}, got {choice!r}")
    half = not mode.cast_fp32 and dtype != torch.float32
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if choice == "auto":
        choice = "torch" if half and device.type == "cuda" and not capturing else "triton"
    if choice == "torch" and (not half or capturing):
        choice = "triton"   # FP32 operands keep the precision mode's own dot; nothing may sync while capturing
    return choice


_ADDMM_FP32_OUT = [None]  # whether this torch has addmm(..., out_dtype=float32) for half operands on CUDA


def _addmm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: KernelMode) -> None:
    """``out [M, N] FP32 += a [M, K] @ b [K, N]`` (half operands) with FP32 accumulation and output. On CUDA:
    ``torch.addmm(..., out_dtype=torch.float32)`` where the installed torch has it (cuBLAS, beta = 1), else the
    Triton GEMM; on CPU (the interpreter tests) the same numbers by an FP32 ``addmm_`` of the upcast operands."""
    if a.device.type != "cuda":
        out.addmm_(a.float(), b.float())
        return
    if _ADDMM_FP32_OUT[0] is not False:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            _ADDMM_FP32_OUT[0] = True
            return
        except (TypeError, RuntimeError):
            _ADDMM_FP32_OUT[0] = False
    _matmul(a, b, out, mode, accumulate=True)


def linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent,
                        inv_temp: float, ignore_index: int, mode: KernelMode,
                        compute_dh: bool = True, compute_dw: bool = True, compute_db: bool = True,
                        softcap: float = 0.0):
    """Launch the backward, one vocabulary slice at a time. Returns ``(dh [N, H] FP32 | None, dW [V, H] in the
    weight's dtype | None, db [V] FP32 | None)``.

    Per slice ``[v0, v0 + C)``: ``_dz_kernel`` writes ``dz [N, C]`` (in the GEMM dtype: the inputs' half dtype, or
    FP32), then ``dW[v0:v0+C] = dz^T @ h`` (complete over all rows, written once in the weight's dtype, no FP32
    ``[V, H]`` buffer), ``dh += dz @ W[v0:v0+C]`` into an FP32 buffer and ``db[v0:v0+C] = dz.sum(0)``.
    No atomics anywhere, so the result is deterministic. ``compute_*`` False skip that gradient; ``softcap`` as in
    the forward (``dz`` then carries the cap's slope ``1 - tanh^2``).

    Rows without gradient (``live_rows``) contribute exactly nothing, NaN or inf in their hidden state included, and
    their blocks are skipped: with Triton GEMMs by masks and a device-side list of live row blocks (no host sync);
    with ``torch.mm`` (``bwd_gemm``) the live rows are gathered first (one sync) and the whole slice loop runs on them.
    """
    from rlcore.chunked import live_rows

    targets = targets.contiguous()                      # the kernels index targets and bias with unit stride
    bias = bias.contiguous() if bias is not None else None
    live = live_rows(targets, grad_logp, grad_ent, ignore_index)
    gemm = bwd_gemm(mode, hidden.dtype, hidden.device)
    if gemm == "torch" and not bool(live.all()):
        N, H = hidden.shape
        rows = live.nonzero().squeeze(1)
        pick = lambda x: x[rows] if x is not None else None  # noqa: E731
        dh, dw, db = _bwd_slices(pick(grad_logp), pick(grad_ent), pick(hidden), weight, bias, pick(targets),
                                 pick(lse), pick(ent), torch.ones_like(rows, dtype=torch.int8), inv_temp,
                                 ignore_index, mode, gemm, compute_dh, compute_dw, compute_db, softcap)
        if dh is not None:
            full = torch.zeros((N, H), device=hidden.device, dtype=torch.float32)
            full[rows] = dh
            dh = full
        return dh, dw, db
    return _bwd_slices(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, live.to(torch.int8), inv_temp,
                       ignore_index, mode, gemm, compute_dh, compute_dw, compute_db, softcap)


def _bwd_slices(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, live, inv_temp, ignore_index, mode,
                gemm, compute_dh, compute_dw, compute_db, softcap=0.0):
    """The slice loop of ``linear_logprobs_bwd``; ``live [N] int8`` marks the rows that carry gradient."""
    N, H = hidden.shape
    V = weight.shape[0]
    dz_dtype = torch.float32 if mode.cast_fp32 else hidden.dtype
    cols = _vocab_slice(N, V, H)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    buf = torch.empty(N * cols, device=hidden.device, dtype=dz_dtype)
    dh = torch.empty((N, H), **f32) if compute_dh else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if compute_dw else None
    db = torch.empty((V,), **f32) if bias is not None and compute_db else None

    def dz_launch(cfg, v0, c, dz):
        _dz_kernel[(triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(c, cfg.BLOCK_V),)](
            hidden, weight, bias if bias is not None else hidden, targets, live, lse, ent,
            grad_logp, grad_ent if grad_ent is not None else grad_logp, dz,
            N, V, H, v0, c,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_temp, ignore_index, float(softcap) if softcap > 0 else 1.0,
            HAS_BIAS=bias is not None, HAS_GRAD_ENT=grad_ent is not None, SOFTCAP=softcap > 0,
            CAST_FP32=mode.cast_fp32, DOT_PRECISION=mode.dot_precision, UPCAST=_upcast(mode, hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
        )

    c0 = min(cols, V)
    cfg = choose_config("dz", mode, hidden.dtype, hidden.device, H, V, N,
                        bench=lambda cfg: dz_launch(cfg, 0, c0, buf[: N * c0].view(N, c0))) if N > 0 else None
    for i, v0 in enumerate(range(0, V, cols)):
        c = min(cols, V - v0)
        dz = buf[: N * c].view(N, c)                                                        # [N, c]
        if N > 0:
            dz_launch(cfg, v0, c, dz)
        if db is not None:
            db[v0:v0 + c] = dz.sum(0, dtype=torch.float32)
        if gemm == "torch":
            if dw is not None:
                torch.mm(dz.T, hidden, out=dw[v0:v0 + c])                                    # cuBLAS, [c, H]
            if dh is not None:
                if i == 0:
                    dh.zero_()
                _addmm_fp32(dh, dz, weight[v0:v0 + c], mode)                                 # [N, H] FP32
            continue
        if dw is not None:
            _matmul(dz.T, hidden, dw[v0:v0 + c], mode, accumulate=False, rows=2, live=live)   # [c, H]
        if dh is not None:
            _matmul(dz, weight[v0:v0 + c], dh, mode, accumulate=i > 0, rows=1, live=live)   # [N, H]
    return dh, dw, db
