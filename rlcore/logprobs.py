"""``linear_logprobs``: per-token log-probs (and entropy) of targets straight from hidden states and the LM head.

Layers, bottom up:
    backends      ``rlcore.kernels.linear_logprobs`` (Triton), ``rlcore.chunked`` (PyTorch, a block of rows at a time),
                  ``rlcore.cpp`` (compiled C++, CPU only: ``csrc/linear_logprobs_cpu.cpp``)
    torch ops     ``rlcore::linear_logprobs`` and ``rlcore::linear_logprobs_backward`` (``torch.library.custom_op``),
                  with fake implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` sees one op;
                  the compiled backend is their kernel for the CPU device (``register_kernel("cpu")``)
    public        ``linear_logprobs``: argument checks, ``[..., H]`` flattening, return shape
"""

from __future__ import annotations

import math
import importlib
import numbers
from typing import Optional

import torch

from . import chunked, cpp, distributed

__all__ = ["linear_logprobs", "PRECISIONS", "BACKENDS"]

PRECISIONS = ("default", "tf32", "fp32")
BACKENDS = ("auto", "triton", "torch", "cpp")
_HALF = (torch.bfloat16, torch.float16)
_FP32_MAX = torch.finfo(torch.float32).max
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

def _kernels():
    """The Triton kernels, imported on first use (``TRITON_INTERPRET`` is read when they are decorated)."""
    return importlib.import_module(".kernels.linear_logprobs", __package__)


def _kernel_mode(precision: str, h_dtype: torch.dtype, w_dtype: torch.dtype, kind: str):
    """Map the user's precision to the kernels' (CAST_FP32, DOT_PRECISION) switches for ``kind`` in {"fwd", "bwd"}.

    - Same-dtype half inputs go to the tensor cores as they are: bf16/fp16 products are exact in the FP32
      accumulator, so the forward already is the FP32 computation of those inputs, in every mode. The backward
      rounds ``dz`` to the input dtype for its two GEMMs, except with ``precision="fp32"``, where ``dz`` stays FP32
      and meets the upcast tiles in one TF32 pass (half values are exact in TF32; ``dz`` keeps 10 mantissa bits).
    - FP32 or mixed operands: "default" and "fp32" use 3xTF32, FP32-accurate on tensor cores; "tf32" one pass.
    """
    mode_cls = _kernels().KernelMode
    if h_dtype == w_dtype and h_dtype in _HALF:
        if kind == "bwd" and precision == "fp32":
            return mode_cls(cast_fp32=True, dot_precision="tf32")
        return mode_cls(cast_fp32=False, dot_precision="tf32")
    return mode_cls(cast_fp32=True, dot_precision="tf32" if precision == "tf32" else "tf32x3")


def _dtype_pairs():
    """(hidden, weight) dtype pairs the op takes, with the precisions each is valid under (float64 aside)."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        yield dt, dt, PRECISIONS
    for dt in _HALF:
        yield dt, torch.float32, ("tf32", "fp32")   # half activations under an FP32 head


def launched_modes():
    """Every ``(kind, hidden dtype, weight dtype, KernelMode)`` the op can launch on the Triton backend.

    ``tests/gpu_compile_check.py`` compiles each of them with every shipped config for sm_80 and sm_90.
    """
    modes = {}
    for h_dt, w_dt, precisions in _dtype_pairs():
        for precision in precisions:
            for kind in ("fwd", "bwd"):
                mode = _kernel_mode(precision, h_dt, w_dt, kind)
                modes[(kind, h_dt, w_dt, mode)] = None
    return list(modes)


def _check_target_range(targets: torch.Tensor, V: int, ignore_index: int,
                        bias: Optional[torch.Tensor] = None) -> None:
    """Raise on ids outside ``[0, V)`` that are not ``ignore_index``, and on a ``bias`` that is ``-inf`` for every
    entry (no token could have probability > 0: the log-probs would be NaN); runs before any kernel.

    This is the one host sync of the op (it has to be, to raise): a reduction over ``[N]`` ids (and ``[V]`` bias
    entries), read back together.
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    any_bad = bad.any()
    if bias is not None and targets.numel():
        none_finite = torch.isneginf(bias).all()
        any_bad, none_finite = torch.stack([any_bad, none_finite]).tolist()
        if none_finite:
            raise ValueError("bias is -inf for every vocabulary entry: no token can have probability > 0 (a -inf "
                             "bias masks an entry; at least one must stay finite)")
    if bool(any_bad):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets: id {first} is outside [0, {V}) (V = weight.shape[0]) and is not ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------


def _portable_fwd(backend: str, precision: str, hidden: torch.Tensor, weight: torch.Tensor, ignore_index: int,
                  softcap: float = 0.0):
    """The forward of a device-generic backend, as ``fn(hidden, weight, bias, targets, inv_temp) -> (lse, ent, zt)``."""
    if backend == "triton":
        mode = _kernel_mode(precision, hidden.dtype, weight.dtype, "fwd")
        return lambda h, w, b, t, inv_temp: _kernels().linear_logprobs_fwd(h, w, b, t, inv_temp, ignore_index, mode,
                                                                           softcap=softcap)
    return lambda h, w, b, t, inv_temp: chunked.linear_logprobs_fwd(h, w, b, t, inv_temp, softcap)


def _forward(hidden, weight, bias, targets, temperature, ignore_index, check_targets, fwd):
    """The op's body around a backend's forward ``fwd``: empty input, the target check, masking ignored positions."""
    N, V = hidden.shape[0], weight.shape[0]
    dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)  # outputs: float32, float64 for float64 inputs
    if N == 0:
        return hidden.new_empty((0,), dtype=dtype), hidden.new_empty((0,), dtype=dtype), hidden.new_empty(
            (2, 0), dtype=dtype)
    if check_targets:
        _check_target_range(targets, V, ignore_index, bias)
    lse, ent, zt = fwd(hidden, weight, bias, targets, 1.0 / temperature)
    valid = targets != ignore_index
    logp = torch.where(valid, zt - lse, 0.0)
    return logp, torch.where(valid, ent, 0.0), torch.stack([lse, ent])


@torch.library.custom_op("rlcore::linear_logprobs", mutates_args=())
@chunked.autocast_off
def _linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    precision: str,
    backend: str,
    check_targets: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` -> ``(logp [N], entropy [N], stats [2, N])``.

    ``stats`` holds ``(lse, raw entropy)`` for the backward: an output of its own, not differentiable, so that the
    caller may edit ``logp`` and ``entropy`` in place.
    """
    fwd = _portable_fwd(backend, precision, hidden, weight, ignore_index, softcap)
    return _forward(hidden, weight, bias, targets, temperature, ignore_index, check_targets, fwd)


@_linear_logprobs_op.register_kernel("cpu")
@chunked.autocast_off
def _linear_logprobs_cpu(hidden, weight, bias, targets, temperature, ignore_index, precision, backend,
                         check_targets, softcap=0.0):
    """CPU tensors: the compiled kernels for ``backend="cpp"``; the other backends (the chunked path, Triton's
    interpreter) as on any device."""
    fwd = ((lambda h, w, b, t, inv_temp: cpp.linear_logprobs_fwd(h, w, b, t, inv_temp, softcap)) if backend == "cpp"
           else _portable_fwd(backend, precision, hidden, weight, ignore_index, softcap))
    return _forward(hidden, weight, bias, targets, temperature, ignore_index, check_targets, fwd)


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, precision, backend, check_targets, softcap=0.0):
    dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)  # outputs: float32, float64 for float64 inputs
    n = hidden.shape[0]
    return (hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n,), dtype=dtype),
            hidden.new_empty((2, n), dtype=dtype))


def _portable_bwd(backend: str, precision: str, hidden: torch.Tensor, weight: torch.Tensor, softcap: float = 0.0):
    """The backward of a device-generic backend, with ``rlcore.chunked.linear_logprobs_bwd``'s signature (the cap
    bound in)."""
    if backend == "triton":
        mode = _kernel_mode(precision, hidden.dtype, weight.dtype, "bwd")

        def bwd(g_lp, g_ent, h, w, b, t, lse, ent, inv_temp, ignore_index, compute_dh, compute_dw, compute_db):
            return _kernels().linear_logprobs_bwd(g_lp, g_ent, h, w, b, t, lse, ent, inv_temp, ignore_index, mode,
                                                  compute_dh, compute_dw, compute_db, softcap=softcap)
        return bwd
    return _with_softcap(chunked.linear_logprobs_bwd, softcap)


def _with_softcap(bwd, softcap: float):
    """``bwd`` (a backend's backward, ``softcap=`` keyword) with the cap bound; itself without a cap."""
    if softcap <= 0:
        return bwd
    return lambda *args: bwd(*args, softcap=softcap)


def _backward_body(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, temperature, ignore_index,
                   compute_dh, compute_dw, compute_db, bwd):
    """The backward op's body around a backend's backward ``bwd``: empty input, output dtypes, skipped gradients."""
    N, H = hidden.shape
    lse, entropy = stats.unbind(0)
    compute_db = compute_db and bias is not None
    if N == 0:
        dh, dw = hidden.new_zeros((0, H)), weight.new_zeros(weight.shape)
        db = bias.new_zeros(bias.shape) if compute_db else None
    else:
        grad_logp = grad_logp.contiguous()
        grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
        dh, dw, db = bwd(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, 1.0 / temperature,
                         ignore_index, compute_dh, compute_dw, compute_db)

    def empty():  # a distinct [0] tensor per skipped output: custom-op outputs may not alias
        return hidden.new_empty((0,))

    return (dh.to(hidden.dtype) if compute_dh else empty(), dw.to(weight.dtype) if compute_dw else empty(),
            db.to(bias.dtype) if compute_db else empty())


@torch.library.custom_op("rlcore::linear_logprobs_backward", mutates_args=())
@chunked.autocast_off
def _linear_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    stats: torch.Tensor,
    temperature: float,
    ignore_index: int,
    precision: str,
    backend: str,
    compute_dh: bool,
    compute_dw: bool,
    compute_db: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dh [N, H], dW [V, H], db [V])``, contiguous, in the dtypes of ``hidden``, ``weight``, ``bias``.
    A gradient not asked for (``compute_*`` False, or no bias) is an empty ``[0]`` tensor and costs nothing."""
    return _backward_body(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, temperature, ignore_index,
                          compute_dh, compute_dw, compute_db,
                          _portable_bwd(backend, precision, hidden, weight, softcap))


@_linear_logprobs_backward_op.register_kernel("cpu")
@chunked.autocast_off
def _linear_logprobs_backward_cpu(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, temperature,
                                  ignore_index, precision, backend, compute_dh, compute_dw, compute_db, softcap=0.0):
    """CPU tensors: the compiled kernels for ``backend="cpp"``, the other backends as on any device."""
    bwd = (_with_softcap(cpp.linear_logprobs_bwd, softcap) if backend == "cpp"
           else _portable_bwd(backend, precision, hidden, weight, softcap))
    return _backward_body(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, temperature, ignore_index,
                          compute_dh, compute_dw, compute_db, bwd)


@_linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, temperature, ignore_index, precision,
      backend, compute_dh, compute_dw, compute_db, softcap=0.0):
    # new_empty(shape), not empty_like: the real op returns contiguous gradients whatever the inputs' strides.
    return (hidden.new_empty(hidden.shape) if compute_dh else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if compute_dw else hidden.new_empty((0,)),
            bias.new_empty(bias.shape) if compute_db and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, precision, backend, _ = inputs[:9]
    stats = output[2]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(hidden, weight, bias, targets, stats)
    ctx.args = (temperature, ignore_index, precision, backend)
    ctx.softcap = inputs[9] if len(inputs) > 9 else 0.0
    ctx.set_materialize_grads(False)  # an unused entropy output gives None, and the kernel skips its term


def _backward(ctx, grad_logp, grad_ent, _grad_stats):
    hidden, weight, bias, targets, stats = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_ent is None) or not (need_dh or need_dw or need_db):
        return (None,) * 10
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[0])
    dh, dw, db = _linear_logprobs_backward_op(grad_logp, grad_ent, hidden, weight, bias, targets, stats, *ctx.args,
                                              need_dh, need_dw, need_db, ctx.softcap)
    return (dh if need_dh else None), (dw if need_dw else None), (db if need_db else None), *(None,) * 7


torch.library.register_autograd("rlcore::linear_logprobs", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "rlcore.linear_logprobs has no second derivative: its backward is a fused kernel, so the gradient it "
        "returns (under create_graph=True) cannot be differentiated again. For higher-order gradients use the "
        "materialised rlcore.reference.linear_logprobs_reference")


# The backward op's own autograd formula: a clear error at a double backward, instead of PyTorch's registration
# message from deep inside the op. First-order gradients (with or without create_graph) never call it.
torch.library.register_autograd("rlcore::linear_logprobs_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------------


def _check_softcap(softcap, distributed_: bool) -> None:
    """Validate ``softcap`` (0: none). Every backend takes a cap (the Triton kernels in their ``SOFTCAP`` variant); a
    sharded head does not yet."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a Python float (0 for none), got {type(softcap).__name__}")
    if softcap == 0:   # first: the default traces under torch.compile without a check
        return
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 for none), got {softcap}")
    if distributed_:
        raise ValueError("softcap does not take a process_group or DTensor head yet; gather the head or drop the cap")


def _check_inputs(hidden, weight, targets, bias, temperature, ignore_index, precision, backend) -> str:
    """Validate everything that can be checked from metadata; returns the resolved backend."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is not None and x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {x.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (e.g. int64 or int32), got {targets.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the weight's dtype ({weight.dtype}), got {bias.dtype}")
    for name, x in (("weight", weight), ("targets", targets), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}; inputs must share a device")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    # comparisons only (NaN fails the first): under torch.compile(dynamic=True) a temperature argument is a traced
    # SymFloat, which math.isfinite cannot take; these become value-range guards, not one graph per value
    if not (temperature > 0 and temperature < math.inf and 1.0 / temperature < _FP32_MAX):
        raise ValueError(f"temperature must be finite and > 0 (and 1/temperature finite in float32), got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (target ids are integers of at most 64 bits), got "
                         f"{ignore_index}")
    fp64 = torch.float64 in (hidden.dtype, weight.dtype)
    if not fp64:
        allowed = {(h, w): precisions for h, w, precisions in _dtype_pairs()}
        pair = (hidden.dtype, weight.dtype)
        if pair not in allowed:
            raise TypeError(
                f"hidden ({hidden.dtype}) and weight ({weight.dtype}): the only mixed pair is bf16/fp16 hidden states "
                "with a float32 head; cast one of them"
            )
        if precision not in allowed[pair]:
            raise TypeError(
                f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype with precision={precision!r}; "
                "use precision='fp32' to compute a mixed-dtype head in FP32"
            )
    if backend == "auto":
        if fp64:
            return "torch"
        # CPU: the compiled backend, which runs the chunked path itself where it cannot be built. That is decided
        # when the op first runs, not here: this function is traced by torch.compile, and a build cannot be.
        return {"cuda": "triton", "cpu": "cpp"}.get(hidden.device.type, "torch")
    if backend == "cpp":
        if fp64:
            raise TypeError("backend='cpp' does not take float64 inputs; use backend='torch' (or 'auto')")
        if hidden.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors (got {hidden.device}); use backend='auto' or 'triton'")
    if backend == "triton":
        if fp64:
            raise TypeError("backend='triton' does not take float64 inputs; use backend='torch' (or 'auto')")
        if hidden.device.type != "cuda" and not _kernels().is_interpreter():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {hidden.device}), or TRITON_INTERPRET=1 set before rlcore's "
                "kernels are first imported, to run them in Triton's CPU interpreter"
            )
    return backend


def _is_multi_target(hidden, targets) -> bool:
    """``targets [..., K]`` (as many dimensions as ``hidden [..., H]``): several ids per position."""
    return (isinstance(hidden, torch.Tensor) and isinstance(targets, torch.Tensor) and hidden.dim() >= 1
            and targets.dim() == hidden.dim())


def _linear_logprobs_multi(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, precision,
                           backend, check_targets, process_group):
    """``linear_logprobs`` with ``targets [..., K]``: ``rlcore.multi_target``."""
    from .multi_target import multi_target_logprobs

    if process_group is not None or distributed.is_dtensor(weight) or distributed.is_dtensor(bias):
        raise ValueError("targets of shape [..., K] (several ids per position) do not support a sharded head "
                         "(process_group / DTensor) yet; pass targets of shape [...]")
    if targets.shape[-1] == 0:
        raise ValueError(f"targets of shape [..., K] need K >= 1 ids per position, got {tuple(targets.shape)}")
    backend = _check_inputs(hidden, weight, targets[..., 0], bias, temperature, ignore_index, precision, backend)
    K = targets.shape[-1]
    logp, ent = multi_target_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1, K),
                                      float(temperature), int(ignore_index), precision, backend, bool(check_targets))
    logp = logp.view(targets.shape)
    return (logp, ent.view(targets.shape[:-1])) if return_entropy else logp


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    precision: str = "default",
    backend: str = "auto",
    check_targets: bool = True,
    process_group=None,
    softcap: float = 0.0,
):
    """Log-probability of each target token, and optionally the entropy, without materialising the logits.

    Computes, for every position, with ``logits = cap(hidden @ weight.T + bias) / temperature``, ``cap`` the
    identity unless ``softcap > 0``::

        logp    = log_softmax(logits)[target]            # [...]
        entropy = -(softmax(logits) * log_softmax(logits)).sum(-1)

    streaming the vocabulary in tiles with an online log-sum-exp, in FP32, so no ``[N, V]`` tensor exists in forward
    or backward. Differentiable in ``hidden``, ``weight`` and ``bias``, through both outputs, once: a double
    backward (differentiating the gradient) raises ``RuntimeError``. ``meta`` inputs give ``meta`` outputs of the
    right shapes (no check that reads values runs).

    Args:
        hidden: ``[..., H]`` final hidden states (bf16, fp16, fp32; float64 on the torch backend).
        weight: ``[V, H]`` LM-head weight.
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``; or ``[..., K]`` (as many dimensions
            as ``hidden``): ``K`` ids per position, whose log-probs come from the same pass (``rlcore.multi_target``).
        bias: optional ``[V]``; ``-inf`` entries mask vocabulary out (at least one entry must stay finite).
        temperature: logits are divided by it (sampling temperature of the rollout engine).
        ignore_index: positions with this target give log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        precision: ``"default"`` computes in the input dtype with FP32 accumulation and FP32 softmax math;
            ``"fp32"`` computes the head to FP32 accuracy whatever the dtypes (3xTF32 on tensor cores; ``hidden``
            and ``weight`` may then differ in dtype, e.g. bf16 activations with an FP32 head: the MiniMax-M1 fix);
            ``"tf32"`` rounds FP32 operands to TF32 (one tensor-core pass).
        backend: ``"auto"`` (Triton on CUDA; on CPU the compiled ``"cpp"`` backend, or the chunked PyTorch path
            for float64 or when the extension cannot be built), ``"triton"``, ``"torch"`` (chunked PyTorch, any
            device) or ``"cpp"`` (CPU; built on first use, see ``rlcore.cpp``; falls back to ``"torch"`` with a
            one-line notice when it cannot be built).
        check_targets: raise ``ValueError`` on an id outside ``[0, V)`` that is not ``ignore_index``, and on a
            ``bias`` that is ``-inf`` for every entry (the log-probs would be NaN). This is the op's one host sync;
            ``False`` skips it (e.g. under CUDA graphs). Unchecked bad ids never read out of
            bounds (the kernels compare ids, they do not index with them) but give meaningless log-probs.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded (tensor parallelism):
            ``weight`` and ``bias`` are this rank's contiguous rows, in group-rank order, of any size; ``hidden`` and
            ``targets`` (global ids) are the same on every rank. The result is the whole vocabulary's, on every rank;
            the backward gives each rank its shard's gradient and the full ``dh``. A DTensor ``weight``/``bias`` is
            accepted with or without a group. See ``rlcore.distributed``.
        softcap: ``c > 0`` caps the logits at ``cap(a) = c * tanh(a / c)`` before the temperature (Gemma 2/3's
            ``final_logit_softcapping``), with its gradient, on every backend (the Triton kernels' ``SOFTCAP``
            variant); ``0`` (default) for none. Not with ``targets [..., K]`` or a sharded head (``ValueError``).
            With a cap, a ``-inf`` bias entry becomes ``-c``, as in the models' own formula. A multiplicative
            logit scale ``s`` (Cohere, Granite) needs no option: it is ``temperature=1/s``.

    Returns:
        ``logp [...]`` (``[..., K]`` for ``K`` ids per position) float32 (float64 for float64 inputs), or
        ``(logp, entropy)`` with ``return_entropy=True`` (``entropy [...]``).

    Example::

        >>> h, W = torch.randn(4, 7, 64), torch.randn(1000, 64)
        >>> t = torch.randint(0, 1000, (4, 7))
        >>> logp, ent = linear_logprobs(h, W, t, return_entropy=True, temperature=0.7)
        >>> logp.shape, ent.shape
        (torch.Size([4, 7]), torch.Size([4, 7]))
    """
    sharded = process_group is not None or distributed.is_dtensor(weight) or distributed.is_dtensor(bias)
    _check_softcap(softcap, sharded)
    if _is_multi_target(hidden, targets):
        if softcap:
            raise ValueError("softcap does not take several targets per position (targets [..., K]): the K ids' "
                             "logits are formed from uncapped head-row differences; pass one target per position")
        return _linear_logprobs_multi(hidden, weight, targets, bias, temperature, ignore_index, return_entropy,
                                      precision, backend, check_targets, process_group)
    if sharded:
        weight, bias = distributed.local_head(weight, bias, process_group)
    check = (hidden, weight, targets, bias, temperature, ignore_index, precision, backend)
    if process_group is None:
        backend = _check_inputs(*check)
    else:   # checked on every rank, raising on every rank
        backend, layout = distributed.shard_layout(process_group, _check_inputs, *check)
    h2 = hidden.reshape(targets.numel(), hidden.shape[-1])   # [N, H]
    t1 = targets.reshape(-1)                                 # [N]
    # a traced SymFloat stays symbolic (float() would specialise the graph on its value)
    temperature = temperature if isinstance(temperature, torch.SymFloat) else float(temperature)
    if process_group is None:
        logp, ent, _ = _linear_logprobs_op(h2, weight, bias, t1, temperature, int(ignore_index), precision,
                                           backend, bool(check_targets), float(softcap))
    else:
        logp, ent = distributed.vocab_parallel_logprobs(h2, weight, bias, t1, layout, temperature,
                                                        int(ignore_index), precision, backend, bool(check_targets))
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, ent.view(targets.shape)
    return logp
