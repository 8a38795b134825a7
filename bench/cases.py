"""What is benchmarked: a case builds the inputs, turns a provider's log-probs function into the timed call, defines
its bare-GEMM floor and FLOP count, and checks outputs against the float64 reference.

Cases:
    fwd      log-probs only, under ``torch.no_grad`` (a reference model's or a rollout's log-probs): 1 head GEMM.
    fwd_bwd  log-probs and entropy, forward and backward, upstream gradients on both (a policy-gradient step with an
             entropy term): 3 head GEMMs (logits, dh, dW).

All loss math comes from ``rlcore.reference`` (ground truth, eager baseline) or from the provider under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from rlcore.reference import linear_logprobs_reference

from .shapes import Shape

__all__ = ["Inputs", "Outputs", "LogprobsFn", "Case", "CASES", "SAMPLE_ROWS", "FLOP_CONVENTION"]

# Rows checked against the float64 reference: the reference is computed on these rows only, so it stays cheap at
# any N (each row's log-prob, entropy and dh depend on that row and the weight alone).
SAMPLE_ROWS = 256

# Standard deviation of the logits the random inputs produce. Error figures depend on it; ~2 is in the range of
# trained LM heads' logits, where the bf16 rounding of the materialised logits is visible.
LOGIT_STD = 2.0

FLOP_CONVENTION = (
    "TFLOP/s = gemms * 2*N*H*V / median time, counting only the head GEMMs the case needs "
    "(fwd: 1, the logits; fwd_bwd: 3, the logits, dh and dW). Extra work a provider does (rlcore's recomputed logits "
    "in backward, softmax and exp) is not counted, so every provider is credited with the same work."
)

# (hidden [N, H], weight [V, H], targets [N], return_entropy) -> logp [N], or (logp [N], entropy [N])
LogprobsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool],
                      Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Inputs:
    hidden: torch.Tensor                          # [N, H], requires grad in fwd_bwd
    weight: torch.Tensor                          # [V, H], requires grad in fwd_bwd
    targets: torch.Tensor                         # [N] int64
    grad_logp: Optional[torch.Tensor] = None      # [N] fp32, upstream gradient of logp (fwd_bwd)
    grad_entropy: Optional[torch.Tensor] = None   # [N] fp32, upstream gradient of the entropy (fwd_bwd)


@dataclass
class Outputs:
    logp: torch.Tensor                            # [N]
    entropy: Optional[torch.Tensor] = None        # [N]
    dh: Optional[torch.Tensor] = None             # [N, H]


def _max_abs_err(x: Optional[torch.Tensor], truth: Optional[torch.Tensor]) -> Optional[float]:
    if x is None or truth is None:
        return None
    return (x[: truth.shape[0]].double() - truth).abs().max().item()


class Case:
    """One benchmarked computation. Subclasses set ``name``, ``gemms``, ``needs_grad`` and ``_run``."""

    name: str
    gemms: int             # head GEMMs of 2*N*H*V FLOPs the computation needs (the FLOP convention)
    needs_grad: bool
    description: str

    def flops(self, shape: Shape, N: int) -> int:
        return self.gemms * 2 * N * shape.H * shape.V

    def make_inputs(self, shape: Shape, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
        """Random inputs whose logits have standard deviation ``LOGIT_STD``; uniform targets."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden = torch.randn(N, shape.H, generator=g)                                       # [N, H]
        weight = torch.randn(shape.V, shape.H, generator=g) * (LOGIT_STD / shape.H ** 0.5)  # [V, H]
        targets = torch.randint(0, shape.V, (N,), generator=g)                              # [N]
        inp = Inputs(
            hidden=hidden.to(device=device, dtype=dtype).requires_grad_(self.needs_grad),
            weight=weight.to(device=device, dtype=dtype).requires_grad_(self.needs_grad),
            targets=targets.to(device),
        )
        if self.needs_grad:
            inp.grad_logp = torch.randn(N, generator=g).to(device)                          # [N]
            inp.grad_entropy = torch.randn(N, generator=g).to(device)                       # [N]
        return inp

    def call(self, fn: LogprobsFn, inp: Inputs) -> Callable[[], Outputs]:
        """The timed call of a provider's log-probs function."""
        return lambda: self._run(fn, inp)

    def _run(self, fn: LogprobsFn, inp: Inputs) -> Outputs:
        raise NotImplementedError

    def floor(self, inp: Inputs) -> Callable[[], None]:
        """The bare ``torch.matmul`` GEMMs of this case, same shapes and dtype, no softmax."""
        raise NotImplementedError

    def ground_truth(self, inp: Inputs, rows: int = SAMPLE_ROWS) -> Outputs:
        """``rlcore.reference`` in float64 on the first ``rows`` rows."""
        raise NotImplementedError

    def errors(self, out: Outputs, truth: Outputs) -> dict:
        """Max abs error of each output against the ground truth (``None`` where the case has no such output)."""
        return {
            "err_logp": _max_abs_err(out.logp, truth.logp),
            "err_entropy": _max_abs_err(out.entropy, truth.entropy),
            "err_dh": _max_abs_err(out.dh, truth.dh),
        }


class Forward(Case):
    name = "fwd"
    gemms = 1
    needs_grad = False
    description = "log-probs, forward only (no_grad)"

    def _run(self, fn, inp):
        with torch.no_grad():
            return Outputs(logp=fn(inp.hidden, inp.weight, inp.targets, False))

    def floor(self, inp):
        def gemm():
            with torch.no_grad():
                torch.matmul(inp.hidden, inp.weight.T)                   # [N, V]
        return gemm

    def ground_truth(self, inp, rows=SAMPLE_ROWS):
        with torch.no_grad():
            logp = linear_logprobs_reference(inp.hidden[:rows], inp.weight, inp.targets[:rows],
                                             compute_dtype=torch.float64)
        return Outputs(logp=logp)


class ForwardBackward(Case):
    name = "fwd_bwd"
    gemms = 3
    needs_grad = True
    description = "log-probs + entropy, forward and backward to hidden and weight"

    def _run(self, fn, inp):
        logp, ent = fn(inp.hidden, inp.weight, inp.targets, True)                             # [N], [N]
        dh, _dw = torch.autograd.grad((logp, ent), (inp.hidden, inp.weight),
                                      (inp.grad_logp, inp.grad_entropy))                      # [N, H], [V, H]
        return Outputs(logp=logp.detach(), entropy=ent.detach(), dh=dh)

    def floor(self, inp):
        h, w = inp.hidden.detach(), inp.weight.detach()

        def gemms():
            with torch.no_grad():
                z = torch.matmul(h, w.T)          # [N, V] logits
                torch.matmul(z, w)                # [N, H] dh  (z stands in for d logits: same shape and dtype)
                torch.matmul(z.T, h)              # [V, H] dW
        return gemms

    def ground_truth(self, inp, rows=SAMPLE_ROWS):
        h = inp.hidden[:rows].detach().double().requires_grad_(True)                          # [S, H]
        logp, ent = linear_logprobs_reference(h, inp.weight.detach(), inp.targets[:rows], return_entropy=True,
                                              compute_dtype=torch.float64)                    # [S], [S]
        (dh,) = torch.autograd.grad((logp, ent), (h,),
                                    (inp.grad_logp[:rows].double(), inp.grad_entropy[:rows].double()))
        return Outputs(logp=logp.detach(), entropy=ent.detach(), dh=dh)


CASES: dict[str, Case] = {c.name: c for c in (Forward(), ForwardBackward())}
