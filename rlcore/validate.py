"""Check every backend of ``linear_logprobs`` against the float64 reference on this machine, and print a table.

    python -m rlcore.validate            # every backend, dtype and precision mode available here
    python -m rlcore.validate --quick    # one shape per row instead of several

Rows: backend x input dtypes x precision mode. Columns: max abs / max rel error of ``logp``, ``entropy`` and the
gradients ``dh``, ``dW``, ``db`` (upstream gradients on both outputs at once), then the verdict. The bar is the one
the test suite uses (``compare``):

- a result returned in FP32 from an FP32-accurate mode (FP32 inputs, or ``precision="fp32"``): relative error
  (max |x - ref| / max |ref|) within ``FP32_TOL`` (``TF32_TOL`` for ``precision="tf32"`` on a GPU);
- otherwise (half-precision inputs, or a gradient returned in a half dtype): the normwise error
  ||x - ref|| / ||ref|| is no worse than PyTorch's own computation in the inputs' dtype (bf16 logits, FP32
  log-softmax, autograd), or within twice the error of rounding the exact answer to the output dtype.

On CPU the compiled backend (``backend="cpp"``) is checked too, where it builds. Without CUDA the Triton kernels
run in Triton's CPU interpreter (this module sets ``TRITON_INTERPRET=1`` before they
are imported), on small shapes. This module also holds the case builder and error metrics the tests use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .reference import linear_logprobs_reference

__all__ = ["Case", "make_case", "run_rlcore", "run_reference", "rel_err", "norm_err", "compare", "Report", "main",
           "FP32_TOL", "TF32_TOL"]

HALF = (torch.bfloat16, torch.float16)
QUANTITIES = ("logp", "ent", "dh", "dW", "db")
FP32_TOL = {"logp": 2e-5, "ent": 2e-5, "dh": 5e-5, "dW": 5e-5, "db": 5e-5}
TF32_TOL = 5e-3  # TF32 keeps 10 mantissa bits of each FP32 operand (GPU only; the interpreter multiplies in FP32)


# ----------------------------------------------------------------------------------------------------------------------
# Cases and runs
# ----------------------------------------------------------------------------------------------------------------------


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
    softcap: float = 0.0                 # linear_logprobs's softcap= (0: none)

    @property
    def leaves(self):
        return [x for x in (self.hidden, self.weight, self.bias) if x is not None]


def make_case(N, H, V, dtype=torch.float32, *, w_dtype=None, bias=False, ignore_frac=0.0, temperature=1.0,
              logit_scale=3.0, seed=0, lead=None, device="cpu", softcap=0.0) -> Case:
    """Random inputs whose logits have standard deviation about ``logit_scale`` (before temperature).

    ``hidden`` is ``[N, H]`` (or ``[*lead, H]``) in ``dtype``; ``weight`` and ``bias`` in ``w_dtype`` (default
    ``dtype``); a fraction ``ignore_frac`` of targets is ``-100``; ``softcap``: the head's soft cap (0: none).
    Generated on the CPU, so identical on any device.
    """
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
                leaf(b, w_dtype) if b is not None else None, g_logp.to(device), g_ent.to(device), temperature,
                softcap=softcap)


def _with_grads(case: Case, logp, ent, use_logp=True, use_ent=True) -> dict:
    loss = 0
    if use_logp:
        loss = loss + (logp.double() * case.g_logp.double()).sum()
    if use_ent:
        loss = loss + (ent.double() * case.g_ent.double()).sum()
    grads = torch.autograd.grad(loss, case.leaves, allow_unused=True)
    out = {"logp": logp.detach(), "ent": ent.detach()}
    for name, g, x in zip(("dh", "dW", "db"), grads, case.leaves):
        out[name] = g if g is not None else torch.zeros_like(x)
    return out


def run_rlcore(case: Case, *, backend="auto", precision="default", use_logp=True, use_ent=True) -> dict:
    """``rlcore.linear_logprobs`` on ``case``: ``{"logp", "ent", "dh", "dW"[, "db"]}``."""
    from .logprobs import linear_logprobs

    logp, ent = linear_logprobs(
        case.hidden, case.weight, case.targets, bias=case.bias, temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=True, precision=precision, backend=backend,
        softcap=case.softcap,
    )
    return _with_grads(case, logp, ent, use_logp, use_ent)


def run_reference(case: Case, compute_dtype=torch.float64, use_logp=True, use_ent=True) -> dict:
    """Float64 ground truth by default, differentiated w.r.t. float64 copies of the inputs (autograd would otherwise
    round the "true" gradients to the leaves' dtype). ``compute_dtype=None`` is PyTorch's own computation in the
    input dtype, with gradients in the inputs' dtypes, as a trainer would get them."""
    if compute_dtype is not None:
        case = replace(case, **{k: getattr(case, k).detach().to(compute_dtype).requires_grad_()
                                for k in ("hidden", "weight", "bias") if getattr(case, k) is not None})
    weight = case.weight if compute_dtype is not None else case.weight.to(case.hidden.dtype)
    logp, ent = linear_logprobs_reference(
        case.hidden, weight, case.targets, bias=case.bias, temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=True, compute_dtype=compute_dtype, softcap=case.softcap,
    )
    return _with_grads(case, logp, ent, use_logp, use_ent)


# ----------------------------------------------------------------------------------------------------------------------
# Errors and the bar
# ----------------------------------------------------------------------------------------------------------------------


def abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (absolute when ref is all zeros)."""
    if ref.numel() == 0:
        return 0.0
    scale = ref.double().abs().max().item()
    diff = abs_err(x, ref)
    return diff / scale if scale > 0 else diff


def norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (Frobenius): the error of a whole tensor, insensitive to one unlucky rounding."""
    if ref.numel() == 0:
        return 0.0
    d = (x.double() - ref.double()).norm().item()
    r = ref.double().norm().item()
    return d / r if r > 0 else d


@dataclass
class Report:
    abs: dict
    rel: dict
    norm: dict
    bars: dict                       # quantity -> (metric name, bound)
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> float:
        """The largest error as a fraction of its bar (1.0 = at the bar)."""
        metrics = {"rel": self.rel, "norm": self.norm}
        return max((metrics[m][k] / bound for k, (m, bound) in self.bars.items()), default=0.0)


def compare(case: Case, backend: str, precision: str = "default", *, gpu_tf32: Optional[bool] = None) -> Report:
    """Run rlcore on ``case`` and judge every output and gradient against float64 (see the module doc for the bar)."""
    ref = run_reference(case)
    out = run_rlcore(case, backend=backend, precision=precision)
    if gpu_tf32 is None:
        gpu_tf32 = case.hidden.device.type == "cuda" and backend != "torch"
    fp32_mode = precision == "fp32" or (case.hidden.dtype not in HALF and case.weight.dtype not in HALF)
    torch_own = None
    report = Report({}, {}, {}, {})
    for k in ref:
        x, r = out[k], ref[k]
        if x.shape != r.shape:
            report.failures.append(f"{k}: shape {tuple(x.shape)} != {tuple(r.shape)}")
            continue
        if not torch.isfinite(x).all():
            report.failures.append(f"{k}: non-finite values")
        report.abs[k], report.rel[k], report.norm[k] = abs_err(x, r), rel_err(x, r), norm_err(x, r)
        if fp32_mode and x.dtype not in HALF:
            tol = TF32_TOL if (precision == "tf32" and gpu_tf32) else FP32_TOL[k]
            report.bars[k] = ("rel", tol)
            value = report.rel[k]
        else:
            if torch_own is None:
                torch_own = run_reference(case, compute_dtype=None)
            floor = norm_err(r.to(x.dtype), r)  # rounding the exact answer to the output dtype
            report.bars[k] = ("norm", max(norm_err(torch_own[k], r), 2 * floor) + 1e-7)
            value = report.norm[k]
        if value > report.bars[k][1]:
            report.failures.append(f"{k}: {report.bars[k][0]} error {value:.3e} > {report.bars[k][1]:.3e}")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (hidden dtype, weight dtype, precision); the last row is an FP32 head under bf16 activations (the MiniMax-M1 fix).
MODES = [(d, d, p) for d in ("fp32", "bf16", "fp16") for p in ("default", "tf32", "fp32")] + [("bf16", "fp32", "fp32")]


def _shapes(device: torch.device, backend: str, quick: bool):
    """(name, N, H, V) per row. Interpreter shapes are tiny; odd sizes exercise every edge mask."""
    if backend == "triton" and device.type != "cuda":
        shapes = [("odd", 37, 60, 509), ("tiny", 1, 16, 5)]
    elif device.type == "cuda":
        shapes = [("odd", 1000, 1000, 32003), ("llama3-head", 512, 4096, 128256), ("tiny", 1, 60, 5)]
    else:
        shapes = [("odd", 300, 200, 4099), ("tiny", 1, 60, 5)]
    return shapes[:1] if quick else shapes


def _fmt(report: Report, k: str) -> str:
    if k not in report.abs:
        return "-"
    return f"{report.abs[k]:.1e}/{report.rel[k]:.1e}"


def _bar_text() -> str:
    """The module doc's account of the columns and the bar, as plain text, with the bounds' values."""
    body = "Rows:" + __doc__.split("Rows:", 1)[1].split("On CPU the compiled backend")[0].replace("``", "").rstrip()
    bounds = ", ".join(f"{k} {v:g}" for k, v in FP32_TOL.items())
    return (f"{body}\n\nFP32_TOL (relative): {bounds}; TF32_TOL: {TF32_TOL:g}. The err/bar column is the worst "
            "error as a fraction of its bar (1.0 = at the bar); above 1 the row FAILs.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcore.validate", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog=_bar_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape per backend and mode")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates both sides of tl.where in numpy, which warns about the discarded side.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    import triton

    from . import __version__, cpp
    from .logprobs import _kernels

    backends = ["torch"]
    if device.type == "cuda" or _kernels().is_interpreter():
        backends.append("triton")
    if device.type == "cpu" and cpp.available():   # built here on first use; a failed build prints its notice
        backends.append("cpp")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"rlcore {__version__} | torch {torch.__version__} | triton {triton.__version__} | device: {name}"
          + ("" if device.type == "cuda" else " (Triton kernels in the CPU interpreter)"))
    print("errors vs float64: max abs / max rel (max|x - ref| / max|ref|); err/bar: the worst error as a fraction "
          "of its bar (`python -m rlcore.validate -h`, or README.md#precision, 'Accuracy bar')")
    header = (f"{'backend':<7} {'dtypes':<10} {'precision':<9} {'shape':<22} "
              + " ".join(f"{k:<15}" for k in QUANTITIES) + " err/bar verdict")
    print(header)
    print("-" * len(header))
    failed = 0
    for backend in backends:
        for h_dt, w_dt, precision in MODES:
            for shape_name, N, H, V in _shapes(device, backend, args.quick):
                case = make_case(N, H, V, _DT[h_dt], w_dtype=_DT[w_dt], bias=True, ignore_frac=0.1,
                                 temperature=0.8, seed=N + V, device=device)
                t0 = time.perf_counter()
                report = compare(case, backend, precision)
                dtypes = h_dt if h_dt == w_dt else f"{h_dt}+{w_dt}"
                verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.failures)
                print(f"{backend:<7} {dtypes:<10} {precision:<9} {f'{shape_name} {N}x{H}x{V}':<22} "
                      + " ".join(f"{_fmt(report, k):<15}" for k in QUANTITIES)
                      + f" {report.worst:<7.2f} {verdict} ({time.perf_counter() - t0:.1f}s)", flush=True)
                failed += not report.passed
    print(f"\n{'all checks passed' if not failed else f'{failed} row(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
