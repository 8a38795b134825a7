"""The per-rank side of ``tests/test_distributed.py``: checks that run inside spawned gloo process groups on CPU.

Each suite is a list of named checks. Every rank runs every check in order; a check returns normally or raises, and
each rank writes ``{check: "ok" | "FAIL ..."}`` to ``<out_dir>/rank<r>.json``, which the parent test reads. Spawning
costs seconds, so one spawned run per world size covers a whole suite.

Ground truth: the float64 materialised reference (``rlcore.reference``) on the whole, unsharded head, computed on
every rank from the same seeded inputs; each rank compares its shard of the head's gradient with the truth's rows.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import rlcore
from rlcore.reference import linear_logprobs_reference

from .test_fused_loss import LOSS_KWARGS, make_batch

TIMEOUT = datetime.timedelta(seconds=60)
F64 = 1e-10
FP32 = {"logp": 2e-5, "ent": 2e-5, "dh": 5e-5, "dW": 5e-5, "db": 5e-5}   # rlcore.validate's bar


def uneven_sizes(V: int, world: int) -> list:
    """Deliberately unequal shard sizes summing to V, in proportions 1 : 3 : 5 (2 ranks: 1 : 3)."""
    weights = [((r * 7) % 5) + 1 for r in range(world)]
    sizes = [max(1, V * w // sum(weights)) for w in weights[:-1]]
    return sizes + [V - sum(sizes)]


def shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return None if x is None else x[start:start + sizes[rank]]


def rel(x, ref) -> float:
    scale = ref.double().abs().max().clamp(min=1e-30)
    return ((x.double() - ref.double()).abs().max() / scale).item()


def assert_rel(got: dict, want: dict, tol, what: str) -> None:
    for k, ref in want.items():
        err = rel(got[k], ref)
        bound = tol[k] if isinstance(tol, dict) else tol
        assert err <= bound, f"{what}: {k} relative error {err:.2e} > {bound:.0e}"


def assert_same_on_every_rank(x: torch.Tensor, what: str) -> None:
    every = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(every, x.contiguous())
    assert all(torch.equal(e, every[0]) for e in every), f"{what} differs across ranks"


# ----------------------------------------------------------------------------------------------------------------------
# linear_logprobs over vocabulary shards
# ----------------------------------------------------------------------------------------------------------------------


def head_case(N, H, V, *, dtype=torch.float64, bias=True, ignore_index=-100, n_ignored=3, seed=0):
    """Inputs with O(1) logits, a few ignored targets, and upstream gradients for logp and entropy."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = 0.3 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = ignore_index
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), targets=targets, g_lp=g_lp, g_ent=g_ent,
                ignore_index=ignore_index)


def truth(case, *, temperature=1.0, use=("logp", "ent")):
    """float64 materialised values and gradients of ``sum(g_lp logp) + sum(g_ent ent)`` on the whole head."""
    h = case["hidden"].double().requires_grad_()
    w = case["weight"].double().requires_grad_()
    b = None if case["bias"] is None else case["bias"].double().requires_grad_()
    logp, ent = linear_logprobs_reference(h, w, case["targets"], bias=b, temperature=temperature,
                                          ignore_index=case["ignore_index"], return_entropy=True)
    return _values_and_grads(logp, ent, case, h, w, b, use)


def _values_and_grads(logp, ent, case, h, w, b, use):
    loss = 0.0
    if "logp" in use:
        loss = loss + (logp.double() * case["g_lp"]).sum()
    if "ent" in use:
        loss = loss + (ent.double() * case["g_ent"]).sum()
    leaves = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(loss, leaves)
    out = dict(logp=logp.detach(), ent=ent.detach(), dh=grads[0], dW=grads[1])
    if b is not None:
        out["db"] = grads[2]
    return out


def sharded(case, sizes, *, temperature=1.0, use=("logp", "ent"), backend="torch", **kw):
    """rlcore over this rank's shard with ``process_group=WORLD``: values and gradients (its shard's rows)."""
    rank = dist.get_rank()
    h = case["hidden"].clone().requires_grad_()
    w = shard(case["weight"], sizes, rank).clone().requires_grad_()
    b = None if case["bias"] is None else shard(case["bias"], sizes, rank).clone().requires_grad_()
    logp, ent = rlcore.linear_logprobs(h, w, case["targets"], bias=b, temperature=temperature, return_entropy=True,
                                       ignore_index=case["ignore_index"], backend=backend,
                                       process_group=dist.group.WORLD, **kw)
    return _values_and_grads(logp, ent, case, h, w, b, use)


def compare_sharded(case, sizes, tol, what, **kw):
    rank = dist.get_rank()
    want = truth(case, temperature=kw.get("temperature", 1.0), use=kw.get("use", ("logp", "ent")))
    got = sharded(case, sizes, **kw)
    want["dW"] = shard(want["dW"], sizes, rank)
    if "db" in want:
        want["db"] = shard(want["db"], sizes, rank)
    assert_rel(got, want, tol, what)
    for k in ("logp", "ent", "dh"):
        assert_same_on_every_rank(got[k], f"{what}: {k}")


def even_float64(world):
    V = 8 * world
    compare_sharded(head_case(23, 16, V, seed=1), [8] * world, F64, "even shards, float64")


def uneven_temperature(world):
    V = 41
    compare_sharded(head_case(29, 12, V, seed=2), uneven_sizes(V, world), F64, "uneven shards, T=0.7",
                    temperature=0.7)


def ignore_index_is_a_vocabulary_id(world):
    """ignore_index=0 (a real id, and the stand-in local id of targets another rank owns): still exact."""
    V = 19
    case = head_case(31, 8, V, ignore_index=0, n_ignored=5, seed=3)
    compare_sharded(case, uneven_sizes(V, world), F64, "ignore_index=0", temperature=1.3)


def only_logp_or_only_entropy(world):
    V = 26
    for use in (("logp",), ("ent",)):
        compare_sharded(head_case(17, 8, V, seed=4), uneven_sizes(V, world), F64, f"only {use}", use=use)


def no_bias_float32(world):
    V = 77
    case = head_case(40, 32, V, dtype=torch.float32, bias=False, seed=5)
    compare_sharded(case, uneven_sizes(V, world), FP32, "float32, no bias", temperature=0.9)


def triton_backend(world):
    """The Triton kernels (Triton's CPU interpreter here) as the local op: the same composition."""
    V = 70
    case = head_case(16, 16, V, dtype=torch.float32, seed=6)
    compare_sharded(case, uneven_sizes(V, world), FP32, "triton", backend="triton", temperature=0.8)


def shard_with_no_mass(world):
    """A -inf bias over a whole shard (say, vocabulary padding): that rank's partials carry no mass, no NaN."""
    V = 10 * world
    case = head_case(15, 8, V, seed=7)
    case["bias"][-10:] = float("-inf")
    case["targets"] = case["targets"].clamp(max=V - 11).masked_fill(case["targets"] == -100, -100)
    compare_sharded(case, [10] * world, F64, "a masked shard")


def every_target_on_one_rank(world):
    V = 6 * world
    case = head_case(12, 8, V, n_ignored=0, seed=8)
    case["targets"] = case["targets"] % 6 + 6 * (world - 1)          # all on the last rank
    compare_sharded(case, [6] * world, F64, "targets on one rank")


# ----------------------------------------------------------------------------------------------------------------------
# fused_policy_loss over vocabulary shards
# ----------------------------------------------------------------------------------------------------------------------


def loss_kwargs(batch, loss_type):
    kw = dict(LOSS_KWARGS[loss_type], loss_type=loss_type)
    for k in ("old_logp", "ref_logp", "sampler_logp", "cu_seqlens"):
        if k in batch:
            kw[k] = batch[k]
    return kw


def fused_case(loss_type, packed, sizes, temperature, **extra):
    rank = dist.get_rank()
    B, T, H, V = 5, 7, 12, sum(sizes)
    batch = make_batch(B, T, H, V, packed=packed, seed=11)
    kw = dict(loss_kwargs(batch, loss_type), **extra)
    # truth: materialised float64 logits of the whole head -> policy_loss
    h = batch["hidden"].clone().requires_grad_()
    w, b = batch["weight"].clone().requires_grad_(), batch["bias"].clone().requires_grad_()
    lp, ent = linear_logprobs_reference(h, w, batch["targets"], bias=b, temperature=temperature, return_entropy=True)
    mask = batch["mask"] & (batch["targets"] != -100)
    ref = rlcore.policy_loss(lp, batch["advantages"], mask, entropy=ent, **kw)
    want = dict(zip(("loss", "dh", "dW", "db"), [ref.loss.detach()] + list(torch.autograd.grad(ref.loss, [h, w, b]))))
    want["dW"], want["db"] = shard(want["dW"], sizes, rank), shard(want["db"], sizes, rank)
    # rlcore: this rank's shard of the head
    h = batch["hidden"].clone().requires_grad_()
    w = shard(batch["weight"], sizes, rank).clone().requires_grad_()
    b = shard(batch["bias"], sizes, rank).clone().requires_grad_()
    out = rlcore.fused_policy_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], bias=b,
                                   temperature=temperature, backend="torch", process_group=dist.group.WORLD,
                                   compute_entropy=True, **kw)
    got = dict(zip(("loss", "dh", "dW", "db"), [out.loss.detach()] + list(torch.autograd.grad(out.loss, [h, w, b]))))
    assert_rel(got, want, F64, f"fused {loss_type}")
    for k in ("num_tokens", "entropy_mean"):
        torch.testing.assert_close(out.metrics[k].double(), ref.metrics[k].double(), rtol=1e-10, atol=1e-12)
    assert_same_on_every_rank(got["loss"], "fused loss")


def fused_gspo_packed(world):
    """GSPO on the packed layout: cu_seqlens on every rank, an entropy bonus, uneven shards."""
    fused_case("gspo", True, uneven_sizes(37, world), 0.8, entropy_coef=0.01)


def fused_ppo_padded(world):
    """PPO (GRPO-style token-level clipping, dual clip, a KL term) on the padded layout, even shards."""
    fused_case("ppo", False, [13] * world, 1.0, beta=0.05, kl_estimator="k3")


def fused_cispo_packed(world):
    fused_case("cispo", True, uneven_sizes(30, world), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# DTensor heads
# ----------------------------------------------------------------------------------------------------------------------


def _dtensor(x, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x.detach().clone(), mesh, placements).requires_grad_()


def dtensor_head(world):
    """A DTensor head sharded on the vocabulary (unevenly: V = 5 world + 1): with its mesh's group as
    ``process_group`` it runs vocabulary-parallel; without a group it is gathered. Both give the truth, and the
    DTensors' gradients are the truth's rows of each rank's shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    V = 5 * world + 1
    case = head_case(14, 8, V, seed=9)
    want = truth(case, temperature=0.9)
    for group in (mesh.get_group(), None):
        w = _dtensor(case["weight"], mesh, [Shard(0)])
        b = _dtensor(case["bias"], mesh, [Shard(0)])
        h = case["hidden"].clone().requires_grad_()
        logp, ent = rlcore.linear_logprobs(h, w, case["targets"], bias=b, temperature=0.9, return_entropy=True,
                                           backend="torch", process_group=group)
        got = _values_and_grads(logp, ent, case, h, w, b, ("logp", "ent"))
        rows = w.to_local().shape[0]
        start = local_start(rows)
        for k in ("dW", "db"):
            assert type(got[k]).__name__ == "DTensor", f"{k}: not the DTensor parameter's gradient"
            got[k] = got[k].to_local()
        assert_rel(got, dict(want, dW=want["dW"][start:start + rows], db=want["db"][start:start + rows]), F64,
                   f"DTensor head, process_group={'mesh' if group is not None else None}")


def local_start(rows: int) -> int:
    """Where this rank's rows start in the vocabulary, from every rank's row count."""
    every = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor([rows]))
    return int(sum(e.item() for e in every[:dist.get_rank()]))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: every rank raises, none is left waiting
# ----------------------------------------------------------------------------------------------------------------------


def expect_error(fn, exc, *fragments):
    try:
        fn()
    except exc as err:
        for f in fragments:
            assert f in str(err), f"{f!r} not in the error: {err}"
    else:
        raise AssertionError(f"no {exc.__name__} raised")
    dist.barrier()   # every rank got here: nobody is stuck in a collective


def _call(case, sizes, **kw):
    return lambda: sharded(case, sizes, **kw)


def error_hidden_size_differs(world):
    rank = dist.get_rank()
    case = head_case(9, 8 + (rank == world - 1), 4 * world, seed=10)   # the last rank has H = 9
    expect_error(_call(case, [4] * world), ValueError, "weight", "hidden size H", "differs")


def error_rows_differ(world):
    rank = dist.get_rank()
    case = head_case(9 + rank, 8, 4 * world, seed=10)
    expect_error(_call(case, [4] * world), ValueError, "hidden", "number of rows N")


def error_dtype_differs(world):
    rank = dist.get_rank()
    case = head_case(9, 8, 4 * world, dtype=torch.float32 if rank == 0 else torch.float64, seed=10)
    expect_error(_call(case, [4] * world), ValueError, "hidden: the dtype differs")


def error_target_outside_every_shard(world):
    sizes = uneven_sizes(23, world)
    case = head_case(9, 8, 23, seed=10)
    case["targets"][4] = 23
    expect_error(_call(case, sizes), ValueError, "id 23 is outside every vocabulary shard", f"{sizes}")


def error_targets_differ(world):
    case = head_case(9, 8, 4 * world, seed=10)
    case["targets"][0] = dist.get_rank() % 2
    expect_error(_call(case, [4] * world), ValueError, "targets differ between rank 0 and rank(s) [1]")


def error_one_rank_rejects(world):
    """A local input error on one rank only (a non-integer targets tensor): that rank raises its own TypeError,
    every other rank a ValueError pointing at it."""
    rank = dist.get_rank()
    case = head_case(9, 8, 4 * world, seed=10)
    if rank == 1:
        case["targets"] = case["targets"].double()
        expect_error(_call(case, [4] * world), TypeError, "targets must be an integer tensor")
    else:
        expect_error(_call(case, [4] * world), ValueError, "rank(s) [1] rejected their inputs")


def error_dtensor_not_sharded_on_the_group(world):
    """A replicated DTensor head with a process_group is no vocabulary shard: ValueError naming the weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate

    case = head_case(9, 8, 4 * world, seed=10)
    w = _dtensor(case["weight"], init_device_mesh("cpu", (world,)), [Replicate()])
    expect_error(lambda: rlcore.linear_logprobs(case["hidden"], w, case["targets"], process_group=dist.group.WORLD),
                 ValueError, "weight is a DTensor", "Shard(0)")


def error_single_pass_with_group(world):
    batch = make_batch(2, 3, 4, 5, seed=1)
    expect_error(lambda: rlcore.fused_policy_loss(batch["hidden"], batch["weight"], batch["targets"],
                                                  batch["advantages"], batch["mask"], strategy="single_pass",
                                                  process_group=dist.group.WORLD),
                 ValueError, "strategy='single_pass' does not take a process_group")


PARALLEL = {f.__name__: f for f in (
    even_float64, uneven_temperature, ignore_index_is_a_vocabulary_id, only_logp_or_only_entropy, no_bias_float32,
    triton_backend, shard_with_no_mass, every_target_on_one_rank, fused_gspo_packed, fused_ppo_padded,
    fused_cispo_packed, dtensor_head, error_hidden_size_differs, error_rows_differ, error_dtype_differs,
    error_target_outside_every_shard, error_targets_differ, error_one_rank_rejects, error_dtensor_not_sharded_on_the_group,
    error_single_pass_with_group,
)}


# ----------------------------------------------------------------------------------------------------------------------
# Sharded training: FSDP2 and DDP against one process
# ----------------------------------------------------------------------------------------------------------------------


class TinyPolicy(nn.Module):
    """Embedding -> tanh(Linear) trunk; the LM head is a submodule the forward never calls: its weight goes to
    ``fused_policy_loss`` instead, outside any FSDP forward (so under FSDP2 it stays a sharded DTensor)."""

    def __init__(self, V=29, H=8):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.trunk = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V)

    def forward(self, ids):
        return torch.tanh(self.trunk(self.embed(ids)))


STEPS = 3
LR = 0.5


def rank_batch(rank, V):
    """This rank's packed batch: its own sequences and cu_seqlens (different lengths on each rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(2, 7, (3 + rank,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    N = int(cu[-1])
    ids = torch.randint(0, V, (N,), generator=g)
    targets = torch.roll(ids, -1)
    mask = torch.rand(N, generator=g) > 0.2
    advantages = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(N, generator=g, dtype=torch.float64)
    return dict(ids=ids, targets=targets, mask=mask, advantages=advantages, cu_seqlens=cu, noise=noise)


def new_model():
    torch.manual_seed(0)
    return TinyPolicy().double()


def rank_loss(model, batch, old_logp):
    """The forward runs the (wrapped) model; the head's parameters go to fused_policy_loss as they are found."""
    h = model(batch["ids"])
    head = (model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model).lm_head
    out = rlcore.fused_policy_loss(
        h, head.weight, batch["targets"], batch["advantages"], batch["mask"], bias=head.bias,
        cu_seqlens=batch["cu_seqlens"], old_logp=old_logp, loss_type="ppo", agg="seq-mean-token-mean",
        entropy_coef=0.01, temperature=0.9, backend="torch")
    return out.loss


def old_logps(world, V):
    """Behaviour-policy log-probs near the initial policy's (so the PPO ratios sit near and across the clip)."""
    model = new_model()
    with torch.no_grad():
        out = []
        for r in range(world):
            b = rank_batch(r, V)
            out.append(rlcore.linear_logprobs(model(b["ids"]), model.lm_head.weight, b["targets"],
                                              bias=model.lm_head.bias, temperature=0.9) + b["noise"])
    return out


def single_process_run(world):
    """The unsharded run: one model, the mean of the ranks' losses (what data parallelism optimises)."""
    model = new_model()
    V = model.lm_head.out_features
    olds = old_logps(world, V)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        per_rank = [rank_loss(model, rank_batch(r, V), olds[r]) for r in range(world)]
        loss = torch.stack(per_rank).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append([x.item() for x in per_rank])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded_run(wrap):
    rank, world = dist.get_rank(), dist.get_world_size()
    want_losses, want_params = single_process_run(world)
    model = wrap(new_model())
    V = 29
    batch, old = rank_batch(rank, V), old_logps(world, V)[rank]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        loss = rank_loss(model, batch, old)
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = abs(loss.item() - want_losses[step][rank])
        assert err <= 1e-10 * max(1.0, abs(want_losses[step][rank])), f"step {step}: loss differs by {err:.2e}"
    state = model.module.state_dict() if isinstance(model, nn.parallel.DistributedDataParallel) else \
        model.state_dict()
    for k, want in want_params.items():
        got = state[k]
        got = got.full_tensor() if type(got).__name__ == "DTensor" else got
        err = rel(got, want)
        assert err <= 1e-10, f"{k} after {STEPS} steps: relative error {err:.2e}"
    return model


def fsdp2_head_sharded_alone(world):
    """fully_shard on the trunk, the head and the root: the head's weight and bias reach fused_policy_loss as
    DTensors (sharded on the vocabulary, V = 29 split unevenly), gathered, their gradients averaged back."""
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        fully_shard(model.trunk)
        fully_shard(model.lm_head)
        fully_shard(model)
        return model

    model = sharded_run(wrap)
    assert type(model.lm_head.weight).__name__ == "DTensor"


def fsdp2_head_in_root(world):
    """The head in the root's FSDP group: after the root's forward its parameters are unsharded plain tensors,
    and FSDP2 reduce-scatters their gradients itself."""
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        fully_shard(model.trunk)
        fully_shard(model)
        return model

    sharded_run(wrap)


def ddp(world):
    sharded_run(lambda model: nn.parallel.DistributedDataParallel(model))


TRAINING = {f.__name__: f for f in (fsdp2_head_sharded_alone, fsdp2_head_in_root, ddp)}

SUITES = {"parallel": PARALLEL, "training": TRAINING}


# ----------------------------------------------------------------------------------------------------------------------
# Entry point (torch.multiprocessing.start_processes)
# ----------------------------------------------------------------------------------------------------------------------


def main(rank: int, world: int, init_file: str, suite: str, out_dir: str) -> None:
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    results = {}
    try:
        for name, check in SUITES[suite].items():
            try:
                check(world)
                results[name] = "ok"
            except Exception:   # noqa: BLE001 - reported to the parent test, which fails on it
                results[name] = "FAIL " + traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
