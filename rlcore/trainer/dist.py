"""Data parallel under torchrun: process group (NCCL on GPU, gloo on CPU), DDP or FSDP2 wrapping, and the
collectives the trainer needs. Without torchrun (no ``WORLD_SIZE``) everything is a single-process no-op.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

__all__ = ["setup", "teardown", "wrap", "is_main", "rank", "world", "all_mean", "any_true", "all_gather_object",
           "barrier", "full_state_dict", "load_full_state_dict", "optim_state_dict", "load_optim_state_dict"]


def setup() -> torch.device:
    """Join the process group when launched by torchrun; the device this rank trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(module: torch.nn.Module, parallel: str) -> torch.nn.Module:
    """DDP, or FSDP2 (each decoder layer a unit, the rest in the root) when there are several ranks."""
    if world() == 1:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(module.parameters()).device
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(module.model.base_model, "layers", []):
        fully_shard(layer)
    fully_shard(module)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def all_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce)."""
    if world() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world() for k, v in zip(keys, t.tolist())}


def any_true(flag: bool) -> bool:
    if world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> List[Any]:
    if world() == 1:
        return [obj]
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload=True would leave the full state on rank 0 only; every rank needs it (sampler sync, equal loads)
    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The full, unsharded model weights (every rank gets them; for checkpoints and sampler sync)."""
    if world() == 1:
        return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(model), options=_options())


def load_full_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    if world() == 1:
        unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(unwrap(model), state, options=_options())


def optim_state_dict(model, optimizer) -> Dict:
    if world() == 1:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_options())


def load_optim_state_dict(model, optimizer, state: Dict) -> None:
    if world() == 1:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_options())
