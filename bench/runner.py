"""The benchmark loop: cases x shapes x dtypes x N x providers, one result row per (group, provider).

A *group* is one (case, shape, dtype, N): its inputs and float64 ground truth are built once and shared by its
providers, and each row's ratios are taken against the group's ``gemm-floor`` and ``reference`` rows.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .cases import CASES
from .harness import TimingPolicy, measure
from .providers import PROVIDERS, Context
from .shapes import SHAPES, tokens_for

__all__ = ["Config", "FIELDS", "DTYPES", "plan", "run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Column order of every row (CSV header); environment fields come first, from ``bench.env.environment``.
FIELDS = [
    "case", "provider", "shape", "H", "V", "N", "dtype", "status", "reason",
    "time_ms", "time_p20_ms", "time_p80_ms", "reps", "timing", "gemms", "tflops", "time_vs_floor",
    "time_vs_reference", "peak_mem_bytes", "mem_vs_reference", "err_logp", "err_entropy", "err_dh", "err_loss",
    "err_rows", "wall_s",
]


@dataclass(frozen=True)
class Config:
    device: torch.device
    quick: bool
    cases: tuple[str, ...]
    shapes: tuple[str, ...]
    dtypes: tuple[str, ...]
    providers: tuple[str, ...]
    tokens: Optional[tuple[int, ...]] = None      # overrides the registry's token counts
    seed: int = 0
    smoke: bool = False                           # one timed call per row (TimingPolicy.for_run)


def plan(cfg: Config) -> list[tuple[str, str, str, int]]:
    """The groups to run, in order: ``(case, shape, dtype, N)``."""
    return [(c, s, d, n) for c in cfg.cases for s in cfg.shapes for d in cfg.dtypes
            for n in (cfg.tokens or tokens_for(SHAPES[s], c, cfg.device.type, cfg.quick))]


def _ratio(x, base) -> Optional[float]:
    if x is None or base is None or base <= 0:
        return None
    return x / base


def _fill_ratios(group: list[dict]) -> None:
    """Set each measured row's time and memory ratios against the group's floor and reference rows."""
    by_name = {r["provider"]: r for r in group}
    floor, ref = by_name.get("gemm-floor", {}), by_name.get("reference", {})
    for row in group:
        row["time_vs_floor"] = _ratio(row["time_ms"], floor.get("time_ms"))
        row["time_vs_reference"] = _ratio(row["time_ms"], ref.get("time_ms"))
        row["mem_vs_reference"] = _ratio(row["peak_mem_bytes"], ref.get("peak_mem_bytes"))
        for k in ("tflops", "time_vs_floor", "time_vs_reference", "mem_vs_reference"):
            if row[k] is not None and not math.isfinite(row[k]):
                row[k] = None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or \
        "can't allocate memory" in str(e).lower()


def run(cfg: Config, env: dict) -> Iterator[dict]:
    """Yield one row (a dict over ``env`` fields + ``FIELDS``) per (group, provider), as each completes."""
    ctx = Context(device=cfg.device, quick=cfg.quick)
    policy = TimingPolicy.for_run(cfg.quick, cfg.smoke)
    for case_name, shape_name, dtype_name, N in plan(cfg):
        case, shape, dtype = CASES[case_name], SHAPES[shape_name], DTYPES[dtype_name]
        inp = case.make_inputs(shape, N, dtype, cfg.device, seed=cfg.seed)
        truth = case.ground_truth(inp)
        flops = case.flops(shape, N)
        group: list[dict] = []           # the group's measured rows: ratios are filled in as the baselines arrive
        for prov_name in cfg.providers:
            prov = PROVIDERS[prov_name]
            row = dict(env, **{f: None for f in FIELDS})
            row.update(case=case_name, provider=prov_name, shape=shape_name, H=shape.H, V=shape.V, N=N,
                       dtype=dtype_name, gemms=case.gemms, status="skipped")
            reason = prov.unavailable(ctx) or prov.not_for(case) or prov.wont_fit(ctx, case, shape, N)
            if reason:
                row["reason"] = reason
                yield row
                continue
            t0 = time.perf_counter()
            try:
                fn = prov.build(case, inp)
                check = (lambda out, case=case, truth=truth: case.errors(out, truth)) if prov.has_outputs else None
                m = measure(fn, cfg.device, policy, warmup=1 if (prov.compiles or cfg.device.type == "cuda") else 0,
                            check=check)
            except Exception as e:  # noqa: BLE001 - one provider's failure must not end the run
                if _is_oom(e):
                    row["reason"] = "out of memory"
                else:
                    row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
                    traceback.print_exc()
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                fn = None
                _free(cfg.device)
                yield row
                continue
            fn = None
            _free(cfg.device)
            row.update(
                status="ok", time_ms=m.median_ms, time_p20_ms=m.p20_ms, time_p80_ms=m.p80_ms, reps=m.reps,
                timing=m.method, tflops=flops / (m.median_ms * 1e-3) / 1e12, peak_mem_bytes=m.peak_bytes,
                err_rows=case.err_rows(N) if prov.has_outputs else None, wall_s=round(time.perf_counter() - t0, 2),
                **m.errors,
            )
            group.append(row)
            _fill_ratios(group)
            yield row
        _fill_ratios(group)              # the floor's ratio to the reference is known only now
        del inp, truth
        _free(cfg.device)
