"""The Triton head of ``fused_policy_loss``'s single pass: a slice of whole sequences' logits formed once, in FP32,
turned into ``dz`` once the slice's loss gradient is known, then ``dh`` and ``dW``: three head GEMMs in all.

Per slice of ``C`` loss rows (``rlcore.fused`` picks the slices and differentiates the loss between the two calls):

``logprobs(h_c, targets)``
    ``_fwd_kernel`` with ``Z_OUT``: the forward of ``linear_logprobs`` (one GEMM, the online log-sum-exp, the
    entropy) that also stores each FP32 logit tile into a ``[C, V]`` buffer. Returns ``(logp, entropy)``.
``backward(g_logp, g_entropy)``
    ``_dz_from_logits_kernel`` reads the stored logits once and writes ``dz`` (the same formula as the two-pass
    backward's ``_dz_kernel``, with no GEMM); then ``dh_c = dz @ W`` and ``dW += dz^T h_c`` (FP32 accumulator over the
    slices), with the GEMMs ``bwd_gemm`` picks (Triton's or cuBLAS), and ``db += dz.sum(0)``. Returns ``dh_c``.

Against the two-pass composition (four GEMMs: the logits, their recomputation for dz, dh, dW) this saves one GEMM
(~25% of the GEMM time) for ``C V`` FP32 written and read once and ``C V`` half-precision dz: at V = 152k that is
~10 bytes per logit, ~7% of the GEMM time at H = 4096 on an H100. The price is memory: the slice's FP32 logits
(``budget`` elements, ``rlcore.fused.TRITON_CHUNK_BUDGET``) and an FP32 ``[V, H]`` accumulator for dW.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear_logprobs as K
from .common import is_interpreter

__all__ = ["SliceHead"]

# Elementwise tiles of the dz kernel: 4 rows x 1024 FP32 logits = 16 KiB read per program, 32 values per thread on
# 4 warps. 8 rows took 218 registers with the entropy term (the gate's figure): fewer resident warps for a kernel that
# only streams memory. No dot, so nothing to tune per architecture.
_DZ_BLOCK_N, _DZ_BLOCK_V, _DZ_WARPS = 4, 1024, 4
_INTERP_DZ_BLOCK_N, _INTERP_DZ_BLOCK_V = 4, 32
# A target id no row has: every row of a slice carries gradient, so no row block of the forward may be skipped.
_NO_IGNORE = -(2**31)


@triton.jit
def _dz_from_logits_kernel(
    z_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, C, V, inv_temp, softcap,
    HAS_GRAD_ENT: tl.constexpr, SOFTCAP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``dz [C, V]`` from the stored logits ``z [C, V]`` (FP32, after temperature): per row, with ``log p = z - lse``,
    ``dz = (g_lp ([v == t] - p) - g_ent p (log p + ent)) / T``; with ``SOFTCAP`` (the stored logits are capped) times
    the cap's slope ``1 - tanh^2`` (``K._cap_slope``)."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n = o_n < C
    m = m_n[:, None] & (o_v[None, :] < V)
    off = o_n[:, None].to(tl.int64) * V + o_v[None, :]
    b_z = tl.load(z_ptr + off, mask=m, other=float("-inf"))
    b_lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)
    b_glp = tl.load(glp_ptr + o_n, mask=m_n, other=0.0)
    b_t = tl.load(t_ptr + o_n, mask=m_n, other=-1).to(tl.int64)
    b_zr = b_z - b_lse[:, None]
    b_p = tl.where(m, tl.exp(b_zr), 0.0)
    b_dz = tl.where(o_v[None, :].to(tl.int64) == b_t[:, None], b_glp[:, None], 0.0) - b_glp[:, None] * b_p
    if HAS_GRAD_ENT:
        b_gent = tl.load(gent_ptr + o_n, mask=m_n, other=0.0)
        b_ent = tl.load(ent_ptr + o_n, mask=m_n, other=0.0)
        b_dz -= b_gent[:, None] * tl.where(b_p > 0, b_p * (b_zr + b_ent[:, None]), 0.0)
    b_dz = b_dz * inv_temp
    if SOFTCAP:  # the chain rule through the cap, its slope from the stored (capped) logits
        b_dz = b_dz * K._cap_slope(b_z, softcap, inv_temp)
    if ROUND_BF16:
        b_dz = K._round_bf16(b_dz)  # the interpreter's store to bf16 truncates; the GPU's rounds to nearest
    tl.store(dz_ptr + off, b_dz.to(dz_ptr.dtype.element_ty), mask=m)


class SliceHead:
    """The head's share of a single pass, for one batch: call ``logprobs`` then ``backward`` per slice, then read
    ``dw`` (FP32 ``[V, H]``) and ``db`` (FP32 ``[V]`` or None).

    ``weight [V, H]``, ``bias [V] | None``, detached; ``fwd_mode`` / ``bwd_mode``: the ``KernelMode`` of each pass,
    from ``rlcore.logprobs._kernel_mode`` (so every precision mode means what it means for ``linear_logprobs``);
    ``softcap``: ``linear_logprobs``'s (0: none).
    """

    def __init__(self, weight, bias, inv_temp: float, fwd_mode, bwd_mode, softcap: float = 0.0):
        self.weight = weight
        self.bias = bias.contiguous() if bias is not None else None
        self.inv_temp = float(inv_temp)
        self.fwd_mode, self.bwd_mode = fwd_mode, bwd_mode
        self.softcap = float(softcap)
        V, H = weight.shape
        f32 = dict(device=weight.device, dtype=torch.float32)
        self.dw = torch.zeros((V, H), **f32)
        self.db = torch.zeros((V,), **f32) if bias is not None else None
        self._state = None

    def logprobs(self, h_c: torch.Tensor, targets: torch.Tensor):
        """``h_c [C, H]`` (the slice's loss rows), ``targets [C]`` in ``[0, V)`` -> ``(logp [C], entropy [C])``
        FP32, holding the slice's FP32 logits for ``backward``."""
        C, V = h_c.shape[0], self.weight.shape[0]
        targets = targets.contiguous()
        z = torch.empty((C, V), device=h_c.device, dtype=torch.float32)
        if C == 0:
            lse = ent = zt = torch.zeros((0,), device=h_c.device, dtype=torch.float32)
        else:
            lse, ent, zt = K.linear_logprobs_fwd(h_c, self.weight, self.bias, targets, self.inv_temp, _NO_IGNORE,
                                                 self.fwd_mode, z_out=z, softcap=self.softcap)
        self._state = (h_c, targets, z, lse, ent)
        return zt - lse, ent

    def backward(self, g_logp: torch.Tensor, g_ent) -> torch.Tensor:
        """The slice's upstream gradients (``[C]`` each, ``g_ent`` may be None) -> ``dh_c [C, H]`` FP32; adds the
        slice's share to ``dw`` and ``db``."""
        h_c, targets, z, lse, ent = self._state
        self._state = None
        C, H = h_c.shape
        V = self.weight.shape[0]
        dh = torch.zeros((C, H), device=h_c.device, dtype=torch.float32)
        if C == 0:
            return dh
        mode = self.bwd_mode
        dz_dtype = torch.float32 if mode.cast_fp32 else h_c.dtype
        dz = torch.empty((C, V), device=h_c.device, dtype=dz_dtype)
        g_logp = g_logp.to(torch.float32).contiguous()
        g_ent = g_ent.to(torch.float32).contiguous() if g_ent is not None else None
        bn, bv = (_INTERP_DZ_BLOCK_N, _INTERP_DZ_BLOCK_V) if is_interpreter() else (_DZ_BLOCK_N, _DZ_BLOCK_V)
        _dz_from_logits_kernel[(triton.cdiv(C, bn), triton.cdiv(V, bv))](
            z, targets, lse, ent, g_logp, g_ent if g_ent is not None else g_logp, dz, C, V, self.inv_temp,
            self.softcap if self.softcap > 0 else 1.0,
            HAS_GRAD_ENT=g_ent is not None, SOFTCAP=self.softcap > 0, ROUND_BF16=is_interpreter() and dz_dtype == torch.bfloat16,
            BLOCK_N=bn, BLOCK_V=bv, num_warps=_DZ_WARPS,
        )
        del z
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)
        if K.bwd_gemm(mode, h_c.dtype, h_c.device) == "torch":
            K._addmm_fp32(dh, dz, self.weight, mode)                        # dh_c = dz @ W         [C, H]
            K._addmm_fp32(self.dw, dz.T, h_c, mode)                         # dW += dz^T h_c        [V, H]
        else:
            K._matmul(dz, self.weight, dh, mode, accumulate=False)
            K._matmul(dz.T, h_c, self.dw, mode, accumulate=True)
        return dh
