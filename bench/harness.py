"""Timing and memory of one benchmark call.

Protocol, for every provider alike (``measure``):

1. ``warmup`` untimed calls: compilation (``torch.compile``; Triton's JIT and autotuning on CUDA) happens here, so
   none of its allocations reach step 2.
2. One call under ``rlcore.memory.peak_memory``: its peak extra bytes, and its outputs, which ``check`` turns into
   error figures before they are dropped (so they are not live during the timed calls).
3. Timed calls.
   - CUDA: ``triton.testing.do_bench`` (its own warm-up, L2 flushed before each call, CUDA events), every
     per-call time kept.
   - CPU: first more untimed calls until steps 2-3 have taken ``warmup_s`` (at most ``max_warmup``): a call of
     seconds gets none, step 2 was its warm-up; a call of a millisecond gets dozens. Then ``time.perf_counter``
     around each call, ``reps = clamp(budget_s / t_call, min_reps, max_reps)``: a call of many seconds is repeated
     few times (``reps`` is in every row; with one rep p20 = median = p80).

The statistics are the median and the 20th/80th percentiles of the per-call times.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlcore.memory import peak_memory

__all__ = ["TimingPolicy", "Measurement", "measure", "quantile"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one row: ``warmup_s``, ``max_warmup``, ``budget_s``, ``min_reps``, ``max_reps`` apply on
    CPU, ``rep_ms`` (``do_bench``'s timed duration) on CUDA."""

    warmup_s: float
    max_warmup: int
    budget_s: float
    min_reps: int
    max_reps: int
    rep_ms: int

    @classmethod
    def for_run(cls, quick: bool, smoke: bool = False) -> "TimingPolicy":
        if smoke:   # every row once and no warm-up: the run's shape and errors are real, its times are not
            return cls(warmup_s=0.0, max_warmup=0, budget_s=0.0, min_reps=1, max_reps=1, rep_ms=1)
        if quick:
            return cls(warmup_s=0.5, max_warmup=50, budget_s=3.0, min_reps=1, max_reps=10, rep_ms=100)
        return cls(warmup_s=2.0, max_warmup=200, budget_s=20.0, min_reps=3, max_reps=30, rep_ms=500)


@dataclass
class Measurement:
    """Times in milliseconds; ``peak_bytes`` beyond what was live before the call (outputs included); ``errors``
    from the ``check`` of ``measure``."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str
    peak_bytes: int
    errors: dict


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``0 <= q <= 1``."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable[[], object], call_s: float, policy: TimingPolicy) -> list[float]:
    reps = int(policy.budget_s / max(call_s, 1e-6))
    reps = max(policy.min_reps, min(policy.max_reps, reps))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(fn: Callable[[], object], policy: TimingPolicy) -> list[float]:
    from triton.testing import do_bench

    times = do_bench(fn, warmup=25, rep=policy.rep_ms, return_mode="all")
    return [float(t) for t in times]


@contextlib.contextmanager
def _kineto_lines_filtered():
    """Drop the ``USDT: ... profiler_start/stop`` lines libkineto writes to fd 2 around every profiled call (they
    cannot be switched off); any other stderr output of the block is passed through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith(("USDT:", "STAGE:"))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def measure(fn: Callable[[], object], device: torch.device, policy: TimingPolicy, *, warmup: int = 0,
            check: Optional[Callable[[object], dict]] = None) -> Measurement:
    """Warm up, measure the peak memory of one call and ``check`` its outputs, then time ``fn`` (see the module
    docstring)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    with _kineto_lines_filtered():
        peak, outputs = peak_memory(fn, device)
    call_s = time.perf_counter() - t0               # profiled: an over-estimate of one call, refined below
    errors = check(outputs) if check is not None else {}
    del outputs
    if device.type == "cuda":
        times, method = _time_cuda(fn, policy), "triton.testing.do_bench"
    else:
        calls, t1 = 0, time.perf_counter()
        while time.perf_counter() - t0 < policy.warmup_s and calls < policy.max_warmup:
            fn()
            calls += 1
        if calls:
            call_s = (time.perf_counter() - t1) / calls
        times, method = _time_cpu(fn, call_s, policy), "time.perf_counter"
    return Measurement(
        median_ms=quantile(times, 0.5), p20_ms=quantile(times, 0.2), p80_ms=quantile(times, 0.8),
        reps=len(times), method=method, peak_bytes=int(peak), errors=errors,
    )
