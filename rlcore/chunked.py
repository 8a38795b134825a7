"""The chunked PyTorch backend of ``linear_logprobs``: the same math as the Triton kernels, a block of rows at a time.

Used with ``backend="torch"`` on any device, and on CPU for float64 inputs or where the compiled backend
(``rlcore.cpp``, the default on CPU) cannot be built. Each step holds a ``[C, V]`` block of logits with
``C * V <= CHUNK_ELEMENTS``, so the extra memory of forward and backward is O(N + V H) whatever ``N`` is: the ``[N, V]``
logits never exist. The GEMMs run in FP32 (float64 for float64 inputs), whatever the input dtype and precision mode:
there is no faster reduced-precision path on CPU, and FP32 satisfies every mode.

Math and notation: see ``rlcore/kernels/linear_logprobs.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

__all__ = ["CHUNK_ELEMENTS", "compute_dtype", "live_rows", "linear_logprobs_fwd", "linear_logprobs_bwd",
           "autocast_off", "add_head_grads"]

# 2^23 FP32 logits = 32 MiB per [C, V] temporary (~260 rows of a 32k vocabulary): measured on a 2-core CPU at
# N=8192, H=1024, V=32000, forward+backward took 16.2 s with 2^21, 13.3 s with 2^23, 14.1 s with 2^24 (materialised
# reference: 15.9 s). A few such temporaries are live at once, a constant next to any real head's O(N H + V H).
CHUNK_ELEMENTS = int(os.environ.get("RLCORE_CHUNK_ELEMENTS", 2**23))


def autocast_off(fn):
    """``fn`` run with autocast off on every device where it is on: rlcore's ops compute the heads from the tensors they
    are given, in the dtypes their precision modes state; an enclosing ``torch.autocast`` would otherwise round the
    chunked path's GEMMs to bf16 (the Triton and compiled kernels never see autocast). Wraps the ops' bodies."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)
    # Annotations resolved where fn is defined: torch.library reads the signature to infer an op's schema.
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _logits(h_c, w, b, inv_temp: float, softcap: float = 0.0):
    """``[C, V]`` logits ``cap(h_c w^T + b) / T``, with ``cap(a) = softcap tanh(a / softcap)`` when ``softcap > 0``."""
    z = h_c @ w.T                          # [C, V]
    if b is not None:
        z += b
    if softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z.mul_(inv_temp)


def _capped_logits(h_c, w, b, inv_temp: float, softcap: float):
    """``(logits, slope)``: the logits of ``_logits`` and, with ``softcap > 0``, ``d cap(a) / d a = 1 - tanh(a /
    softcap)^2`` (a second ``[C, V]`` block; ``None`` without a cap)."""
    if softcap <= 0:
        return _logits(h_c, w, b, inv_temp), None
    z = h_c @ w.T
    if b is not None:
        z += b
    t = z.div_(softcap).tanh_()
    slope = t.mul(t).neg_().add_(1.0)
    return t.mul_(softcap).mul_(inv_temp), slope


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp: float, softcap: float = 0.0):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` (validated); ``softcap > 0``
    caps the logits at ``softcap tanh(. / softcap)`` before the temperature (Gemma 2/3).

    Returns ``(lse, ent, z_target)``, each ``[N]`` in the compute dtype.
    """
    N = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype, weight.dtype)
    w, b = weight.to(cdt), _cast(bias, cdt)                      # a no-op when already in the compute dtype
    lse = torch.empty(N, dtype=cdt, device=hidden.device)
    ent = torch.empty_like(lse)
    zt = torch.empty_like(lse)
    safe_t = targets.long().clamp(0, weight.shape[0] - 1)        # ignored ids are masked by the caller
    step = _rows_per_chunk(weight.shape[0])
    for s in range(0, N, step):
        z = _logits(hidden[s:s + step].to(cdt), w, b, inv_temp, softcap)  # [C, V]
        lse_c = torch.logsumexp(z, dim=-1)                       # [C]
        zt[s:s + step] = z.gather(1, safe_t[s:s + step, None]).squeeze(1)
        zr = z.sub_(lse_c[:, None])                              # log p, in place
        p = zr.exp()
        zr.masked_fill_(p == 0, 0.0)                             # 0 log 0 = 0 (masked vocabulary)
        ent[s:s + step] = -(p.mul_(zr)).sum(-1)
        lse[s:s + step] = lse_c
        del z, zr, p  # free this chunk's [C, V] blocks before the next chunk allocates its own
    return lse, ent, zt


def live_rows(targets, grad_logp, grad_ent, ignore_index: int):
    """``[N]`` bool: the rows that carry gradient (a target that is not ``ignore_index`` and a non-zero upstream
    gradient). Every backend leaves the others out of all three gradients, so a NaN or inf in their hidden state
    (left padding under some attention masks holds them) never reaches ``dW``, ``db`` or ``dh`` (their ``dh`` is 0)."""
    live = (targets != ignore_index) & (grad_logp != 0)
    if grad_ent is not None:
        live |= (targets != ignore_index) & (grad_ent != 0)
    return live


def add_head_grads(dh, dw, db, sl: slice, dz, h, w) -> None:
    """One block of rows' logit gradients ``dz [C, V]`` into a head's buffers (``None``: not needed): ``dh[sl] = dz W``,
    ``dW += dz^T h``, ``db += sum_rows dz``."""
    if dh is not None:
        dh[sl] = dz @ w
    if dw is not None:
        dw.addmm_(dz.T, h)
    if db is not None:
        db += dz.sum(0)


def linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, inv_temp: float,
                        ignore_index: int, compute_dh: bool = True, compute_dw: bool = True,
                        compute_db: bool = True, softcap: float = 0.0):
    """Gradients ``(dh [N, H] | None, dW [V, H] | None, db [V] | None)`` in the compute dtype; recomputes the
    logits per chunk. ``compute_*`` False skip that gradient; ``softcap`` as in the forward.

    Rows without gradient (``live_rows``) contribute exactly nothing: their hidden states are zeroed before the
    GEMMs and their ``dz`` rows set to 0 (a zero ``dz`` alone would not do: ``0 * NaN``), and chunks holding none
    are skipped (one host sync for all chunks). The chunks are the forward's, so the recomputed logits are bitwise
    the forward's (logits of 1e4 leave no room for another GEMM blocking)."""
    N, V = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype, weight.dtype)
    w, b = weight.to(cdt), _cast(bias, cdt)
    live = live_rows(targets, grad_logp, grad_ent, ignore_index)
    g_lp = torch.where(live, grad_logp.to(cdt), 0.0)
    g_ent = torch.where(live, grad_ent.to(cdt), 0.0) if grad_ent is not None else None
    safe_t = targets.long().clamp(0, V - 1)
    dh = torch.zeros((N, hidden.shape[1]), dtype=cdt, device=hidden.device) if compute_dh else None
    dw = torch.zeros((V, hidden.shape[1]), dtype=cdt, device=hidden.device) if compute_dw else None
    db = torch.zeros(V, dtype=cdt, device=hidden.device) if bias is not None and compute_db else None
    step = _rows_per_chunk(V)
    n_chunks = -(-N // step)
    chunk_live = torch.nn.functional.pad(live, (0, n_chunks * step - N)).view(n_chunks, step).any(1).tolist()
    for s, any_live in zip(range(0, N, step), chunk_live):
        if not any_live:
            continue                                             # dh stays 0, nothing reaches dW or db
        sl = slice(s, s + step)
        keep = live[sl, None]
        h_c = torch.where(keep, hidden[sl].to(cdt), 0.0)         # [C, H]
        z, slope = _capped_logits(h_c, w, b, inv_temp, softcap)
        zr = z.sub_(lse[sl, None])                               # log p  [C, V]
        p = zr.exp()
        dz = p.mul(-g_lp[sl, None])                              # g_lp ([v == t] - p)
        dz.scatter_add_(1, safe_t[sl, None], g_lp[sl, None])
        if g_ent is not None:                                    # - g_ent p (log p + ent)
            zr.masked_fill_(p == 0, 0.0)
            dz.sub_(p.mul_(zr.add_(ent[sl, None])).mul_(g_ent[sl, None]))
        dz.mul_(inv_temp)
        if slope is not None:                                    # chain rule through cap(a)
            dz.mul_(slope)
        dz.masked_fill_(~keep, 0.0)                              # NaN lse of a dead row: its dz is exactly 0
        add_head_grads(dh, dw, db, sl, dz, h_c, w)
        del z, zr, p, dz, slope  # free this chunk's [C, V] blocks before the next chunk allocates its own
    return dh, dw, db
