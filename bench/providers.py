"""Who computes a case. Each provider either builds the timed call or says why it cannot run here.

    gemm-floor     the case's bare ``torch.matmul`` GEMMs, no softmax: the time every fused figure is divided by
    reference      ``rlcore.reference`` eagerly, in the input dtype: materialised ``[N, V]`` logits, what trainers do
                   (loss cases: then ``rlcore.policy_loss`` on the ``[B, T]`` log-probs)
    compile        the same reference (and loss) under ``torch.compile`` (Inductor fuses the softmax, still
                   materialises)
    rlcore-torch   ``rlcore.linear_logprobs(backend="torch")``: the chunked PyTorch path; loss cases:
                   ``rlcore.fused_policy_loss(strategy="two_pass", backend="torch")``, that same path composed with
                   ``policy_loss``, after dropping the rows no loss term reads (the prompt)
    rlcore-1pass   loss cases only: ``rlcore.fused_policy_loss(strategy="single_pass", backend="torch")``, one pass
                   over slices of whole sequences (3 GEMMs instead of 4), the slice budget widened past the default
                   when one sequence's loss tokens x V would not fit it
    rlcore-cpp     ``rlcore.linear_logprobs(backend="cpp")``: the compiled CPU backend (``csrc/``; CPU only, built on
                   first use); loss cases: ``rlcore.fused_policy_loss(strategy="two_pass", backend="cpp")``
    rlcore-triton  ``rlcore.linear_logprobs(backend="triton")``: the fused kernels (CUDA only); loss cases:
                   ``rlcore.fused_policy_loss(strategy="two_pass", backend="triton")``
    rlcore-triton-fp32  the same with ``precision="fp32"``: the FP32 head (the trainer/inference mismatch fix), which
                   matters for bf16 inputs

Peers, each skipped with the reason when its package is not installed (none is a dependency of rlcore):
    liger-flce     Liger-Kernel's fused linear cross-entropy (Triton, CUDA only), ``reduction="none"``, log-prob =
                   minus the per-token loss; no entropy output, so not in ``fwd_bwd``; loss cases: its log-probs
                   composed with ``rlcore.policy_loss``
    liger-grpo     Liger-Kernel's chunked fused-linear GRPO loss (``LigerFusedLinearGRPOLoss``, pure PyTorch under
                   ``torch.compile``, so it runs on CPU too) configured to compute the same loss as rlcore's preset:
                   ``loss_gspo`` (sequence-level ratio, GSPO's clip range) and ``loss_cispo``; it has no A*PO loss
    cce            Apple's Cut Cross-Entropy ``linear_cross_entropy(reduction="none")`` (Triton, CUDA only), with its
                   default gradient filtering; no entropy, so not in ``fwd_bwd``; loss cases: composed like liger-flce
    liger-jsd      distill only: Liger-Kernel's chunked fused-linear JSD loss with beta=1 (its reverse KL)
    trl-divergence distill only: TRL 1.16's chunked divergence (``ChunkedDivergenceFunction``) with beta=1 (its
                   reverse KL); ``tests/test_loss_peers.py`` checks it equals ``rlcore.linear_divergence``

The distill case (two heads) runs gemm-floor, reference, compile, rlcore-torch, rlcore-cpp and rlcore-triton
(``rlcore.linear_divergence``), liger-jsd and trl-divergence; the other providers say why not.

New providers (peers such as Liger or Cut Cross-Entropy) subclass ``LogprobsProvider`` and join ``PROVIDERS``. A
``LogprobsProvider`` runs the loss cases as its log-probs composed with ``rlcore.policy_loss`` unless it overrides
``loss_fn``; a provider that applies to some cases only says why in ``not_for``.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import rlcore
from rlcore.fused import CHUNK_BUDGET
from rlcore.losses import LOSSES
from rlcore.reference import linear_logprobs_reference

from .cases import Case, DivergenceFn, Inputs, LogprobsFn, LossFn, loss_layout
from .shapes import Shape

__all__ = ["Context", "Provider", "LogprobsProvider", "PROVIDERS"]


@dataclass(frozen=True)
class Context:
    device: torch.device
    quick: bool


def _available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on the device (CUDA), or the kernel's MemAvailable (CPU); ``None`` when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class Provider:
    """Base class. ``logits_copies``: how many ``[N, V]`` FP32-sized buffers the provider holds at its peak, per
    case (an over-estimate, used only to skip a run that would not fit instead of being killed by the OOM killer)."""

    name: str
    compiles = False                 # its first call compiles: one untimed call before measuring
    has_outputs = True               # its outputs are checked against the float64 reference
    logits_copies: dict[str, float] = {}

    def unavailable(self, ctx: Context) -> Optional[str]:
        """Why this provider cannot run on this machine at all, or ``None``."""
        return None

    def not_for(self, case: Case) -> Optional[str]:
        """Why this provider does not compute ``case``, or ``None``."""
        return None

    def wont_fit(self, ctx: Context, case: Case, shape: Shape, N: int) -> Optional[str]:
        """Why this provider would not fit in memory at this size, or ``None``."""
        copies = self.logits_copies.get(case.name, 0.0)
        free = _available_bytes(ctx.device)
        need = copies * N * shape.V * 4
        if copies and free is not None and need > 0.85 * free:
            return f"needs ~{_gib(need)} for materialised [N, V] logits, {_gib(free)} free"
        return None

    def build(self, case: Case, inp: Inputs) -> Callable[[], object]:
        raise NotImplementedError


def _compose(logprobs_fn: LogprobsFn) -> LossFn:
    """A loss from a log-probs function: the log-probs of every row, then ``rlcore.policy_loss``."""
    def loss_fn(hidden, weight, targets, advantages, mask, kwargs):
        logp = logprobs_fn(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), False)   # [N]
        return rlcore.policy_loss(logp.view(targets.shape), advantages, mask, **kwargs).loss
    return loss_fn


def _fused(**options) -> LossFn:
    """``rlcore.fused_policy_loss`` with ``options`` (strategy, backend, chunk_budget)."""
    def loss_fn(hidden, weight, targets, advantages, mask, kwargs):
        return rlcore.fused_policy_loss(hidden, weight, targets, advantages, mask, **options, **kwargs).loss
    return loss_fn


class LogprobsProvider(Provider):
    """A provider given by a log-probs function; the case turns it into the timed call."""

    def logprobs_fn(self) -> LogprobsFn:
        raise NotImplementedError

    def loss_fn(self, case: Case, inp: Inputs) -> LossFn:
        """The loss of the ``loss_*`` cases: by default, this provider's log-probs then ``rlcore.policy_loss``."""
        return _compose(self.logprobs_fn())

    def divergence_fn(self) -> Optional[DivergenceFn]:
        """The ``distill`` case's mean reverse KL, or ``None`` where this provider has none (``not_for`` says why)."""
        return None

    def not_for(self, case):
        if case.is_divergence and type(self).divergence_fn is LogprobsProvider.divergence_fn:
            return f"{self.name} computes no divergence between two heads"
        return None

    def build(self, case, inp):
        if case.is_divergence:
            return case.call(self.divergence_fn(), inp)
        return case.call(self.loss_fn(case, inp) if case.is_loss else self.logprobs_fn(), inp)


# Every loss case's name, for the logits_copies tables.
_LOSS_CASES = ("loss_gspo", "loss_cispo", "loss_apo")


class GemmFloor(Provider):
    name = "gemm-floor"
    has_outputs = False
    # the [N, V] GEMM output (half-size in bf16, counted at 4 bytes)
    logits_copies = {"fwd": 1.0, "fwd_bwd": 1.1, **{c: 1.1 for c in _LOSS_CASES}, "distill": 2.1}

    def build(self, case, inp):
        return case.floor(inp)


def _eager_reference(hidden, weight, targets, return_entropy):
    """The materialised baseline: logits in the input dtype, FP32 log-softmax, gather (``rlcore.reference``)."""
    return linear_logprobs_reference(hidden, weight, targets, return_entropy=return_entropy, compute_dtype=None)


def _eager_divergence(hs, ws, ht, wt):
    """The materialised baseline of ``distill``: both heads' logits in the input dtype, FP32 log-softmax."""
    from rlcore.divergence import linear_divergence_reference

    return linear_divergence_reference(hs, ws, ht, wt, compute_dtype=None).mean()


class Reference(LogprobsProvider):
    name = "reference"
    # Measured on CPU in fp32 (cpu-small, N = 8192): fwd 2.0 (logits, log-softmax), fwd_bwd 5.0 (saved log-softmax,
    # exp, product, gradients); loss_* 3.0 (N = 2048: no entropy); a margin on top for bf16's extra FP32 copy of the
    # logits. distill: two heads' logits, log-softmax, p and the product, then their gradients (an estimate).
    logits_copies = {"fwd": 3.0, "fwd_bwd": 6.0, **{c: 4.0 for c in _LOSS_CASES}, "distill": 10.0}

    def logprobs_fn(self):
        return _eager_reference

    def divergence_fn(self):
        return _eager_divergence


class Compiled(LogprobsProvider):
    name = "compile"
    compiles = True
    # Inductor fuses the softmax chain: measured on CPU in fp32 (tiny) at 0.5x (fwd) and 0.6x (fwd_bwd) the eager peak.
    logits_copies = {"fwd": 1.5, "fwd_bwd": 4.0, **{c: 4.0 for c in _LOSS_CASES}, "distill": 8.0}

    def unavailable(self, ctx):
        if ctx.device.type == "cpu":
            if ctx.quick:
                return "slow to compile on CPU (~20 s per shape and case); run without --quick"
            if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
                return "Inductor's CPU backend needs a C++ compiler, none on PATH"
        return None

    def logprobs_fn(self):
        torch._dynamo.reset()    # a fresh compile per (case, shape, N, dtype): no recompile-limit surprises
        return torch.compile(_eager_reference, dynamic=False)

    def loss_fn(self, case, inp):
        torch._dynamo.reset()
        return torch.compile(_compose(_eager_reference), dynamic=False)    # the whole composition, loss included

    def divergence_fn(self):
        torch._dynamo.reset()
        return torch.compile(_eager_divergence, dynamic=False)


class _Rlcore(LogprobsProvider):
    """``rlcore.linear_logprobs`` on one backend (and head precision); in the loss cases, the two-pass
    ``rlcore.fused_policy_loss`` on the same."""

    options: dict = {}       # backend=..., precision=...

    def logprobs_fn(self):
        return lambda h, w, t, ent: rlcore.linear_logprobs(h, w, t, return_entropy=ent, **self.options)

    def loss_fn(self, case, inp):
        return _fused(strategy="two_pass", **self.options)

    def not_for(self, case):
        if case.is_divergence and set(self.options) != {"backend"}:
            return "rlcore.linear_divergence takes no precision option"
        return None

    def divergence_fn(self):
        backend = self.options["backend"]
        return lambda hs, ws, ht, wt: rlcore.linear_divergence(hs, ws, ht, wt, reduction="mean", backend=backend)


class RlcoreTorch(_Rlcore):
    name = "rlcore-torch"
    options = {"backend": "torch"}


class Rlcore1Pass(Provider):
    name = "rlcore-1pass"

    def not_for(self, case):
        if not case.is_loss:
            return "single_pass is a strategy of rlcore.fused_policy_loss: runs in the loss_* cases only"
        return None

    @staticmethod
    def chunk_budget(V: int, N: int) -> int:
        """The default slice budget, or one sequence's loss tokens x V where that is larger."""
        _B, T, P = loss_layout(N)
        return max(CHUNK_BUDGET, (T - P) * V)

    def wont_fit(self, ctx, case, shape, N):
        # A slice's [C, V] FP32 logits, reused in place for log p and dz, plus p: about 2 slices' worth, counted as 3.
        free = _available_bytes(ctx.device)
        need = 3 * self.chunk_budget(shape.V, N) * 4
        if free is not None and need > 0.85 * free:
            return f"needs ~{_gib(need)} for one slice of whole sequences' [C, V] logits, {_gib(free)} free"
        return None

    def build(self, case, inp):
        N, V = inp.targets.numel(), inp.weight.shape[0]
        return case.call(_fused(strategy="single_pass", backend="torch", chunk_budget=self.chunk_budget(V, N)), inp)


class RlcoreCpp(_Rlcore):
    name = "rlcore-cpp"
    options = {"backend": "cpp"}

    def unavailable(self, ctx):
        if ctx.device.type != "cpu":
            return "the compiled backend runs on CPU tensors"
        import rlcore.cpp

        if not rlcore.cpp.available():    # builds it on first use: before timing, never inside a timed call
            return f"the compiled CPU backend is unavailable: {rlcore.cpp.unavailable_reason()}"
        return None


class RlcoreTriton(_Rlcore):
    name = "rlcore-triton"
    options = {"backend": "triton"}

    def unavailable(self, ctx):
        if ctx.device.type != "cuda":
            return "needs CUDA (Triton's CPU interpreter is for tests, never timed)"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton not importable: {e}"
        return None


class RlcoreTritonFP32(RlcoreTriton):
    name = "rlcore-triton-fp32"
    options = {"backend": "triton", "precision": "fp32"}


def _missing(module: str, package: str) -> Optional[str]:
    """Why ``module`` cannot be imported (``package`` is what to pip install), or ``None``."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{package} is not installed ({type(e).__name__}: {e})"[:200]
    return None


def _first(out):
    """The loss tensor of a peer's autograd function, which may return it alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Peer(LogprobsProvider):
    """A peer's fused linear cross-entropy: log-prob = minus its per-token loss (``reduction="none"``). It computes no
    entropy, so it does not run ``fwd_bwd`` (log-probs *and* entropy); the loss cases compose its log-probs with
    ``rlcore.policy_loss``."""

    module: str
    package: str

    def unavailable(self, ctx):
        if ctx.device.type != "cuda":
            return f"{self.package}'s kernel needs CUDA (Triton)"
        return _missing(self.module, self.package)

    def not_for(self, case):
        if case.name == "fwd_bwd":
            return f"{self.package} has no entropy output (fwd_bwd differentiates log-probs and entropy)"
        return super().not_for(case)

    def logprobs_fn(self):
        ce = self.cross_entropy()

        def logprobs(h, w, t, ent):
            assert not ent, "not_for excludes the entropy case"
            return -ce(h, w, t)
        return logprobs

    def cross_entropy(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(hidden [N, H], weight [V, H], targets [N]) -> per-token cross-entropy [N]``."""
        raise NotImplementedError


class LigerFLCE(_Peer):
    name = "liger-flce"
    module = "liger_kernel.ops.fused_linear_cross_entropy"
    package = "liger-kernel"

    def cross_entropy(self):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F

        # positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        # reduction (stable across Liger 0.5-0.8)
        return lambda h, w, t: _first(F.apply(h, w, t, None, None, -100, 0.0, 0.0, "none"))


class CutCrossEntropy(_Peer):
    name = "cce"
    module = "cut_cross_entropy"
    package = "cut-cross-entropy"

    def cross_entropy(self):
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none")


class LigerGRPO(Provider):
    """``LigerFusedLinearGRPOLoss`` set up to equal ``rlcore.policy_loss``'s preset (the bench checks it: its
    ``err_loss`` is against the same float64 truth as every other provider's):

    - ``loss_gspo``: ``loss_type="grpo"`` (per-sequence token mean, then the mean over sequences) with
      ``importance_sampling_level="sequence"`` and rlcore's GSPO clip range;
    - ``loss_cispo``: ``loss_type="cispo"`` (token mean), whose ``epsilon_high`` is the absolute cap on the weight,
      ``1 + eps_high`` in rlcore's terms;
    - ``beta=0``, no reference model: rlcore's presets have no KL term.
    """

    name = "liger-grpo"
    compiles = True          # Liger compiles each chunk's loss with torch.compile (its default)

    def unavailable(self, ctx):
        return _missing("liger_kernel.chunked_loss", "liger-kernel")

    def not_for(self, case):
        if not case.is_loss:
            return "a policy loss: runs in the loss_* cases only"
        if case.loss_type not in ("gspo", "cispo"):
            return f"Liger has no {case.loss_type} loss (no squared-regression losses)"
        return None

    @staticmethod
    def options(loss_type: str) -> dict:
        spec = LOSSES[loss_type]
        if loss_type == "gspo":
            return dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=spec.default("eps_low"),
                        epsilon_high=spec.default("eps_high"))
        return dict(loss_type="cispo", epsilon_high=1.0 + spec.default("eps_high"))

    def build(self, case, inp):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, **self.options(case.loss_type))

        def loss_fn(hidden, weight, targets, advantages, mask, kwargs):
            return _first(module(hidden, weight, targets, mask.to(torch.float32), advantages,
                                 old_per_token_logps=kwargs["old_logp"]))
        return case.call(loss_fn, inp)


class LigerJSD(Provider):
    """Liger-Kernel's chunked fused-linear JSD loss (``LigerFusedLinearJSDLoss``, PyTorch under ``torch.compile``, so
    it runs on CPU too) as a reverse KL: ``beta=1`` is its ``KL(p_S || p_T)``, ``weight_hard_loss=0`` drops its
    cross-entropy term, and it divides the sum over tokens by their number: the ``distill`` case's mean. It
    materialises a chunk of both heads' logits at a time."""

    name = "liger-jsd"
    compiles = True

    def unavailable(self, ctx):
        return _missing("liger_kernel.chunked_loss", "liger-kernel")

    def not_for(self, case):
        return None if case.is_divergence else "a distillation loss: runs in the distill case only"

    def build(self, case, inp):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0)
        return case.call(lambda hs, ws, ht, wt: _first(module(hs, ws, ht, wt, inp.targets)), inp)


def trl_divergence(hs, ws, ht, wt, *, kind: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0):
    """TRL 1.16's chunked divergence (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, what its
    ``DistillationTrainer`` calls through ``_chunked_divergence_loss``) per token, in rlcore's terms: TRL's
    ``beta = 1`` is the reverse KL, ``0`` the forward KL, and its JSD of mixture ``(1 - b) p_S + b p_T`` is rlcore's
    ``jsd`` with ``beta = 1 - b``. No biases; the gradient reaches the student only."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    trl_beta = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": 1.0 - beta}[kind]
    div, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, trl_beta, temperature)
    return div


class TRLDivergence(Provider):
    """TRL 1.16's chunked divergence at ``beta=1`` (its reverse KL), averaged over the tokens: the ``distill`` case's
    mean. PyTorch on CPU (Triton kernels on CUDA), on ``[4096, 32768]`` tiles of both heads' logits."""

    name = "trl-divergence"

    def unavailable(self, ctx):
        return _missing("trl.kernels.chunked_divergence", "trl")

    def not_for(self, case):
        return None if case.is_divergence else "a distillation loss: runs in the distill case only"

    def build(self, case, inp):
        return case.call(lambda hs, ws, ht, wt: trl_divergence(hs, ws, ht, wt).mean(), inp)


# Run order within a group: the floor and the reference first, so every later row's ratios are known when it prints.
PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    GemmFloor(), Reference(), Compiled(), RlcoreTorch(), Rlcore1Pass(), RlcoreCpp(), RlcoreTriton(),
    RlcoreTritonFP32(), LigerFLCE(), LigerGRPO(), CutCrossEntropy(), LigerJSD(), TRLDivergence(),
)}
