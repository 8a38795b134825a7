"""Beyond one GPU: a vocabulary-parallel ``linear_logprobs`` over ``torch.distributed``, and DTensor heads.

Vocabulary parallelism (``process_group=``, Megatron-style tensor parallelism of the LM head)
    Rank ``r`` of the group holds rows ``[start_r, start_r + V_r)`` of the head (and of the bias): contiguous shards
    in group-rank order, ``start_r = V_0 + ... + V_{r-1}``. The ``V_r`` may differ (uneven shards): every call
    all-gathers them, so nothing else describes the layout. ``hidden``, ``targets`` (and the loss inputs) are the
    same on every rank, as after Megatron's last tensor-parallel all-reduce; targets are global vocabulary ids.

    Each rank runs the local op (``rlcore::linear_logprobs``, whatever its backend: Triton, chunked PyTorch or a
    later one) over its own shard, with the targets mapped to local ids. A target another rank owns becomes local
    id 0 (its log-prob is discarded), an ignored target stays ignored. One ``all_gather`` of the ``[3, N]`` local
    partials (log-sum-exp ``lse_r``, raw entropy ``H_r``, the owner's local log-prob) then gives, on every rank, the
    same result bit for bit (a gather, not a sum, so the combination is deterministic)::

        lse  = logsumexp_r lse_r,          w_r = exp(lse_r - lse)      (rank r's share of the probability mass)
        logp = logp_owner + log w_owner                                 (= z_t - lse)
        H    = sum_r w_r (H_r - log w_r)                                (p_v = w_r q_v on shard r)

    Backward: the gradient of the logits of shard ``r`` is ``g_lp ([v = t] - p_v) - g_ent p_v (log p_v + H)`` with
    the *global* ``p_v = exp(z_v - lse)``. That is exactly what the local backward op computes when it is handed
    the global ``(lse, H)`` in place of its own statistics, except that on the rows whose target another rank owns
    it adds the one-hot term at the stand-in id 0: that term (one row of ``W`` per token, O(N H)) is taken back
    here. Each rank thus gets the exact gradient of its own shard of ``W`` and ``b`` with no communication, and its
    partial ``dh``, which one ``all_reduce`` (sum) completes: every rank gets the full ``dh``. The loss is
    replicated, not split, so nothing is scaled by the world size; do not also all-reduce ``dh`` upstream (no
    Megatron "copy to tensor-parallel region" in front of the head).

    Before any kernel, one small ``all_gather`` exchanges each rank's input metadata, so inconsistent inputs
    (``H``, ``N``, dtypes, temperature, ...) and any rank's failed input check raise ``ValueError`` on *every* rank
    instead of leaving the others waiting in a collective. With ``check_targets`` the targets are gathered too: they
    must agree across ranks and lie in ``[0, sum_r V_r)`` or be ``ignore_index``.

DTensor heads (FSDP2 ``fully_shard``, ``torch.distributed.tensor.parallel``)
    A ``weight`` (or ``bias``) that is a DTensor is turned into a plain tensor first, differentiably:
    - with ``process_group``: its local shard (``to_local()``), when it is sharded on dim 0 over a 1-D mesh of that
      very group, so the vocabulary-parallel path above applies and its gradient is the DTensor's ``Shard(0)``
      gradient;
    - without: gathered whole (``redistribute`` to ``Replicate``), its gradient declared ``Partial("avg")``, so the
      backward reduce-scatters the ranks' gradients to the shards as their mean. That is what FSDP2 (and DDP) do for
      every other parameter: each rank's loss is over its own data, and the gradients are averaged over the
      data-parallel ranks. When the ranks compute the same loss (replicated data) the mean is that gradient.
"""

from __future__ import annotations

import sys
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import chunked

__all__ = ["is_dtensor", "local_head", "agreed", "shard_layout", "vocab_parallel_logprobs", "ShardLayout"]

_LOCAL_IGNORE = -1   # the ignore_index of the local op: never a local id, whatever the caller's ignore_index is


# ----------------------------------------------------------------------------------------------------------------------
# DTensor heads
# ----------------------------------------------------------------------------------------------------------------------


def is_dtensor(x) -> bool:
    """Is ``x`` a DTensor? Without importing ``torch.distributed.tensor`` (over a second): if it was never
    imported, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def local_head(weight, bias, group):
    """``(weight, bias)`` as plain tensors: a DTensor becomes its vocabulary shard on ``group``, or, without a group,
    the whole tensor, gathered with its gradient averaged back onto the shards (see the module docstring)."""
    return _plain(weight, "weight", group), _plain(bias, "bias", group)


def _plain(x, name: str, group):
    if not is_dtensor(x):
        return x
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = x.device_mesh
    if group is None:
        return x.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=[Partial("avg")] * mesh.ndim)
    if mesh.ndim == 1 and x.placements[0] == Shard(0) and (
            dist.get_process_group_ranks(mesh.get_group()) == dist.get_process_group_ranks(group)):
        return x.to_local()
    raise ValueError(
        f"{name} is a DTensor with placements {tuple(x.placements)} on a {mesh.ndim}-d mesh; with process_group it "
        "must be sharded on dim 0 (Shard(0), the vocabulary) over a 1-d mesh of that same group. Pass its local "
        "shard (a plain tensor) instead, or no process_group to gather it whole"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Agreement across ranks: metadata exchange and checks that raise on every rank
# ----------------------------------------------------------------------------------------------------------------------


class ShardLayout(NamedTuple):
    """Where each rank's rows sit in the vocabulary: rank ``r`` holds ``[starts[r], starts[r] + sizes[r])``."""
    group: object
    rank: int
    starts: tuple
    sizes: tuple

    @property
    def total(self) -> int:
        return self.starts[-1] + self.sizes[-1]

    def owners(self, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[R, N]``: does rank r own each row's target?"""
        starts = torch.tensor(self.starts, device=targets.device)[:, None]
        ends = starts + torch.tensor(self.sizes, device=targets.device)[:, None]
        t = targets.long()[None, :]
        return valid[None, :] & (t >= starts) & (t < ends)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``[R, *x.shape]``: every rank's ``x``, in group-rank order (the list form: every backend has it)."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


def _device(hidden) -> torch.device:
    return hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")


def _run_check(check, args):
    try:
        return check(*args), None
    except (TypeError, ValueError) as err:
        return None, err


def _raise_if_any_failed(err, flags: torch.Tensor) -> None:
    """Every rank raises when any rank's local input check failed: its own error there, a pointer to it elsewhere."""
    if err is not None:
        raise err
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (see the error raised there); every "
                         "rank of the group stops here")


def agreed(group, check, *args):
    """``check(*args)`` (a local input check returning a value), made collective over ``group``: if it raises on
    any rank, every rank raises, before anything waits in a collective. Without a group, just ``check(*args)``."""
    if group is None:
        return check(*args)
    result, err = _run_check(check, args)
    flags = _all_gather(torch.tensor([float(err is not None)], dtype=torch.float64, device=_device(args[0])), group)
    _raise_if_any_failed(err, flags[:, 0])
    return result


# (argument named in the error, what is compared, how it is read from the inputs: a number or a setting)
_AGREED = (
    ("hidden", "the number of rows N", lambda a: a["hidden"].numel() // max(a["hidden"].shape[-1], 1)),
    ("weight", "the hidden size H (weight.shape[1])", lambda a: a["weight"].shape[1]),
    ("hidden", "the dtype", lambda a: a["hidden"].dtype),
    ("weight", "the dtype", lambda a: a["weight"].dtype),
    ("bias", "whether a bias is given", lambda a: a["bias"] is not None),
    ("temperature", "the value", lambda a: float(a["temperature"])),
    ("ignore_index", "the value", lambda a: int(a["ignore_index"])),
    ("precision", "the value", lambda a: a["precision"]),
    ("backend", "the resolved backend", lambda a: a["backend"]),
    ("hidden", "requires_grad (every rank must run the backward's all_reduce, or none)",
     lambda a: a["hidden"].requires_grad and torch.is_grad_enabled()),
)


def _number(value) -> float:
    """A float64-exact number for a setting (a dtype, a mode name are coded), to compare it across ranks."""
    return float(value) if isinstance(value, (bool, int, float)) else float(zlib.crc32(str(value).encode()))


def shard_layout(group, check, hidden, weight, targets, bias, temperature, ignore_index, precision, backend):
    """Run ``check`` (``_check_inputs``) on the local inputs and exchange their metadata over ``group`` in one small
    all-gather. Returns ``(check's result: the resolved backend, ShardLayout)``; raises ``ValueError`` on every rank
    if any rank's check failed or the ranks disagree on anything but their number of vocabulary rows."""
    args = (hidden, weight, targets, bias, temperature, ignore_index, precision, backend)
    resolved, err = _run_check(check, args)
    mine = []
    meta = [float(err is not None), 0.0] + [0.0] * len(_AGREED)
    if err is None:
        inputs = dict(hidden=hidden, weight=weight, bias=bias, temperature=temperature, ignore_index=ignore_index,
                      precision=precision, backend=resolved)
        mine = [read(inputs) for _, _, read in _AGREED]
        meta[1] = float(weight.shape[0])
        meta[2:] = [_number(v) for v in mine]
    rows = _all_gather(torch.tensor(meta, dtype=torch.float64, device=_device(hidden)), group).tolist()  # [R, k]
    _raise_if_any_failed(err, torch.tensor([r[0] for r in rows]))
    for i, (name, what, _) in enumerate(_AGREED):
        column = [r[2 + i] for r in rows]
        if any(c != column[0] for c in column):
            ranks = [r for r, c in enumerate(column) if c != column[0]]
            shown = f"per rank: {column}" if isinstance(mine[i], (int, float)) else f"this rank has {mine[i]}"
            raise ValueError(f"{name}: {what} differs across the ranks of process_group (rank 0 vs rank(s) {ranks}; "
                             f"{shown}); vocabulary-parallel ranks must agree on everything but their shard's rows")
    sizes = tuple(int(r[1]) for r in rows)
    starts = tuple(sum(sizes[:r]) for r in range(len(sizes)))
    return resolved, ShardLayout(group, dist.get_rank(group), starts, sizes)


def check_targets(targets: torch.Tensor, layout: ShardLayout, ignore_index: int) -> None:
    """Targets must be the same on every rank and lie in one of the shards (or be ``ignore_index``). Gathered, so
    every rank reaches the same verdict and raises the same error."""
    every = _all_gather(targets.reshape(-1).long(), layout.group)                       # [R, N]
    differ = (every != every[0]).any(1).nonzero().flatten().tolist()
    if differ:
        raise ValueError(f"targets differ between rank 0 and rank(s) {differ} of process_group: vocabulary "
                         "parallelism needs the same hidden states and targets on every rank of the group")
    t = every[0]
    bad = (t != ignore_index) & ((t < 0) | (t >= layout.total))
    if bool(bad.any()):
        first = t[bad][0].item()
        raise ValueError(
            f"targets: id {first} is outside every vocabulary shard of process_group ([0, {layout.total}) split "
            f"{list(layout.sizes)} over the ranks) and is not ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# The vocabulary-parallel op
# ----------------------------------------------------------------------------------------------------------------------


class _VocabParallelLogprobs(torch.autograd.Function):
    """``(logp [N], entropy [N])`` of the whole vocabulary from this rank's shard; math in the module docstring."""

    @staticmethod
    @chunked.autocast_off
    def forward(ctx, hidden, weight, bias, targets, layout, temperature, ignore_index, precision, backend):
        valid = targets != ignore_index
        local = targets.long() - layout.starts[layout.rank]
        own = valid & (local >= 0) & (local < weight.shape[0])
        t_local = torch.where(own, local, 0).masked_fill_(~valid, _LOCAL_IGNORE)
        logp_local, _, stats = torch.ops.rlcore.linear_logprobs(hidden, weight, bias, t_local, temperature,
                                                                _LOCAL_IGNORE, precision, backend, False)
        parts = _all_gather(torch.stack([stats[0], stats[1], torch.where(own, logp_local, 0.0)]), layout.group)
        lse_r, ent_r, logp_r = parts.unbind(1)                                           # each [R, N]
        lse = torch.logsumexp(lse_r, 0)                                                  # [N]
        log_w = lse_r - lse                                                              # [R, N]
        w = log_w.exp()
        ent = torch.where(w > 0, w * (ent_r - log_w), 0.0).sum(0)    # a shard with no mass (all -inf) adds nothing
        logp = torch.where(layout.owners(targets, valid), logp_r + log_w, 0.0).sum(0)  # one owner per valid row
        logp, ent = torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)

        # The global (lse, H) stand in for the local statistics in the backward (see the module docstring).
        ctx.save_for_backward(hidden, weight, bias, t_local, torch.stack([lse, ent]), valid & ~own)
        ctx.args = (temperature, precision, backend)
        ctx.group = layout.group
        ctx.set_materialize_grads(False)  # an unused entropy gives None, and the local backward skips its term
        return logp, ent

    @staticmethod
    @chunked.autocast_off
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, t_local, stats, stray = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        temperature, precision, backend = ctx.args
        if grad_logp is None:
            grad_logp = torch.zeros_like(stats[0])
        dh, dw, db = torch.ops.rlcore.linear_logprobs_backward(
            grad_logp, grad_ent, hidden, weight, bias, t_local, stats, temperature, _LOCAL_IGNORE, precision,
            backend, need_dh, need_dw, need_db)
        # Take back the one-hot term the local op put at the stand-in id 0 for targets other ranks own.
        cdt = stats.dtype
        c = torch.where(stray, grad_logp.to(cdt), 0.0) / temperature                   # [N]
        if need_dh:
            dh = (dh.to(cdt) - c[:, None] * weight[0].to(cdt)).to(hidden.dtype)
            dist.all_reduce(dh, group=ctx.group)                                         # the full dh on every rank
        if need_dw:
            dw[0] -= (c @ hidden.to(cdt)).to(dw.dtype)
        if need_db and bias is not None:
            db[0] -= c.sum().to(db.dtype)
        return (dh if need_dh else None, dw if need_dw else None,
                db if need_db and bias is not None else None, *(None,) * 6)


def vocab_parallel_logprobs(hidden, weight, bias, targets, layout: ShardLayout, temperature: float,
                            ignore_index: int, precision: str, backend: str, check: bool):
    """``hidden [N, H]``, this rank's ``weight [V_r, H]`` and ``bias [V_r]``, global ``targets [N]`` (all validated
    locally and agreed by :func:`shard_layout`) -> ``(logp [N], entropy [N])`` over the whole vocabulary."""
    if check:
        check_targets(targets, layout, ignore_index)
    return _VocabParallelLogprobs.apply(hidden, weight, bias, targets, layout, temperature, ignore_index, precision,
                                        backend)
