"""What is benchmarked: a case builds the inputs, turns a provider's log-probs function into the timed call, defines
its bare-GEMM floor and FLOP count, and checks outputs against the float64 reference.

Cases:
    fwd         log-probs only, under ``torch.no_grad`` (a reference model's or a rollout's log-probs): 1 head GEMM.
    fwd_bwd     log-probs and entropy, forward and backward, upstream gradients on both (a policy-gradient step with
                an entropy term): 3 head GEMMs (logits, dh, dW).
    loss_gspo   an RL policy loss end to end, forward and backward to hidden and weight, on a padded batch of
    loss_cispo  ``B`` sequences x ``T`` tokens (the first quarter of each is prompt, masked out): GSPO, CISPO and
    loss_apo    APO (``rlcore.policy_loss``'s presets), which reach the log-probs per sequence, per token and through
                a squared regression. 3 head GEMMs (logits, dh, dW) over all ``N = B T`` rows.
    distill     on-policy distillation: the mean reverse KL between a student and a teacher head, forward and
                backward to the student (``rlcore.linear_divergence``); 4 head GEMMs. Only with ``--only distill``.

All log-prob math comes from ``rlcore.reference`` (ground truth, eager baseline) or from the provider under test; all
loss math from ``rlcore.policy_loss`` (the reference composition, in float64 for the ground truth) or from the
provider's ``rlcore.fused_policy_loss``.

Error columns:
    fwd, fwd_bwd  ``err_logp``, ``err_entropy``, ``err_dh``: max abs error on the first ``SAMPLE_ROWS`` rows.
    loss_*        ``err_loss``: abs error of the scalar loss against the float64 loss of the whole batch;
                  ``err_dh``: max abs error of ``dh`` on the first ``SAMPLE_ROWS`` loss rows (prompt rows, where every
                  provider's ``dh`` is 0, are not sampled). ``err_logp`` and ``err_entropy`` are empty: a loss
                  provider returns the loss, not per-token log-probs. The float64 truth is exact for the whole batch:
                  ``rlcore.reference`` in float64 gives every row's log-prob (in blocks of rows, no ``[N, V]``
                  buffer), ``rlcore.policy_loss`` in float64 gives the loss and its gradient ``g`` w.r.t. each
                  log-prob, and a sampled row's ``dh`` is ``g`` times that row's log-prob gradient (a row's log-prob
                  depends on that row and the weight alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

import rlcore
from rlcore.losses import LOSSES
from rlcore.reference import linear_logprobs_reference

from .shapes import Shape

__all__ = ["Inputs", "Outputs", "LogprobsFn", "LossFn", "DivergenceFn", "Case", "PolicyLoss", "CASES", "SAMPLE_ROWS",
           "FLOP_CONVENTION", "loss_layout"]

# Rows checked against the float64 reference: the reference is computed on these rows only, so it stays cheap at
# any N (each row's log-prob, entropy and dh depend on that row and the weight alone).
SAMPLE_ROWS = 256

# Standard deviation of the logits the random inputs produce. Error figures depend on it; ~2 is in the range of
# trained LM heads' logits, where the bf16 rounding of the materialised logits is visible.
LOGIT_STD = 2.0

FLOP_CONVENTION = (
    "TFLOP/s = gemms * 2*N*H*V / median time, counting only the head GEMMs the case needs "
    "(fwd: 1, the logits; fwd_bwd and loss_*: 3, the logits, dh and dW, over all N rows, prompt rows included). "
    "Extra work a provider does (rlcore's recomputed logits in backward, softmax and exp) is not counted, and work it "
    "skips (rlcore's fused loss drops the prompt rows, a quarter of N, before any GEMM) is not deducted, so every "
    "provider is credited with the same work and a provider that skips rows can beat the floor."
)

# The loss cases' padded batches: sequences of LOSS_SEQ_LEN tokens, at least MIN_LOSS_SEQS of them.
# - 1024 tokens is a short RL completion, and at V = 32000 one sequence's 768 loss tokens fit the single-pass fused
#   loss's default slice (rlcore.fused.CHUNK_BUDGET = 2^25 logits: 1048 rows of 32000), so rlcore-1pass runs with the
#   default budget on the CPU head.
# - At least 4 sequences, so that GSPO's per-sequence ratio, APO's per-sequence regression and the batch-wide
#   denominators always see several sequences (small N gets shorter sequences instead: N = 1024 is 4 x 256).
# N = B * T exactly: when N is not a multiple of that T, T is the largest divisor of N below it.
LOSS_SEQ_LEN = 1024
MIN_LOSS_SEQS = 4
# Standard deviation of the noise between the float64 log-probs and the old / reference log-probs the loss cases are
# given: token ratios exp(l - l_old) of about 1 +- 0.1. It exercises the ratios; the clipped fractions it gives are not
# meant to be realistic (most sequences' mean ratio falls outside GSPO's tight 3e-4/4e-4 band, and the clip binds
# where the advantage's sign matches, ~1/4 of them at N = 2048; CISPO's 1.28 bound clips ~1% of the tokens).
LOGP_NOISE = 0.1

# (hidden [N, H], weight [V, H], targets [N], return_entropy) -> logp [N], or (logp [N], entropy [N])
LogprobsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool],
                      Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]

# (hidden [B, T, H], weight [V, H], targets [B, T], advantages [B] | None, mask [B, T], loss_kwargs) -> loss (0-d);
# loss_kwargs are rlcore.policy_loss's keywords (loss_type, old_logp, ...)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, dict],
                  torch.Tensor]


# (hidden [N, H], weight [V, H], teacher_hidden [N, H], teacher_weight [V, H]) -> the mean over positions of
# KL(p_S || p_T) (0-d), differentiable in the student's hidden and weight
DivergenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Inputs:
    hidden: torch.Tensor                          # [N, H] ([B, T, H] in loss_*), requires grad in fwd_bwd and loss_*
    weight: torch.Tensor                          # [V, H], requires grad in fwd_bwd and loss_*
    targets: torch.Tensor                         # [N] ([B, T] in loss_*) int64
    grad_logp: Optional[torch.Tensor] = None      # [N] fp32, upstream gradient of logp (fwd_bwd)
    grad_entropy: Optional[torch.Tensor] = None   # [N] fp32, upstream gradient of the entropy (fwd_bwd)
    # loss_* only
    advantages: Optional[torch.Tensor] = None     # [B] fp32 (None for the regression losses)
    mask: Optional[torch.Tensor] = None           # [B, T] bool: False on the prompt
    loss_kwargs: Optional[dict] = None            # rlcore.policy_loss keywords: loss_type, old_logp [B, T], ...
    logp64: Optional[torch.Tensor] = None         # [N] float64 log-prob of every row (for the ground truth)
    teacher: Optional[tuple] = None               # distill: (teacher hidden [N, H], teacher weight [V, H])


@dataclass
class Outputs:
    logp: Optional[torch.Tensor] = None           # [N]
    entropy: Optional[torch.Tensor] = None        # [N]
    dh: Optional[torch.Tensor] = None             # [N, H] (or [B, T, H])
    loss: Optional[torch.Tensor] = None           # 0-d (loss_*)
    rows: Optional[torch.Tensor] = None           # ground truth only: the flat row indices ``dh`` was computed on


def _max_abs_err(x: Optional[torch.Tensor], truth: Optional[torch.Tensor]) -> Optional[float]:
    if x is None or truth is None:
        return None
    return (x[: truth.shape[0]].double() - truth).abs().max().item()


def _random_head(shape: Shape, N: int, g: torch.Generator):
    """``hidden [N, H]``, ``weight [V, H]`` (logits of standard deviation ``LOGIT_STD``), uniform ``targets [N]``."""
    hidden = torch.randn(N, shape.H, generator=g)                                       # [N, H]
    weight = torch.randn(shape.V, shape.H, generator=g) * (LOGIT_STD / shape.H ** 0.5)  # [V, H]
    targets = torch.randint(0, shape.V, (N,), generator=g)                              # [N]
    return hidden, weight, targets


def _three_gemms(h: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    """The bare GEMMs of a forward and backward through the head: logits, dh, dW."""
    def gemms():
        with torch.no_grad():
            z = torch.matmul(h, w.T)          # [N, V] logits
            torch.matmul(z, w)                # [N, H] dh  (z stands in for d logits: same shape and dtype)
            torch.matmul(z.T, h)              # [V, H] dW
    return gemms


class Case:
    """One benchmarked computation. Subclasses set ``name``, ``gemms``, ``needs_grad`` and ``_run``.

    ``is_loss``: the timed call takes a ``LossFn`` (a provider's ``loss_fn``) instead of a ``LogprobsFn``."""

    name: str
    gemms: int             # head GEMMs of 2*N*H*V FLOPs the computation needs (the FLOP convention)
    needs_grad: bool
    description: str
    is_loss = False
    is_divergence = False  # the timed call takes a DivergenceFn (a provider's divergence_fn)
    in_default_run = True  # run when --only is not given

    def flops(self, shape: Shape, N: int) -> int:
        return self.gemms * 2 * N * shape.H * shape.V

    def err_rows(self, N: int) -> int:
        """How many rows the error columns are measured on."""
        return min(SAMPLE_ROWS, N)

    def make_inputs(self, shape: Shape, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
        """Random inputs whose logits have standard deviation ``LOGIT_STD``; uniform targets."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden, weight, targets = _random_head(shape, N, g)
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
        return _three_gemms(inp.hidden.detach(), inp.weight.detach())

    def ground_truth(self, inp, rows=SAMPLE_ROWS):
        h = inp.hidden[:rows].detach().double().requires_grad_(True)                          # [S, H]
        logp, ent = linear_logprobs_reference(h, inp.weight.detach(), inp.targets[:rows], return_entropy=True,
                                              compute_dtype=torch.float64)                    # [S], [S]
        (dh,) = torch.autograd.grad((logp, ent), (h,),
                                    (inp.grad_logp[:rows].double(), inp.grad_entropy[:rows].double()))
        return Outputs(logp=logp.detach(), entropy=ent.detach(), dh=dh)


def loss_layout(N: int) -> tuple[int, int, int]:
    """``(B, T, P)`` of the loss cases' padded batch of ``N`` tokens: ``B`` sequences of ``T`` tokens, the first ``P``
    of each prompt (see ``LOSS_SEQ_LEN``)."""
    T = max(1, min(LOSS_SEQ_LEN, N // MIN_LOSS_SEQS))
    while N % T:
        T -= 1
    return N // T, T, T // 4


def _logp64(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float64 log-probs of every row (``rlcore.reference``), in blocks of rows of at most 2^25 logits, so no
    ``[N, V]`` buffer exists. ``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` -> ``[N]`` float64."""
    w = weight.detach().double()                                      # [V, H], cast once
    step = max(1, 2**25 // w.shape[0])
    with torch.no_grad():
        return torch.cat([linear_logprobs_reference(hidden[s:s + step].detach().double(), w, targets[s:s + step],
                                                    compute_dtype=torch.float64)
                          for s in range(0, hidden.shape[0], step)])


class PolicyLoss(Case):
    """``rlcore.policy_loss(loss_type=...)`` on the head's log-probs, forward and backward to hidden and weight.

    Inputs: ``hidden [B, T, H]``, ``targets`` and ``mask [B, T]`` (``loss_layout``: prompt = the first quarter of each
    sequence, masked out; the rest are loss tokens, no padding), ``advantages [B] ~ N(0, 1)``; the old (``gspo``,
    ``cispo``) or reference (``apo``) log-probs are the float64 log-probs plus ``N(0, LOGP_NOISE)`` noise, in FP32;
    ``apo`` gets 0/1 rewards ``[B]`` and a baseline of 0.5 ``[B]``. The timed call is the provider's loss and
    ``torch.autograd.grad`` of it w.r.t. ``hidden`` and ``weight``.
    """

    gemms = 3
    needs_grad = True
    is_loss = True

    def __init__(self, loss_type: str):
        self.loss_type = loss_type
        self.name = f"loss_{loss_type}"
        self.description = f"rlcore.policy_loss(loss_type={loss_type!r}), forward and backward to hidden and weight"

    def err_rows(self, N):
        B, T, P = loss_layout(N)
        return min(SAMPLE_ROWS, B * (T - P))

    def make_inputs(self, shape, N, dtype, device, seed=0):
        B, T, P = loss_layout(N)
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden, weight, targets = _random_head(shape, N, g)           # the same draws as fwd_bwd at this N
        hidden = hidden.to(device=device, dtype=dtype)                # [N, H]
        weight = weight.to(device=device, dtype=dtype)                # [V, H]
        targets = targets.to(device)                                  # [N]
        logp64 = _logp64(hidden, weight, targets)                     # [N], of the inputs as rounded to dtype
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, :P] = False                                           # [B, T] the prompt
        advantages = torch.randn(B, generator=g)                      # [B]
        anchor = logp64.cpu().view(B, T) + LOGP_NOISE * torch.randn(B, T, generator=g, dtype=torch.float64)
        spec = LOSSES[self.loss_type]
        kwargs: dict = {"loss_type": self.loss_type, (spec.anchor or "old_logp"): anchor.float().to(device)}
        if spec.family == "regression":
            kwargs["rewards"] = torch.randint(0, 2, (B,), generator=g).float().to(device)
            kwargs["baseline"] = torch.full((B,), 0.5, device=device)
            advantages = None
        return Inputs(
            hidden=hidden.view(B, T, shape.H).requires_grad_(True), weight=weight.requires_grad_(True),
            targets=targets.view(B, T), advantages=None if advantages is None else advantages.to(device),
            mask=mask.to(device), loss_kwargs=kwargs, logp64=logp64,
        )

    def _run(self, fn, inp):
        loss = fn(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, inp.loss_kwargs)
        dh, _dw = torch.autograd.grad(loss, (inp.hidden, inp.weight))                      # [B, T, H], [V, H]
        return Outputs(loss=loss.detach(), dh=dh)

    def floor(self, inp):
        return _three_gemms(inp.hidden.detach().reshape(-1, inp.hidden.shape[-1]), inp.weight.detach())

    def ground_truth(self, inp, rows=SAMPLE_ROWS):
        """The float64 loss of the whole batch, and ``dh`` on its first ``rows`` loss rows (see the module
        docstring)."""
        B, T = inp.targets.shape
        H = inp.hidden.shape[-1]
        lp = inp.logp64.view(B, T).clone().requires_grad_(True)                             # [B, T] float64
        kw = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inp.loss_kwargs.items()}
        adv = None if inp.advantages is None else inp.advantages.double()
        loss = rlcore.policy_loss(lp, adv, inp.mask, **kw).loss
        (g_lp,) = torch.autograd.grad(loss, (lp,))                                        # [B, T] d loss / d logp
        sel = inp.mask.reshape(-1).nonzero().squeeze(1)[:rows]                              # [S] loss rows
        h = inp.hidden.detach().reshape(-1, H).index_select(0, sel).double().requires_grad_(True)   # [S, H]
        logp = linear_logprobs_reference(h, inp.weight.detach(), inp.targets.reshape(-1).index_select(0, sel),
                                         compute_dtype=torch.float64)                       # [S]
        (dh,) = torch.autograd.grad(logp, (h,), (g_lp.reshape(-1).index_select(0, sel),))  # [S, H]
        return Outputs(loss=loss.detach(), dh=dh, rows=sel)

    def errors(self, out, truth):
        dh = out.dh.reshape(-1, out.dh.shape[-1]).index_select(0, truth.rows)              # [S, H]
        return {
            "err_loss": (out.loss.double() - truth.loss).abs().item(),
            "err_dh": (dh.double() - truth.dh).abs().max().item() if truth.rows.numel() else None,
        }


class Distill(Case):
    """On-policy distillation: the mean over positions of the reverse KL ``KL(p_S || p_T)`` between a student head and
    a teacher head (same ``H`` and ``V``, independent random weights), forward and backward to the student's hidden
    states and head (the teacher is detached). 4 head GEMMs: both heads' logits, the student's dh and dW.

    Not in the default run (``python -m bench --only distill``): the materialised reference holds several ``[N, V]``
    tensors per head. Error columns: ``err_loss`` (the scalar mean KL against float64 over the whole batch) and
    ``err_dh`` (the first ``SAMPLE_ROWS`` rows; a row's KL depends on that row and the two heads alone)."""

    name = "distill"
    gemms = 4
    needs_grad = True
    is_divergence = True
    in_default_run = False
    description = "mean reverse KL(student || teacher) of two heads, forward and backward to the student"

    def make_inputs(self, shape, N, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden, weight, targets = _random_head(shape, N, g)
        t_hidden, t_weight, _ = _random_head(shape, N, g)
        inp = Inputs(hidden=hidden.to(device=device, dtype=dtype).requires_grad_(True),
                     weight=weight.to(device=device, dtype=dtype).requires_grad_(True), targets=targets.to(device))
        inp.teacher = (t_hidden.to(device=device, dtype=dtype), t_weight.to(device=device, dtype=dtype))
        return inp

    def _run(self, fn, inp):
        loss = fn(inp.hidden, inp.weight, *inp.teacher)                                   # 0-d
        dh, _dw = torch.autograd.grad(loss, (inp.hidden, inp.weight))                     # [N, H], [V, H]
        return Outputs(loss=loss.detach(), dh=dh)

    def floor(self, inp):
        h, w = inp.hidden.detach(), inp.weight.detach()
        ht, wt = inp.teacher
        gemms = _three_gemms(h, w)

        def four():
            with torch.no_grad():
                torch.matmul(ht, wt.T)        # [N, V] the teacher's logits
            gemms()
        return four

    def ground_truth(self, inp, rows=SAMPLE_ROWS):
        from rlcore.divergence import linear_divergence_reference

        h, w = inp.hidden.detach().double(), inp.weight.detach().double()
        ht, wt = (x.double() for x in inp.teacher)
        N = h.shape[0]
        step = max(1, 2**24 // w.shape[0])                                                 # no [N, V] float64 buffer
        with torch.no_grad():
            total = sum(linear_divergence_reference(h[s:s + step], w, ht[s:s + step], wt).sum()
                        for s in range(0, N, step))
        hs = h[:rows].clone().requires_grad_(True)
        div = linear_divergence_reference(hs, w, ht[:rows], wt)                            # [S]
        (dh,) = torch.autograd.grad(div.sum() / N, (hs,))
        return Outputs(loss=total / N, dh=dh)

    def errors(self, out, truth):
        return {"err_loss": (out.loss.double() - truth.loss).abs().item(),
                "err_dh": _max_abs_err(out.dh, truth.dh)}


LOSS_TYPES = ("gspo", "cispo", "apo")

CASES: dict[str, Case] = {c.name: c for c in (Forward(), ForwardBackward(),
                                                *(PolicyLoss(t) for t in LOSS_TYPES), Distill())}
