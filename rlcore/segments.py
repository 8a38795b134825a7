"""Differentiable reductions over packed sequences (the flash-attn varlen layout).

``B`` sequences lie end to end along one token axis of length ``N``; sequence ``b`` holds the tokens
``[cu_seqlens[b], cu_seqlens[b + 1])``, with ``cu_seqlens = [0, len_0, len_0 + len_1, ..., N]`` (``[B + 1]``, int32 or
int64; empty sequences allowed). The RL losses use these ops for sequence-level quantities: GSPO's sequence ratio
``exp(segment_sum(log_ratio) / lengths)``, per-sequence sums of token losses, per-sequence advantages spread back
over their tokens.

Layers, bottom up:
    backends      ``rlcore.kernels.segments`` (Triton), and the PyTorch path below (``searchsorted`` segment ids,
                  then ``index_add_`` / ``index_select``)
    torch ops     ``rlcore::segment_sum`` and ``rlcore::segment_broadcast`` (``torch.library.custom_op``), each the
                  other's adjoint and so each the other's backward, with fake implementations, so
                  ``torch.compile(fullgraph=True)`` sees one op
    public        ``segment_sum``, ``segment_broadcast``: metadata checks, ``[N]`` / ``[K, N]`` shapes;
                  ``check_cu_seqlens`` (value checks, a host sync) and ``segment_ids``

Neither op syncs with the host on any backend: output shapes come from ``cu_seqlens.shape`` and ``num_tokens``,
never from its values, and the offsets are read on the device. The value checks live in ``check_cu_seqlens``, which
callers run behind a flag (see its docstring).
"""

from __future__ import annotations

import importlib
import numbers

import torch

__all__ = ["segment_sum", "segment_broadcast", "segment_ids", "check_cu_seqlens", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_OFFSET_DTYPES = (torch.int32, torch.int64)

def _kernels():
    """The Triton kernels, imported on first use (``TRITON_INTERPRET`` is read when they are decorated)."""
    return importlib.import_module(".kernels.segments", __package__)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, *, name: str = "cu_seqlens") -> None:
    """Raise unless ``cu_seqlens`` describes a packing of exactly ``num_tokens`` tokens.

    Checks: an int32 / int64 tensor (``TypeError``); 1-D with at least one element, starting at 0, non-decreasing
    (equal neighbours, i.e. empty sequences, are fine), ending at ``num_tokens`` (``ValueError``, naming ``name``).

    This reads the values, so on CUDA it is a host sync (one, for all checks together). ``segment_sum`` and
    ``segment_broadcast`` never call it: they check metadata only and stay sync-free (with unchecked bad offsets
    they return meaningless values, but never access memory out of bounds). Callers validate once per batch behind
    their own flag (e.g. a loss's ``check_cu_seqlens=True``) and turn it off in the hot path or under CUDA graphs.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _OFFSET_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor [B + 1] with at least one element, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "meta":
        return   # meta tensors carry shapes, no values: nothing more to check (shape-only runs)
    decreasing = cu_seqlens[1:] < cu_seqlens[:-1]                                           # [B]
    first, any_decreasing, last = torch.stack(
        [cu_seqlens[0].long(), decreasing.any().long(), cu_seqlens[-1].long()]).tolist()   # the one host sync
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {first}")
    if any_decreasing:
        i = int(decreasing.nonzero()[0, 0])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {int(cu_seqlens[i])} > "
                         f"{name}[{i + 1}] = {int(cu_seqlens[i + 1])}")
    if last != num_tokens:
        raise ValueError(f"{name} must end at N={num_tokens} (the number of tokens), got {name}[-1] = {last}")


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The segment of every token: ``[N]`` int64, ``ids[t] = b`` for ``cu_seqlens[b] <= t < cu_seqlens[b + 1]``.

    Equivalent to ``torch.searchsorted(cu_seqlens[1:], torch.arange(N), right=True)``; no host sync. Tokens at or
    past ``cu_seqlens[-1]`` get ``B`` (none exist when ``check_cu_seqlens`` passes).

    Example::

        >>> segment_ids(torch.tensor([0, 2, 2, 5]), 5)
        tensor([0, 0, 2, 2, 2])
    """
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)       # [N]
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)                # [N] int64 in [0, B]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``segment_ids`` with tokens outside ``[cu[0], cu[-1])`` sent to the spare slot ``B`` (see the torch paths)."""
    ids = segment_ids(cu_seqlens, num_tokens)                                             # [N]
    t = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.where(t < cu_seqlens[0], cu_seqlens.shape[0] - 1, ids)


def _segment_sum_torch(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``x [K, N]`` -> ``[K, B]``: ``index_add_`` into ``B + 1`` slots (the last catches tokens outside every
    segment), accumulated in FP32 / float64."""
    K, N = x.shape
    B = cu_seqlens.shape[0] - 1
    acc = torch.zeros((K, B + 1), device=x.device, dtype=_accumulate_dtype(x.dtype))     # [K, B + 1]
    acc.index_add_(1, _torch_ids(cu_seqlens, N), x.to(acc.dtype))
    return acc[:, :B].to(x.dtype).contiguous()


def _segment_broadcast_torch(s: torch.Tensor, cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """``s [K, B]`` -> ``[K, N]``: ``index_select`` from ``s`` padded with a zero column (tokens outside)."""
    s_pad = torch.cat([s, s.new_zeros((s.shape[0], 1))], dim=1)                          # [K, B + 1]
    return s_pad.index_select(1, _torch_ids(cu_seqlens, N))                              # [K, N]


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlcore::segment_sum", mutates_args=())
def _segment_sum_op(x: torch.Tensor, cu_seqlens: torch.Tensor, backend: str) -> torch.Tensor:
    """``x [K, N]``, ``cu_seqlens [B + 1]`` -> ``[K, B]`` in x's dtype (``backend`` resolved: "triton" | "torch")."""
    if backend == "triton":
        return _kernels().segment_sum_fwd(x, cu_seqlens)
    return _segment_sum_torch(x, cu_seqlens)


@_segment_sum_op.register_fake
def _(x, cu_seqlens, backend):
    return x.new_empty((x.shape[0], cu_seqlens.shape[0] - 1))


@torch.library.custom_op("rlcore::segment_broadcast", mutates_args=())
def _segment_broadcast_op(s: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int, backend: str) -> torch.Tensor:
    """``s [K, B]``, ``cu_seqlens [B + 1]`` -> ``[K, num_tokens]`` in s's dtype."""
    if backend == "triton":
        return _kernels().segment_broadcast_fwd(s, cu_seqlens, num_tokens)
    return _segment_broadcast_torch(s, cu_seqlens, num_tokens)


@_segment_broadcast_op.register_fake
def _(s, cu_seqlens, num_tokens, backend):
    return s.new_empty((s.shape[0], num_tokens))


def _sum_setup_context(ctx, inputs, output):
    x, cu_seqlens, backend = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.num_tokens, ctx.backend = x.shape[1], backend


def _sum_backward(ctx, grad):
    # d/dx[k, t] of sum_b g[k, b] out[k, b] = g[k, seg(t)]: the broadcast of the upstream gradient.
    (cu_seqlens,) = ctx.saved_tensors
    return _segment_broadcast_op(grad, cu_seqlens, ctx.num_tokens, ctx.backend), None, None


def _broadcast_setup_context(ctx, inputs, output):
    _, cu_seqlens, _, backend = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.backend = backend


def _broadcast_backward(ctx, grad):
    # d/ds[k, b] of sum_t g[k, t] out[k, t] = sum of g[k, t] over the tokens of segment b: the segment sum.
    (cu_seqlens,) = ctx.saved_tensors
    return _segment_sum_op(grad, cu_seqlens, ctx.backend), None, None, None


torch.library.register_autograd("rlcore::segment_sum", _sum_backward, setup_context=_sum_setup_context)
torch.library.register_autograd("rlcore::segment_broadcast", _broadcast_backward,
                                setup_context=_broadcast_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------------


def _check_common(name: str, v: torch.Tensor, cu_seqlens: torch.Tensor, backend: str) -> str:
    """Metadata checks shared by both ops (no host sync); returns the resolved backend."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in _FLOATS:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {v.dtype}")
    if v.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [N] / [B] or [K, N] / [K, B], got {tuple(v.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _OFFSET_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B + 1] with at least one element, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != v.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {v.device}; they must share a device")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if v.device.type == "cuda" else "torch"
    if backend == "triton" and v.device.type != "cuda" and not _kernels().is_interpreter():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {v.device}), or TRITON_INTERPRET=1 set before rlcore's kernels "
            "are first imported, to run them in Triton's CPU interpreter"
        )
    return backend


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sum of each packed sequence: ``[N] -> [B]``, or row-wise ``[K, N] -> [K, B]``. Differentiable in ``x``.

    Equivalent to::

        torch.stack([x[..., cu_seqlens[b]:cu_seqlens[b + 1]].sum(-1) for b in range(B)], -1)

    with empty sequences giving 0. Accumulated in FP32 (float64 for float64 ``x``), returned in x's dtype.
    Bitwise reproducible with Triton (no atomics) and on CPU; ``backend="torch"`` on CUDA runs ``index_add_``, whose
    CUDA kernel adds with atomics. No host sync, and ``cu_seqlens``' values are not checked (see
    ``check_cu_seqlens``); tokens outside ``[cu_seqlens[0], cu_seqlens[-1])`` count nowhere.

    Args:
        x: ``[N]`` or ``[K, N]`` per-token values (bf16, fp16, fp32, float64), any strides.
        cu_seqlens: ``[B + 1]`` int32 / int64 offsets on x's device.
        backend: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``[B]`` or ``[K, B]``, in x's dtype. Its gradient is ``segment_broadcast(grad, cu_seqlens, N)``.

    Example::

        >>> segment_sum(torch.tensor([1., 2., 3., 4., 5.]), torch.tensor([0, 2, 2, 5]))
        tensor([ 3.,  0., 12.])
    """
    backend = _check_common("x", x, cu_seqlens, backend)
    out = _segment_sum_op(x.unsqueeze(0) if x.dim() == 1 else x, cu_seqlens, backend)  # [K, B]
    return out.squeeze(0) if x.dim() == 1 else out


def segment_broadcast(s: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int, *,
                      backend: str = "auto") -> torch.Tensor:
    """Spread one value per sequence over its tokens: ``[B] -> [N]``, or row-wise ``[K, B] -> [K, N]``.
    Differentiable in ``s``; the adjoint of ``segment_sum``.

    Equivalent to ``s[..., segment_ids(cu_seqlens, num_tokens)]``, with 0 for tokens outside
    ``[cu_seqlens[0], cu_seqlens[-1])``. No host sync; ``cu_seqlens``' values are not checked (see
    ``check_cu_seqlens``).

    Args:
        s: ``[B]`` or ``[K, B]`` per-sequence values (bf16, fp16, fp32, float64), any strides.
        cu_seqlens: ``[B + 1]`` int32 / int64 offsets on s's device.
        num_tokens: ``N``, the length of the packed token axis (a Python int: the output's shape never depends on
            ``cu_seqlens``' values, so nothing is read back from the device).
        backend: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``[N]`` or ``[K, N]``, in s's dtype. Its gradient is ``segment_sum(grad, cu_seqlens)``.

    Example::

        >>> segment_broadcast(torch.tensor([1., 2., 3.]), torch.tensor([0, 2, 2, 5]), 5)
        tensor([1., 1., 3., 3., 3.])
    """
    backend = _check_common("s", s, cu_seqlens, backend)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    B = cu_seqlens.shape[0] - 1
    if s.shape[-1] != B:
        raise ValueError(f"s must have shape [B] or [K, B] with B = len(cu_seqlens) - 1 = {B}, got {tuple(s.shape)}")
    out = _segment_broadcast_op(s.unsqueeze(0) if s.dim() == 1 else s, cu_seqlens, num_tokens, backend)  # [K, N]
    return out.squeeze(0) if s.dim() == 1 else out
