"""Multi-process tests of ``rlcore.distributed``: gloo process groups of 2 and 3 ranks on CPU, spawned here.

- Vocabulary parallelism (``process_group=``): values and every gradient (``dh``, each rank's shard of ``dW`` and
  ``db``) equal the single-process float64 materialised reference, for even and uneven shards, with temperature,
  ignored targets and the entropy; ``fused_policy_loss`` with per-rank ``cu_seqlens``; DTensor heads; and bad
  input raising on every rank (``tests/distributed_worker.py`` holds the checks).
- Sharded training: FSDP2 (``fully_shard``) and DDP train a tiny policy for a few steps and match the unsharded
  single-process run.

One spawned run per (suite, world size) serves all its checks: process start-up costs seconds.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from . import distributed_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

DEADLINE_S = 240


@functools.lru_cache(maxsize=None)
def spawn(suite: str, world: int) -> tuple:
    """Run ``suite`` on ``world`` spawned gloo ranks. Returns each rank's ``{check: "ok" | "FAIL ..."}`` (``None``
    for a rank that wrote nothing) and how the processes ended (``""`` when all exited cleanly)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker.main, args=(world, os.path.join(tmp, "store"), suite, tmp), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        ending = ""
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    ending = f"{suite} on {world} ranks did not finish in {DEADLINE_S} s"
                    break
        except ProcessException as err:   # a rank died; what the others wrote still tells which check failed
            ending = f"{type(err).__name__}: {err}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            if not os.path.exists(path):
                results.append(None)
                continue
            with open(path) as f:
                results.append(json.load(f))
    return tuple(results), ending


def check(suite: str, world: int, name: str) -> None:
    results, ending = spawn(suite, world)
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} of {world} reported nothing ({ending or 'exited cleanly'})"
        assert set(res) == set(worker.SUITES[suite]), f"rank {rank} ran {sorted(res)}"
        assert res[name] == "ok", f"rank {rank} of {world}: {res[name]}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(worker.PARALLEL))
def test_vocab_parallel(name, world):
    check("parallel", world, name)


@pytest.mark.parametrize("name", list(worker.TRAINING))
def test_sharded_training(name):
    check("training", 2, name)


def test_uneven_sizes_are_uneven():
    """The shard sizes the checks use are really unequal, and cover the vocabulary."""
    for world in (2, 3):
        sizes = worker.uneven_sizes(41, world)
        assert sum(sizes) == 41 and len(set(sizes)) == world and min(sizes) > 0


def test_a_group_of_one_is_the_local_op(tmp_path):
    """On a one-rank group the combination is the identity (log w = 0, no target owned elsewhere): values and
    gradients equal the op without a group, bit for bit. In this process, with no spawn."""
    import rlcore

    case = worker.head_case(11, 6, 13, seed=0)
    runs = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for group in (None, dist.group.WORLD):
            h, w, b = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
            lp, ent = rlcore.linear_logprobs(h, w, case["targets"], bias=b, temperature=0.7, return_entropy=True,
                                             process_group=group)
            grads = torch.autograd.grad((lp * case["g_lp"]).sum() + (ent * case["g_ent"]).sum(), [h, w, b])
            runs.append([lp, ent, *grads])
    finally:
        dist.destroy_process_group()
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_torchrun_one_node_command():
    """The README's one-node command, as written: ``torchrun --standalone --nproc-per-node 2 -m
    rlcore.validate_distributed`` (gloo on this CPU) prints PASS."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rlcore.validate_distributed", "--vocab", "301", "--tokens", "64"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    out = proc.stdout + proc.stderr
    # The verdict, not the exit status: gloo's teardown at interpreter exit now and then aborts a rank that has
    # already finished (a known c10d issue, unrelated to the check); a FAIL never prints PASS.
    assert "PASS" in proc.stdout, out[-3000:]
    assert "rank 0 holds rows [0, 150)" in proc.stdout, "the shards are not the uneven split the check describes"
