"""Shared builders and comparisons for the tests: inputs, rlcore and reference runs with every gradient, errors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

import rlcore
from rlcore.reference import linear_logprobs_reference

from .conftest import HAS_CUDA

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
HALF = (torch.bfloat16, torch.float16)


@dataclass
class Case:
    hidden: torch.Tensor                 # [..., H] leaf
    weight: torch.Tensor                 # [V, H] leaf
    targets: torch.Tensor                # [...]
    bias: Optional[torch.Tensor]         # [V] leaf or None
    g_logp: torch.Tensor                 # [...] upstream gradient of logp
    g_ent: torch.Tensor                  # [...] upstream gradient of entropy
    temperature: float = 1.0
    ignore_index: int = -100

    @property
    def leaves(self):
        return [x for x in (self.hidden, self.weight, self.bias) if x is not None]


def make_case(N, H, V, dtype=torch.float32, *, w_dtype=None, bias=False, ignore_frac=0.0, temperature=1.0,
              logit_scale=3.0, seed=0, lead=None, device=DEVICE) -> Case:
    """Random inputs whose logits have standard deviation about ``logit_scale`` (before temperature)."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead is not None else (N,)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (logit_scale / max(H, 1) ** 0.5)
    b = torch.randn(V, generator=gen) if bias else None
    targets = torch.randint(0, V, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignore_frac] = -100
    g_logp = torch.randn(shape, generator=gen)
    g_ent = torch.randn(shape, generator=gen)
    w_dtype = w_dtype or dtype
    leaf = lambda x, dt: x.to(device=device, dtype=dt).requires_grad_()  # noqa: E731
    return Case(leaf(hidden, dtype), leaf(weight, w_dtype), targets.to(device),
                leaf(b, w_dtype) if b is not None else None, g_logp.to(device), g_ent.to(device), temperature)


def _grads(case: Case, logp, ent, use_logp=True, use_ent=True):
    loss = 0
    if use_logp:
        loss = loss + (logp.double() * case.g_logp.double()).sum()
    if use_ent:
        loss = loss + (ent.double() * case.g_ent.double()).sum()
    grads = torch.autograd.grad(loss, case.leaves, allow_unused=True)
    names = ["dh", "dW", "db"][: len(grads)]
    return {n: (g if g is not None else torch.zeros_like(x)) for n, g, x in zip(names, grads, case.leaves)}


def run_rlcore(case: Case, *, backend="auto", precision="default", use_logp=True, use_ent=True):
    logp, ent = rlcore.linear_logprobs(
        case.hidden, case.weight, case.targets, bias=case.bias, temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=True, precision=precision, backend=backend,
    )
    out = {"logp": logp.detach(), "ent": ent.detach()}
    out.update(_grads(case, logp, ent, use_logp, use_ent))
    return out


def run_reference(case: Case, compute_dtype=torch.float64, use_logp=True, use_ent=True):
    """Float64 ground truth by default, differentiated w.r.t. float64 copies of the inputs (autograd would otherwise
    round the "true" gradients to the leaves' dtype). ``compute_dtype=None`` is PyTorch's own computation in the
    input dtype, with gradients in the inputs' dtypes, as a trainer would get them."""
    if compute_dtype is not None:
        case = replace(case, **{k: getattr(case, k).detach().to(compute_dtype).requires_grad_()
                                for k in ("hidden", "weight", "bias") if getattr(case, k) is not None})
    weight = case.weight if compute_dtype is not None else case.weight.to(case.hidden.dtype)
    logp, ent = linear_logprobs_reference(
        case.hidden, weight, case.targets, bias=case.bias, temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=True, compute_dtype=compute_dtype,
    )
    out = {"logp": logp.detach(), "ent": ent.detach()}
    out.update(_grads(case, logp, ent, use_logp, use_ent))
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (absolute when ref is all zeros)."""
    if ref.numel() == 0:
        return 0.0
    diff = (x.double() - ref.double()).abs().max().item()
    return diff / max(ref.double().abs().max().item(), 1e-30) if ref.abs().max() > 0 else diff


def errors(out: dict, ref: dict) -> dict:
    return {k: rel_err(out[k], ref[k]) for k in ref}


def norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (Frobenius): the error of a whole tensor, insensitive to one unlucky rounding."""
    if ref.numel() == 0:
        return 0.0
    d = (x.double() - ref.double()).norm().item()
    r = ref.double().norm().item()
    return d / r if r > 0 else d


def norm_errors(out: dict, ref: dict) -> dict:
    return {k: norm_err(out[k], ref[k]) for k in ref}
