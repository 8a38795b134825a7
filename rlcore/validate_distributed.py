"""Check the vocabulary-parallel head on a real launch: every rank against the unsharded computation.

    torchrun --standalone --nproc-per-node 2 -m rlcore.validate_distributed                  # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m rlcore.validate_distributed --vocab 151936 --hidden 4096 --tokens 4096            # many nodes

The backend is NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo on CPU. Every rank builds
the same seeded inputs, holds an uneven contiguous shard of the head (the last rank gets the remainder) and computes
``linear_logprobs`` with ``process_group``; it also computes the unsharded op on the whole head itself (the inputs
are small enough by default). Rank 0 prints the worst relative error over the ranks of ``logp``, ``entropy``,
``dh``, each rank's ``dW`` and ``db`` rows, and PASS or FAIL; the exit status is non-zero on FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .logprobs import linear_logprobs

__all__ = ["main"]

TOL = {"float64": 1e-10, "float32": 5e-5}   # relative to the largest magnitude (rlcore.validate's FP32 bar)


def _shard_rows(V: int, world: int, rank: int) -> tuple:
    """An uneven split on purpose: ``ceil(V / world) - 1`` rows per rank but the last, which takes the rest."""
    base = max(1, -(-V // world) - 1)
    start = min(rank * base, V - (world - rank))
    stop = V if rank == world - 1 else start + base
    return start, stop


def _run(hidden, weight, bias, targets, g_lp, g_ent, temperature, group):
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    logp, ent = linear_logprobs(h, w, targets, bias=b, temperature=temperature, return_entropy=True,
                                process_group=group)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return dict(logp=logp.detach(), ent=ent.detach(), dh=h.grad, dW=w.grad, db=b.grad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcore.validate_distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--dtype", choices=sorted(TOL), default="float32")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.vocab < world:
            raise SystemExit(f"--vocab {args.vocab} must be at least the world size {world}")
        dtype = getattr(torch, args.dtype)
        g = torch.Generator().manual_seed(0)
        N, H, V = args.tokens, args.hidden, args.vocab
        mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        hidden, weight, bias = mk(N, H), mk(V, H) / H ** 0.5, 0.1 * mk(V)
        targets = torch.randint(0, V, (N,), generator=g)
        targets[::7] = -100                                                    # some ignored positions
        g_lp, g_ent = mk(N), mk(N)
        hidden, weight, bias, g_lp, g_ent = (x.to(device, dtype) for x in (hidden, weight, bias, g_lp, g_ent))
        targets = targets.to(device)

        start, stop = _shard_rows(V, world, rank)
        got = _run(hidden, weight[start:stop], bias[start:stop], targets, g_lp, g_ent, args.temperature,
                   dist.group.WORLD)
        want = _run(hidden, weight, bias, targets, g_lp, g_ent, args.temperature, None)
        want["dW"], want["db"] = want["dW"][start:stop], want["db"][start:stop]
        errors = torch.tensor([((got[k].double() - want[k].double()).abs().max()
                                / want[k].double().abs().max().clamp(min=1e-30)).item() for k in want],
                              dtype=torch.float64, device=device)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        ok = bool((errors <= TOL[args.dtype]).all())
        if rank == 0:
            print(f"rlcore vocabulary-parallel check: {world} ranks ({dist.get_backend()}), N={N} H={H} V={V} "
                  f"{args.dtype}, T={args.temperature}, rank 0 holds rows [{start}, {stop})")
            for k, e in zip(want, errors.tolist()):
                print(f"  {k:5s} max relative error over the ranks {e:.2e}")
            print("PASS" if ok else f"FAIL (tolerance {TOL[args.dtype]:.0e})")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
