"""``fused_policy_loss``: an RL policy loss straight from hidden states and the LM head, with no ``[N, V]`` logits.

Two strategies compute the same loss and gradients as ``policy_loss(linear_logprobs(...))``:

``two_pass``
    Exactly that composition. The forward streams the vocabulary once for ``logp`` (and the entropy); autograd
    differentiates the O(N) loss; the op's backward recomputes the logits tiles to form ``dz``. Four GEMM-sized
    passes over the head (logits twice, ``dh``, ``dW``). Any backend.

``single_pass``
    One pass over slices of *whole sequences*. A slice's ``[C, V]`` logits are formed once (FP32), reduced to ``logp``
    and the entropy, the slice's loss is differentiated right there (its aggregation denominators are taken from the
    whole batch, so the batch loss is the sum of the slices' losses: every loss in ``policy_loss`` is a sum over
    sequences with mask-only coefficients), and the same logits become ``dz``, ``dh`` and ``dW`` while still in
    memory. Three GEMMs instead of four, at the price of a slice that holds whole sequences: it runs when every
    sequence's loss tokens times V fit ``chunk_budget`` elements. Chunked PyTorch (the CPU backend's math), or the
    Triton kernels (``rlcore/kernels/slice_head.py``: the forward kernel keeps the slice's FP32 logits, ``dz`` is
    formed from them, then the dh and dW GEMMs).

``strategy="auto"`` picks ``single_pass`` on the chunked PyTorch backend (measured faster there, see
``bench/results``) and on the Triton backend (one GEMM fewer; designed, not yet measured on a GPU) when the sequences
fit the budget, else ``two_pass``; under ``torch.compile`` and for ``meta`` inputs it is ``two_pass`` (the choice reads
the mask, which a traced graph cannot branch on and a meta tensor does not hold). With ``backend="auto"`` on CPU that
means ``two_pass`` on the
compiled backend (measured 0.59x the chunked single pass), and the chunked single pass only where the extension
cannot be built. Both skip the rows that no loss term reads (prompt, padding,
tool and observation tokens): on CPU they are dropped before any GEMM; on CUDA their targets become
``ignore_index``, which the Triton kernels skip a row block at a time, with no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.compiler import is_compiling as compiling

from . import chunked, cpp, distributed
from .logprobs import _check_inputs, _check_softcap, _check_target_range, linear_logprobs
from .losses import PolicyLossOutput, _Layout, evaluate, needed_inputs, policy_loss, prepare, resolve

__all__ = ["fused_policy_loss", "STRATEGIES"]

STRATEGIES = ("auto", "two_pass", "single_pass")

# Logits elements one single-pass slice may hold (FP32: 128 MiB). A slice must hold whole sequences, so this bounds
# the longest sequence x V the single pass takes: 2048 loss tokens at V = 16k, 1k tokens at V = 32k.
CHUNK_BUDGET = 2**25
# The same on the Triton backend (a GPU): 2 GiB of FP32 logits (plus 1 GiB of bf16 dz), 3.5k loss tokens at V = 152k,
# a few percent of what the materialised reference holds at the batch sizes where the single pass pays.
TRITON_CHUNK_BUDGET = 2**29

# policy_loss's tensor inputs (everything else in loss_kwargs is a loss option, checked by rlcore.losses.resolve)
_INPUTS = ("old_logp", "ref_logp", "sampler_logp", "token_weights", "rewards", "baseline", "teacher_logp", "teacher_kl",
           "divergence", "ref_kl")


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    precision: str = "default",
    backend: str = "auto",
    check_targets: bool = True,
    compute_entropy: bool = False,
    strategy: str = "auto",
    chunk_budget: Optional[int] = None,
    process_group=None,
    softcap: float = 0.0,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_ids: Optional[torch.Tensor] = None,
    teacher_topk_logp: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    **loss_kwargs,
) -> PolicyLossOutput:
    """``policy_loss`` on the log-probs of ``targets`` under the head ``weight`` applied to ``hidden``, fused.

    Shapes: padded ``hidden [B, T, H]``, ``targets``/``mask [B, T]``; or packed ``hidden [N, H]``, ``targets``/``mask
    [N]`` with ``cu_seqlens [B + 1]``. ``weight [V, H]``, ``bias [V]``. ``targets[t]`` is the token whose log-prob
    position ``t`` scores (the caller shifts by one, as for any causal LM loss). Positions where ``mask`` is 0 or the
    target is ``ignore_index`` are not loss tokens.

    The head arguments (``bias``, ``temperature``, ``ignore_index``, ``precision``, ``backend``, ``check_targets``,
    ``softcap``) are :func:`rlcore.linear_logprobs`'s; every other keyword (``loss_type``, ``old_logp``, ``agg``, ...)
    is :func:`rlcore.policy_loss`'s. The entropy is computed in the fused pass when ``entropy_coef != 0`` or
    ``compute_entropy=True`` (then it is reported as ``metrics["entropy_mean"]``).

    ``strategy``: ``"two_pass"``, ``"single_pass"`` or ``"auto"`` (see the module docstring); ``chunk_budget`` caps
    the logits elements of a single-pass slice (default ``CHUNK_BUDGET``). Values and gradients are the same either
    way, up to FP32 summation order.

    ``process_group``: the vocabulary is sharded over this ``torch.distributed`` group (see
    :func:`rlcore.linear_logprobs`); the loss inputs are the same on every rank, and so is the loss. Runs the
    two-pass strategy (the single pass would need the whole vocabulary's logits of a slice on one rank).

    Distillation and the exact KL (``docs/losses.md`` section 9): the per-token inputs a loss needs from other heads
    are computed here from those heads, never forming logits, unless given directly (``teacher_logp=`` ...):

    - ``teacher_hidden [..., H_T]``, ``teacher_weight [V, H_T]``, ``teacher_bias [V]``: the teacher head, at the
      student's positions. ``opd``: ``teacher_logp`` of the targets (``linear_logprobs``) and, for
      ``opd_baseline="full"`` / ``"topk"``, ``teacher_kl`` (``linear_divergence``, reverse KL, over the vocabulary /
      the teacher's ``top_k``), detached. ``kd``: ``divergence`` (``linear_divergence`` of ``kd_kind``, ``jsd_beta``,
      ``top_k``), differentiated in the student head only.
    - ``teacher_ids [..., K]`` with ``teacher_topk_logp [..., K]``: a served teacher's top-k ids and its log-probs
      of them (at temperature 1). ``kd`` (and ``opd_baseline="topk"``) then take the support divergence
      (``rlcore.divergence.support_divergence``) of the student's log-probs of those ids (multi-target
      ``linear_logprobs``) against ``teacher_topk_logp / temperature``: ``linear_divergence(top_k=K)``'s value
      when the ids are the teacher's top ``K``.
    - ``ref_hidden``, ``ref_weight``, ``ref_bias``: the reference head, for ``kl_estimator="exact"`` (``beta != 0``):
      ``ref_kl = linear_divergence(hidden, weight, ref_hidden, ref_weight)``, the full vocabulary's
      ``KL(pi || pi_ref)`` with its analytic gradient.

    ``temperature`` divides every head's logits. The teacher and reference heads get no gradient. The single pass
    does not take a differentiable ``divergence`` or ``ref_kl`` (``kd``, the exact KL); ``auto`` runs two passes.

    Returns ``PolicyLossOutput(loss, metrics)``; gradients reach ``hidden``, ``weight`` and ``bias``.

    Example::

        out = rlcore.fused_policy_loss(h, model.lm_head.weight, targets, adv, mask,
                                       old_logp=old, loss_type="cispo")
        out.loss.backward()
    """
    for key in ("logp", "entropy"):
        if key in loss_kwargs:
            raise TypeError(f"fused_policy_loss computes {key} itself; do not pass {key}=")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    sharded = process_group is not None or distributed.is_dtensor(weight) or distributed.is_dtensor(bias)
    _check_softcap(softcap, sharded)
    if sharded:
        weight, bias = distributed.local_head(weight, bias, process_group)
    resolved_backend = distributed.agreed(process_group, _check_inputs, hidden, weight, targets, bias, temperature,
                                          ignore_index, precision, backend)
    # the single pass is chunked PyTorch, which "auto" keeps without the extension. Not asked while torch.compile
    # traces (cpp.available() takes a lock and may build): the cpp op itself runs the chunked path without it.
    if backend == "auto" and resolved_backend == "cpp" and (
            strategy == "single_pass" or (not compiling() and not cpp.available())):
        resolved_backend = "torch"
    packed = cu_seqlens is not None
    if hidden.dim() != (2 if packed else 3):
        raise ValueError(f"hidden must be [B, T, H] (padded) or [N, H] with cu_seqlens (packed), got shape "
                         f"{tuple(hidden.shape)}" + (" with cu_seqlens" if packed else " without cu_seqlens"))
    loss_kwargs = dict(loss_kwargs)
    loss_type = loss_kwargs.pop("loss_type", "ppo")
    check_inputs = loss_kwargs.pop("check_inputs", True)
    inputs = {k: loss_kwargs.pop(k) for k in _INPUTS if k in loss_kwargs}
    spec, opts = resolve(loss_type, loss_kwargs)                  # every option checked before any logits
    others = _OtherHeads(teacher_hidden, teacher_weight, teacher_bias, teacher_ids, teacher_topk_logp, ref_hidden,
                         ref_weight, ref_bias)
    others.check(hidden, weight, targets)
    need_entropy = bool(compute_entropy) or opts.entropy_coef != 0 or opts.get("top_entropy_quantile") is not None
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(targets.shape)):
        raise ValueError(f"mask must be a tensor shaped like targets {tuple(targets.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    loss_mask = targets != ignore_index
    if mask is not None:
        loss_mask = loss_mask & (mask if mask.dtype == torch.bool else mask != 0)
    head = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, precision=precision,
                backend=resolved_backend, check_targets=check_targets, process_group=process_group, softcap=softcap)
    if others.any() and sharded:
        raise ValueError("teacher and reference heads do not take a sharded student head (process_group, DTensor); "
                         "pass the per-token teacher_logp / teacher_kl / divergence / ref_kl instead")
    if others.any() and softcap:   # linear_divergence forms the student's logits without a cap
        raise ValueError("teacher and reference heads do not take a soft-capped student head (softcap=) yet; pass "
                         "the per-token teacher_logp / teacher_kl / divergence / ref_kl instead")
    inputs.update(_head_inputs(spec, opts, inputs, others, hidden, weight, targets, loss_mask, head, backend))

    if process_group is not None:
        if strategy == "single_pass":
            raise ValueError("strategy='single_pass' does not take a process_group (a slice would need the whole "
                             "vocabulary's logits on one rank); use strategy='two_pass' or 'auto'")
        strategy = "two_pass"
    if strategy == "auto":
        strategy = "two_pass"
        # under torch.compile the choice would read the mask (a data-dependent branch): two_pass, which traces
        if (resolved_backend in ("torch", "triton") and _single_pass_refusal(spec, opts) is None
                and not compiling() and hidden.device.type != "meta"):
            budget = _budget(resolved_backend, chunk_budget)
            if _longest_unit(loss_mask, cu_seqlens, spec) * weight.shape[0] <= budget:
                strategy = "single_pass"
    elif strategy == "single_pass":
        if hidden.device.type == "meta":
            raise ValueError("strategy='single_pass' reads the mask's values to slice the batch, and meta tensors "
                             "have none; use strategy='two_pass' or 'auto' for a shape-only run")
        if resolved_backend not in ("torch", "triton"):
            raise ValueError("strategy='single_pass' runs on the chunked PyTorch or the Triton backend; use "
                             "backend='torch' or 'triton' (or strategy='two_pass')")
        refusal = _single_pass_refusal(spec, opts)
        if refusal is not None:
            raise ValueError(f"strategy='single_pass' does not take {refusal}; use strategy='two_pass'")

    if strategy == "two_pass":
        if _reads_logp(spec, opts) or need_entropy:
            logp, ent = _two_pass_logprobs(hidden, weight, targets, loss_mask, need_entropy, head)
        else:   # kd: its divergence is the whole loss; no pass over the vocabulary for the targets (not read)
            logp, ent = torch.zeros(targets.shape, dtype=chunked.compute_dtype(hidden.dtype, weight.dtype),
                                    device=hidden.device), None
        return policy_loss(logp, advantages, loss_mask, cu_seqlens=cu_seqlens, entropy=ent, loss_type=loss_type,
                           check_inputs=check_inputs, **inputs, **loss_kwargs)
    if check_targets:   # the loss rows only: like the two-pass strategy, no other row's target is ever read
        _check_target_range(torch.where(loss_mask, targets, ignore_index), weight.shape[0], ignore_index, bias)
    return _single_pass(hidden, weight, targets, advantages, loss_mask, cu_seqlens, need_entropy, head,
                        _budget(resolved_backend, chunk_budget), spec, opts,
                        dict(inputs, check_inputs=check_inputs))


def _budget(backend: str, chunk_budget) -> int:
    if chunk_budget is not None:
        return int(chunk_budget)
    return TRITON_CHUNK_BUDGET if backend == "triton" else CHUNK_BUDGET


def _single_pass_refusal(spec, opts) -> Optional[str]:
    """Why a single pass cannot compute this loss (``None``: it can). A slice sees only its own log-probs, so the
    loss may not depend on batch-wide functions of them."""
    if opts.get("reject"):
        return "reject=True (the rejected tokens change the batch-wide counts)"
    if opts.get("top_entropy_quantile") is not None:
        return "top_entropy_quantile (the quantile is over the whole batch's entropies)"
    need = needed_inputs(spec, opts)
    if "divergence" in need:
        return f"loss_type={spec.name!r} (its divergence has a gradient of its own, outside the slices' log-probs)"
    if "ref_kl" in need:
        return "kl_estimator='exact' (ref_kl has a gradient of its own, outside the slices' log-probs)"
    if spec.whole_batch is not None and spec.whole_batch(opts):
        return f"loss_type={spec.name!r} (its terms read the whole batch's log-probs)"
    return None


def _reads_logp(spec, opts) -> bool:
    """Whether the loss reads the log-probs of the targets: every loss but ``kd`` (``LossSpec.reads_logp``), and
    ``kd`` too when a KL estimator of ``l - l_ref`` or a mismatch correction against ``sg(l)`` is on."""
    return spec.reads_logp or not needed_inputs(spec, opts).isdisjoint(("ref_logp", "sampler_logp"))


def _longest_unit(loss_mask, cu_seqlens, spec) -> int:
    """Loss tokens of the largest group a single-pass slice cannot split: a sequence, or a pair."""
    if cu_seqlens is None:
        counts = loss_mask.sum(-1)                                            # [B]
    else:
        counts = _Layout(loss_mask.float(), cu_seqlens, check=False).seq_sum(loss_mask.float())
    if spec.unit == "pair" and counts.numel() % 2 == 0:
        counts = counts.view(-1, 2).sum(-1)
    return int(counts.max()) if counts.numel() else 0


# ----------------------------------------------------------------------------------------------------------------------
# the teacher's and the reference's per-token inputs, from their heads
# ----------------------------------------------------------------------------------------------------------------------


class _OtherHeads:
    """The teacher head, a served teacher's top-k, and the reference head given to ``fused_policy_loss``."""

    def __init__(self, th, tw, tb, ids, tlp, rh, rw, rb):
        self.teacher, self.served, self.ref = (th, tw, tb), (ids, tlp), (rh, rw, rb)

    def any(self) -> bool:
        return any(x is not None for x in self.teacher + self.served + self.ref)

    def has(self, which: str) -> bool:
        return getattr(self, which)[0] is not None

    def check(self, hidden, weight, targets) -> None:
        from .divergence import _check_head

        for prefix, (h, w, b) in (("teacher_", self.teacher), ("ref_", self.ref)):
            if (h is None) != (w is None) or (b is not None and h is None):
                raise ValueError(f"{prefix}hidden and {prefix}weight go together ({prefix}bias only with them)")
            if h is None:
                continue
            _check_head(prefix, h, w, b)
            if not isinstance(hidden, torch.Tensor) or tuple(h.shape[:-1]) != tuple(hidden.shape[:-1]):
                raise ValueError(f"{prefix}hidden must have hidden's positions, shape "
                                 f"{tuple(getattr(hidden, 'shape', ())[:-1])} + [H], got {tuple(h.shape)}")
            if not isinstance(weight, torch.Tensor) or w.shape[0] != weight.shape[0]:
                raise ValueError(f"{prefix}weight must have the student's vocabulary, V = "
                                 f"{getattr(weight, 'shape', (None,))[0]} rows, got {w.shape[0]}")
        ids, tlp = self.served
        if (ids is None) != (tlp is None):
            raise ValueError("teacher_ids and teacher_topk_logp go together (a served teacher's top-k ids and its "
                             "log-probs of them)")
        if ids is None:
            return
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"teacher_ids must be an integer tensor [..., K], got {getattr(ids, 'dtype', type(ids))}")
        lead = tuple(targets.shape) if isinstance(targets, torch.Tensor) else None
        if ids.dim() < 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
            raise ValueError(f"teacher_ids must be [..., K] with targets' shape {lead} + [K], K >= 1, got "
                             f"{tuple(ids.shape)}")
        if not isinstance(tlp, torch.Tensor) or not tlp.is_floating_point() or tlp.shape != ids.shape:
            raise ValueError(f"teacher_topk_logp must be a floating-point tensor of teacher_ids' shape "
                             f"{tuple(ids.shape)}, got {tuple(tlp.shape) if isinstance(tlp, torch.Tensor) else tlp}")


def _missing(name: str, spec, what: str) -> ValueError:
    return ValueError(f"{name} is required for loss_type={spec.name!r}: pass {name}= or {what}")


class _FromHeads:
    """Computes the per-token inputs a loss needs from the other heads, at the student's rows and temperature."""

    def __init__(self, spec, opts, others: _OtherHeads, hidden, weight, targets, loss_mask, head, backend):
        self.spec, self.o, self.others = spec, opts, others
        self.hidden, self.weight, self.targets, self.loss_mask, self.head = hidden, weight, targets, loss_mask, head
        self.backend = backend                                  # the one asked for (before the student's resolution)

    def divergence(self, which: str, grad: bool, **kw) -> torch.Tensor:
        """``linear_divergence`` of the student against the ``which`` head (``"teacher"`` or ``"ref"``)."""
        from .divergence import linear_divergence

        h, w, b = getattr(self.others, which)
        hs, ws, bs = self.hidden, self.weight, self.head["bias"]
        if not grad:
            hs, ws, bs = hs.detach(), ws.detach(), None if bs is None else bs.detach()
        backend = "auto" if self.backend == "auto" else self.head["backend"]     # the student's, when one is asked
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return linear_divergence(hs, ws, h, w, bias=bs, teacher_bias=b, temperature=self.head["temperature"],
                                     mask=self.loss_mask, backend=backend, **kw)

    def served(self, kind: str, beta: float) -> torch.Tensor:
        return _served_divergence(self.hidden, self.weight, self.others, self.loss_mask, self.head, kind, beta)

    def teacher_logp(self) -> torch.Tensor:
        if not self.others.has("teacher"):
            raise _missing("teacher_logp", self.spec, "the teacher head (teacher_hidden, teacher_weight)")
        th, tw, tb = self.others.teacher
        head = dict(self.head, bias=tb, backend=self.backend, process_group=None, softcap=0.0)
        with torch.no_grad():
            return _two_pass_logprobs(th, tw, self.targets, self.loss_mask, False, head)[0]

    def teacher_kl(self) -> torch.Tensor:
        o, topk = self.o, self.o.opd_baseline == "topk"
        if self.others.has("teacher") and (not topk or o.top_k is not None):
            return self.divergence("teacher", False, kind="reverse_kl", top_k=o.top_k if topk else None)
        if topk and self.others.has("served"):
            with torch.no_grad():
                return self.served("reverse_kl", 0.5)
        what = ("top_k= with the teacher head, or teacher_ids with teacher_topk_logp" if topk
                else "the teacher head (teacher_hidden, teacher_weight)")
        raise ValueError(f"teacher_kl is required for loss_type={self.spec.name!r} with opd_baseline="
                         f"{o.opd_baseline!r}: pass teacher_kl= or {what}")

    def divergence_input(self) -> torch.Tensor:
        o = self.o
        if self.others.has("teacher"):
            return self.divergence("teacher", True, kind=o.kd_kind, beta=o.jsd_beta, top_k=o.top_k)
        if self.others.has("served"):
            return self.served(o.kd_kind, o.jsd_beta)
        raise _missing("divergence", self.spec, "the teacher head (teacher_hidden, teacher_weight), or a served "
                                                "teacher's teacher_ids with teacher_topk_logp")

    def ref_kl(self) -> torch.Tensor:
        if not self.others.has("ref"):
            raise ValueError("ref_kl is required for kl_estimator='exact' with beta != 0: pass ref_kl= or the "
                             "reference head (ref_hidden, ref_weight)")
        return self.divergence("ref", True, kind="reverse_kl")


def _head_inputs(spec, opts, given, others: _OtherHeads, hidden, weight, targets, loss_mask, head, backend) -> dict:
    """The per-token inputs of ``spec`` that are not in ``given``, from the other heads (see fused_policy_loss)."""
    need = needed_inputs(spec, opts)
    heads = _FromHeads(spec, opts, others, hidden, weight, targets, loss_mask, head, backend)
    make = dict(teacher_logp=heads.teacher_logp, teacher_kl=heads.teacher_kl, divergence=heads.divergence_input,
                ref_kl=heads.ref_kl)
    return {name: fn() for name, fn in make.items() if name in need and given.get(name) is None}


def _served_divergence(hidden, weight, others: _OtherHeads, loss_mask, head, kind: str, beta: float):
    """``support_divergence`` of the student's log-probs of the served ids against ``teacher_topk_logp / T``."""
    from .divergence import support_divergence

    ids, tlp = others.served
    ignore = head["ignore_index"]
    rows = loss_mask[..., None]
    lp = linear_logprobs(torch.where(rows, hidden, 0.0), weight, torch.where(rows, ids, ignore), bias=head["bias"],
                         temperature=head["temperature"], ignore_index=ignore, precision=head["precision"],
                         backend=head["backend"], check_targets=head["check_targets"])          # [..., K]
    teacher = torch.where(rows, tlp.detach(), 0.0) / head["temperature"]
    return support_divergence(lp, teacher.to(lp.dtype), kind=kind, beta=beta, mask=loss_mask)


# ----------------------------------------------------------------------------------------------------------------------
# two passes: linear_logprobs, then policy_loss; autograd does the rest
# ----------------------------------------------------------------------------------------------------------------------


def _two_pass_logprobs(hidden, weight, targets, loss_mask, need_entropy, head):
    """``logp`` (and entropy) at every position, zero where ``loss_mask`` is False; only loss rows are computed."""
    shape = tuple(targets.shape)
    h = hidden.reshape(-1, hidden.shape[-1])                                  # [N, H]
    t = targets.reshape(-1)                                                   # [N]
    keep = loss_mask.reshape(-1)                                              # [N]
    if h.device.type == "cpu":
        idx = keep.nonzero().squeeze(1)                                       # [N_loss]; free on CPU
        out = linear_logprobs(h.index_select(0, idx), weight, t.index_select(0, idx), return_entropy=need_entropy,
                              **head)
        lp, ent = out if need_entropy else (out, None)
        cdt = lp.dtype

        def scatter(x):
            return None if x is None else torch.zeros(t.shape[0], dtype=cdt, device=h.device).index_copy(0, idx, x)

        lp, ent = scatter(lp), scatter(ent)
    else:
        # No sync on CUDA: non-loss rows become ignored targets, which the kernels skip a row block at a time.
        t = torch.where(keep, t, head["ignore_index"])
        out = linear_logprobs(h, weight, t, return_entropy=need_entropy, **head)
        lp, ent = out if need_entropy else (out, None)
    return lp.view(shape), None if ent is None else ent.view(shape)


# ----------------------------------------------------------------------------------------------------------------------
# one pass over slices of whole sequences
# ----------------------------------------------------------------------------------------------------------------------


def _slices(loss_mask, cu_seqlens, V, budget, pair):
    """``(seq_start, seq_end)`` ranges of whole sequences (pairs for REBEL) whose loss tokens x V fit ``budget``
    together (a single unit over the budget gets a slice of its own)."""
    if cu_seqlens is None:
        counts = loss_mask.sum(-1).tolist()
    else:
        cu = cu_seqlens.tolist()
        flat = loss_mask.long().cumsum(0).tolist()
        counts = [(flat[e - 1] if e > 0 else 0) - (flat[s - 1] if s > 0 else 0) for s, e in zip(cu[:-1], cu[1:])]
    step = 2 if pair else 1
    out, start, rows = [], 0, 0
    for s in range(0, len(counts), step):
        n = sum(counts[s:s + step])
        if s > start and (rows + n) * V > budget:
            out.append((start, s))
            start, rows = s, 0
        rows += n
    if start < len(counts) or not out:
        out.append((start, len(counts)))
    return out


class _SinglePassLoss(torch.autograd.Function):
    """Forward: the loss, with ``dh``, ``dW`` and ``db`` of it computed on the way. Backward: scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, dh, dw, db = chunked.autocast_off(run)()
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.hidden_shape = hidden.shape
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        h_dt, w_dt, b_dt = ctx.dtypes
        g_h = (dh * grad).to(h_dt).view(ctx.hidden_shape) if ctx.needs_input_grad[0] else None
        g_w = (dw * grad).to(w_dt) if ctx.needs_input_grad[1] else None
        g_b = (db * grad).to(b_dt) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return g_h, g_w, g_b, None


def _triton_slice_head(weight, head, inv_temp, h_dtype):
    """The Triton kernels' share of a single pass (``rlcore/kernels/slice_head.py``), in the precision's modes."""
    from .kernels.slice_head import SliceHead
    from .logprobs import _kernel_mode

    modes = [_kernel_mode(head["precision"], h_dtype, weight.dtype, kind) for kind in ("fwd", "bwd")]
    return SliceHead(weight.detach(), None if head["bias"] is None else head["bias"].detach(), inv_temp, *modes,
                     softcap=head["softcap"])


def _single_pass(hidden, weight, targets, advantages, loss_mask, cu_seqlens, need_entropy, head, budget,
                 spec, opts, inputs):
    packed = cu_seqlens is not None
    # Prepare the whole batch once, with placeholder log-probs (no gradient, O(N)): every input is checked, and the
    # batch-wide denominators and constants (group baselines) a slice cannot see are computed here.
    probe = torch.zeros(targets.shape, dtype=chunked.compute_dtype(hidden.dtype, weight.dtype), device=hidden.device)
    whole = prepare(probe, advantages, loss_mask, spec=spec, opts=opts, cu_seqlens=cu_seqlens,
                    entropy=probe if need_entropy else None, **inputs)
    N_shape = tuple(targets.shape)
    h_flat = hidden.detach().reshape(-1, hidden.shape[-1])                    # [N, H]
    t_flat = targets.reshape(-1)
    keep_flat = loss_mask.reshape(-1)
    V = weight.shape[0]
    cdt = probe.dtype
    inv_temp = 1.0 / head["temperature"]
    triton_head = _triton_slice_head(weight, head, inv_temp, hidden.dtype) if head["backend"] == "triton" else None
    w = weight.detach().to(cdt) if triton_head is None else None
    b_ = None if head["bias"] is None else head["bias"].detach().to(cdt)
    cu_list = cu_seqlens.tolist() if packed else None
    T = None if packed else targets.shape[1]
    slices = _slices(loss_mask, cu_seqlens, V, budget, pair=spec.unit == "pair")

    logp_all = torch.zeros(h_flat.shape[0], dtype=cdt, device=hidden.device)
    ent_all = torch.zeros_like(logp_all) if need_entropy else None

    def run():
        dh = torch.zeros(h_flat.shape, dtype=cdt, device=hidden.device)
        dw = torch.zeros((V, h_flat.shape[1]), dtype=cdt, device=hidden.device) if triton_head is None else None
        db = torch.zeros(V, dtype=cdt, device=hidden.device) if b_ is not None else None
        total = torch.zeros((), dtype=cdt, device=hidden.device)
        for s0, s1 in slices:
            t0, t1 = (cu_list[s0], cu_list[s1]) if packed else (s0 * T, s1 * T)
            keep = keep_flat[t0:t1]
            idx = keep.nonzero().squeeze(1)                                   # [C] loss rows of this slice
            tgt = t_flat[t0:t1].index_select(0, idx).long()                   # [C]
            if triton_head is not None:                                       # kernels/slice_head.py
                logp_c, ent_c = triton_head.logprobs(h_flat[t0:t1].index_select(0, idx), tgt)
                ent_c = ent_c if need_entropy else None
            else:
                h_c = h_flat[t0:t1].index_select(0, idx).to(cdt)              # [C, H]
                z, slope = chunked._capped_logits(h_c, w, b_, inv_temp, head["softcap"])  # [C, V] each
                lse = torch.logsumexp(z, dim=-1)                              # [C]
                logp_c = z.gather(1, tgt[:, None]).squeeze(1) - lse           # [C]
                logq = z.sub_(lse[:, None])                                   # log softmax, in place  [C, V]
                p = logq.exp()
                logq.masked_fill_(p == 0, 0.0)                                # 0 log 0 = 0
                ent_c = -(p * logq).sum(-1) if need_entropy else None         # [C]

            # the slice's loss, with batch-wide denominators, differentiated w.r.t. its log-probs and entropy
            lp_leaf = logp_c.detach().requires_grad_()
            ent_leaf = ent_c.detach().requires_grad_() if need_entropy else None
            with torch.enable_grad():
                n_tok = t1 - t0
                shape = (n_tok,) if packed else (s1 - s0, T)
                lp_tok = torch.zeros(n_tok, dtype=cdt, device=hidden.device).index_copy(0, idx, lp_leaf)
                ent_tok = None if not need_entropy else torch.zeros(
                    n_tok, dtype=cdt, device=hidden.device).index_copy(0, idx, ent_leaf).view(shape)
                part = whole.slice(s0, s1, t0, t1).with_logp(lp_tok.view(shape), ent_tok, opts)
                out = evaluate(spec, part, opts)
                leaves = [lp_leaf] + ([ent_leaf] if need_entropy else [])
                grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
            total += out.loss.detach()
            g_lp = grads[0] if grads[0] is not None else torch.zeros_like(logp_c)
            rows = idx + t0
            logp_all.index_copy_(0, rows, logp_c)
            if need_entropy:
                ent_all.index_copy_(0, rows, ent_c)
            if triton_head is not None:
                dh.index_copy_(0, rows, triton_head.backward(g_lp, grads[1] if need_entropy else None))
                continue
            # dz = g_lp ([v == t] - p) - g_ent p (log p + ent), times 1/temperature
            if need_entropy and grads[1] is not None:
                dz = logq.add_(ent_c[:, None]).mul_(p).mul_(-grads[1][:, None])
                dz.sub_(p.mul_(g_lp[:, None]))
            else:
                dz = p.mul_(-g_lp[:, None])
            dz.scatter_add_(1, tgt[:, None], g_lp[:, None])
            dz.mul_(inv_temp)
            if slope is not None:                                             # chain rule through the cap
                dz.mul_(slope)
            dh.index_copy_(0, rows, dz @ w)
            dw.addmm_(dz.T, h_c)
            if db is not None:
                db += dz.sum(0)
            del z, logq, p, dz, slope
        if triton_head is not None:
            return total, dh, triton_head.dw, triton_head.db
        return total, dh, dw, db

    loss = _SinglePassLoss.apply(hidden, weight, head["bias"], run)
    with torch.no_grad():                      # the metrics, from the slices' log-probs on the prepared batch
        full = evaluate(spec, whole.with_logp(logp_all.view(N_shape),
                                              None if ent_all is None else ent_all.view(N_shape), opts), opts)
    metrics = dict(full.metrics)
    metrics["loss"] = loss.detach()
    return PolicyLossOutput(loss, metrics)
