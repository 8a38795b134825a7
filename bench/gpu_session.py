"""One prepared GPU session: everything a short GPU loan should measure, in one command, against an internal deadline.

Run through ``bash bench/gpu_session.sh OUT_DIR`` (``--dry-run`` for the same steps on CPU: tiny shapes, Triton's
interpreter; CI runs it). Each step writes its file as soon as it is done, so a session cut short still leaves every
finished step's results; a step that has no time left is recorded as skipped, one that fails as failed (with the
error), and the next step runs anyway. Files (at most 8, all directly in ``OUT_DIR``, as the device tool returns them):

    env.json       device, SM count, clocks, memory, versions, commit; the step log (status and seconds per step)
    accuracy.json  rlcore vs float64 at real head shapes (H = 4096 / V = 151936 and H = 3584 / V = 152064): every
                   precision mode and dtype pair, bias, 30% ignored rows, temperature 0.7, logits of std ~3; and the
                   NaN-padding case (ignored rows whose hidden states hold NaN / inf) with both backward GEMM choices;
                   the fused GSPO loss (both strategies); on the first shape, the soft-capped head (``softcap=10``,
                   bf16) and the fused loss with it
    tests.xml      the CUDA test files (JUnit XML), with few hypothesis examples
    bench.csv      the core bench cases (fwd, fwd_bwd, loss_gspo) at N = 4096 and 16384: the GEMM floor, the
                   materialised reference, torch.compile, Liger's fused linear cross-entropy, Cut Cross-Entropy
                   (each skipped with its reason when not installed), rlcore's Triton backend in bf16 and fp32
    sweep.csv      linear_logprobs fwd and fwd_bwd per launch config (``RLCORE_CONFIG_INDEX``), backward GEMM choice
                   (``RLCORE_BWD_GEMM``) and autotuning: time, TFLOP/s, registers and spills of the kernels launched
    summary.md     every ratio against its target, met or not
    session.log    what ran, with the test output's tail

``python -m bench.gpu_session --check OUT_DIR`` verifies that the files exist and parse (CI runs it after the dry
run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["main", "check", "summarize", "TARGETS", "FILES"]

FILES = ("env.json", "accuracy.json", "tests.xml", "bench.csv", "sweep.csv", "summary.md", "session.log")

# The targets, as (description, case, provider, column or ratio, bound); every one is stated in summary.md.
TARGETS = [
    ("forward log-probs within 1.1x of one bare GEMM", "fwd", "rlcore-triton", "time_vs_floor", 1.1),
    ("linear_logprobs fwd+bwd within 1.5x of the 3-GEMM floor", "fwd_bwd", "rlcore-triton", "time_vs_floor", 1.5),
    ("fused_policy_loss fwd+bwd within 1.25x of the 3-GEMM floor", "loss_gspo", "rlcore-triton", "time_vs_floor",
     1.25),
    ("precision='fp32' within 2x of bf16 (fwd+bwd)", "fwd_bwd", "rlcore-triton-fp32", "vs_bf16", 2.0),
    ("peak extra memory under 5% of the reference's (fwd+bwd)", "fwd_bwd", "rlcore-triton", "mem_vs_reference", 0.05),
]

# Budgets in seconds per step (GPU, dry run): the session's deadline caps each one at what is left.
# The order puts the bench before the tests: if Triton's first compiles (an empty cache on a fresh machine) eat into
# the time, the ratios are what a short loan must not lose.
_BUDGETS = {"env": (15, 20), "accuracy": (75, 60), "bench": (170, 90), "sweep": (60, 40), "tests": (110, 120),
            "summary": (10, 10)}


class Session:
    def __init__(self, out: Path, dry: bool, deadline_s: float):
        self.out, self.dry = out, dry
        self.start = time.monotonic()
        self.end = self.start + deadline_s
        self.steps: dict[str, dict] = {}
        self.log_path = out / "session.log"
        self.env: dict = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def budget(self, step: str) -> float:
        return max(0.0, min(_BUDGETS[step][1 if self.dry else 0], self.left() - 5))

    def run(self, step: str, fn) -> None:
        budget = self.budget(step)
        if budget < 3:
            self.steps[step] = {"status": "skipped", "reason": "no time left before the deadline"}
            self.log(f"{step}: skipped (deadline)")
            return
        t0 = time.monotonic()
        self.log(f"{step}: start (budget {budget:.0f} s)")
        try:
            info = fn(self, t0 + budget) or {}
            self.steps[step] = {"status": "ok", **info}
        except Exception as exc:  # noqa: BLE001 - a failed step is a result; the next step runs anyway
            self.steps[step] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            self.log(f"{step}: FAILED\n{traceback.format_exc()}")
        self.steps[step]["seconds"] = round(time.monotonic() - t0, 1)
        self.log(f"{step}: {self.steps[step]['status']} in {self.steps[step]['seconds']} s")
        self._write_env()

    def _write_env(self) -> None:
        _write_json(self.out / "env.json", dict(self.env, steps=self.steps))


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def step_env(s: Session, until: float) -> dict:
    import torch

    from bench.env import environment

    device = _device()
    env = environment(device)
    env["dry_run"] = s.dry
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            query = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    for name in ("liger_kernel", "cut_cross_entropy"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except ImportError:
            env[name] = None
    env["env_vars"] = {k: v for k, v in os.environ.items() if k.startswith(("RLCORE_", "TRITON_"))}
    s.env = env
    return {}


def _accuracy_shapes(dry: bool):
    if dry:
        return [dict(name="tiny-a", N=37, H=60, V=203), dict(name="tiny-b", N=29, H=33, V=150)]
    return [dict(name="qwen3", N=512, H=4096, V=151936), dict(name="qwen2.5-7b", N=512, H=3584, V=152064)]


def _nan_padding(case, shape, gemm: str) -> dict:
    """The poisoned-padding check: ignored rows hold NaN / inf; every gradient must be finite, their dh exactly 0,
    and the others within the clean case's float64 bar."""
    import torch

    from rlcore import linear_logprobs
    from rlcore.validate import norm_err, run_reference

    os.environ["RLCORE_BWD_GEMM"] = gemm
    try:
        dead = case.targets == case.ignore_index
        clean = run_reference(case)
        poisoned = case.hidden.detach().clone()
        poisoned[dead] = float("nan")
        poisoned[dead.nonzero()[::2].squeeze(1)] = float("inf")
        h = poisoned.requires_grad_()
        w = case.weight.detach().clone().requires_grad_()
        b = case.bias.detach().clone().requires_grad_() if case.bias is not None else None
        logp, ent = linear_logprobs(h, w, case.targets, bias=b, temperature=case.temperature, return_entropy=True,
                                    backend="triton")
        (logp * case.g_logp + ent * case.g_ent).sum().backward()
        grads = {"dh": h.grad, "dW": w.grad, **({"db": b.grad} if b is not None else {})}
        return dict(
            gemm=gemm, finite={k: bool(torch.isfinite(g).all()) for k, g in grads.items()},
            dead_dh_zero=bool((h.grad[dead] == 0).all()),
            norm_err={k: norm_err(torch.where(dead[:, None], 0.0, g) if k == "dh" else g, clean[k])
                      for k, g in grads.items()},
        )
    finally:
        os.environ.pop("RLCORE_BWD_GEMM", None)


def _fused_accuracy(shape, dry: bool, softcap: float = 0.0) -> list[dict]:
    """``fused_policy_loss`` (GSPO, bf16 inputs, a quarter of each sequence prompt) on the Triton backend, single
    and two passes, against the float64 composition: relative error of the loss, normwise errors of dh and dW.
    ``softcap``: the head's soft cap (Gemma 2/3), in both and in the reference."""
    import torch

    import rlcore
    from rlcore.reference import linear_logprobs_reference
    from rlcore.validate import norm_err

    device = _device()
    B, T = (3, 8) if dry else (2, 512)
    H, V = shape["H"], shape["V"]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, T, H, generator=g).to(device)
    w = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(device)
    t = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    adv = torch.randn(B, generator=g).to(device)
    h16, w16 = h.to(torch.bfloat16), w.to(torch.bfloat16)
    with torch.no_grad():
        old = linear_logprobs_reference(h16.double(), w16.double(), t) + 0.1 * torch.randn(B, T, generator=g).to(device)
    kw = dict(old_logp=old, loss_type="gspo", temperature=0.7, softcap=softcap)
    h64, w64 = h16.double().requires_grad_(), w16.double().requires_grad_()
    lp = linear_logprobs_reference(h64, w64, t, temperature=0.7, softcap=softcap)
    truth = rlcore.policy_loss(lp, adv.double(), mask, old_logp=old, loss_type="gspo").loss
    truth.backward()
    out = []
    for strategy in ("single_pass", "two_pass"):
        hb, wb = h16.clone().requires_grad_(), w16.clone().requires_grad_()
        loss = rlcore.fused_policy_loss(hb, wb, t, adv, mask, backend="triton", strategy=strategy, **kw).loss
        loss.backward()
        out.append(dict(shape=shape["name"], case="fused_gspo" + ("_softcap" if softcap else ""), strategy=strategy,
                        B=B, T=T,
                        loss_rel=abs(loss.item() - truth.item()) / max(abs(truth.item()), 1e-30),
                        norm_err={"dh": norm_err(hb.grad, h64.grad), "dW": norm_err(wb.grad, w64.grad)}))
    return out


_SOFTCAP = 10.0   # tight enough for logits of standard deviation 3 to feel it (Gemma 2 ships 30)


def _softcap_accuracy(shape, device) -> dict:
    """The Triton kernels' soft-capped variant on bf16 inputs, judged by ``rlcore.validate.compare``'s bar against the
    float64 capped head (values, entropy, dh, dW, db)."""
    import torch

    from rlcore.validate import compare, make_case

    case = make_case(shape["N"], shape["H"], shape["V"], torch.bfloat16, bias=True, ignore_frac=0.3,
                     temperature=0.7, logit_scale=3.0, seed=4, device=device, softcap=_SOFTCAP)
    report = compare(case, "triton", "default")
    return dict(shape=shape["name"], case="softcap", softcap=_SOFTCAP, hidden="bf16", weight="bf16",
                precision="default", passed=report.passed, failures=report.failures, rel=report.rel,
                norm=report.norm, bars=report.bars, worst=report.worst)


def step_accuracy(s: Session, until: float) -> dict:
    import torch

    from rlcore.validate import MODES, compare, make_case

    device = _device()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    results, failures = [], 0
    for i, shape in enumerate(_accuracy_shapes(s.dry)):
        # the dry run: a few modes (the interpreter takes seconds per case), the NaN padding on the first shape only
        modes = MODES if not s.dry else [MODES[0], MODES[3], MODES[-1]][: 3 - 2 * i]
        for h_dt, w_dt, precision in modes:
            if time.monotonic() > until:
                results.append(dict(shape=shape["name"], status="skipped (deadline)"))
                continue
            case = make_case(shape["N"], shape["H"], shape["V"], dt[h_dt], w_dtype=dt[w_dt], bias=True,
                             ignore_frac=0.3, temperature=0.7, logit_scale=3.0, seed=1, device=device)
            report = compare(case, "triton", precision)
            failures += not report.passed
            results.append(dict(shape=shape["name"], N=shape["N"], H=shape["H"], V=shape["V"], hidden=h_dt,
                                weight=w_dt, precision=precision, passed=report.passed, failures=report.failures,
                                rel=report.rel, norm=report.norm, bars=report.bars, worst=report.worst))
            _write_json(s.out / "accuracy.json", results)
        if time.monotonic() < until and not (s.dry and i > 0):
            case = make_case(shape["N"], shape["H"], shape["V"], torch.bfloat16, bias=True, ignore_frac=0.3,
                             temperature=0.7, logit_scale=3.0, seed=2, device=device)
            for gemm in ("triton", "torch"):
                results.append(dict(shape=shape["name"], case="nan_padding", **_nan_padding(case, shape, gemm)))
                _write_json(s.out / "accuracy.json", results)
            results += _fused_accuracy(shape, s.dry)
            if i == 0:   # the soft-capped kernels (a few more compiles): on the first shape only
                results.append(_softcap_accuracy(shape, device))
                results += _fused_accuracy(shape, s.dry, softcap=_SOFTCAP)
            _write_json(s.out / "accuracy.json", results)
    _write_json(s.out / "accuracy.json", results)
    return {"cases": len(results), "failed": failures}


def step_tests(s: Session, until: float) -> dict:
    files = ["tests/test_nan_padding.py"]
    extra = ["-k", "every_row_ignored"] if s.dry else []
    if not s.dry:
        files = ["tests/test_linear_logprobs.py", "tests/test_nan_padding.py", "tests/test_edge_cases.py",
                 "tests/test_fused_loss.py", "tests/test_segments.py"]
    env = dict(os.environ, RLCORE_HYPOTHESIS_EXAMPLES="4" if not s.dry else "2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *extra,
           f"--junitxml={s.out / 'tests.xml'}"]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=max(5, until - time.monotonic()))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-4000:]
    s.log("tests output (tail):\n" + tail)
    if not (s.out / "tests.xml").exists():
        (s.out / "tests.xml").write_text(f'<testsuites><testsuite name="none" tests="0" errors="1">'
                                         f'<error message="pytest {rc}"/></testsuite></testsuites>\n')
    if rc != 0:
        raise RuntimeError(f"pytest returned {rc}: {_junit_counts(s.out / 'tests.xml')}")
    return {"returncode": rc}


def _bench_rows(s: Session, until: float, cases, providers, tokens, writer, fields) -> int:
    import torch

    from bench.env import environment
    from bench.runner import Config, run

    device = _device()
    cfg = Config(device=device, quick=True, cases=tuple(cases), shapes=("tiny",) if s.dry else ("qwen3",),
                 dtypes=("fp32",) if s.dry else ("bf16",), providers=tuple(providers), tokens=tuple(tokens))
    n = 0
    for row in run(cfg, environment(device)):
        writer.writerow({k: row.get(k) for k in fields})
        n += 1
        if time.monotonic() > until:
            s.log("bench: deadline reached, stopping")
            break
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return n


def step_bench(s: Session, until: float) -> dict:
    from bench.runner import FIELDS

    tokens = (64,) if s.dry else (4096, 16384)
    peers = ["liger-flce", "cce"]
    # the dry run has no CUDA, so rlcore's Triton providers skip there: the chunked backend stands in for them
    core = ["gemm-floor", "reference", "rlcore-triton", "rlcore-triton-fp32", *peers] + (["rlcore-torch"] if s.dry
                                                                                         else [])
    # rlcore first, torch.compile last: its compile time (tens of seconds per shape) is what the deadline may cut
    phases = [(("fwd", "fwd_bwd"), core), (("loss_gspo",), ["gemm-floor", "reference", "rlcore-triton",
                                                            "liger-grpo"])]
    if not s.dry:
        phases.append((("fwd_bwd",), ["gemm-floor", "compile"]))
    fields = [f for f in FIELDS if f != "reason"] + ["reason"]
    n = 0
    with open(s.out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for cases, providers in phases:
            if time.monotonic() > until:
                break
            n += _bench_rows(s, until, cases, providers, tokens, writer, fields)
            f.flush()
    return {"rows": n}


def _kernel_resources(fn) -> tuple:
    """(max registers, max spilled bytes) over the binaries of the Triton kernel ``fn`` compiled so far (best effort:
    the compiled-kernel cache's layout differs between Triton versions; None where it cannot be read)."""
    regs, spills = [], []
    caches = getattr(fn, "device_caches", None) or {}
    for entry in caches.values():
        kernels = entry[0] if isinstance(entry, tuple) else entry
        for kernel in getattr(kernels, "values", lambda: [])():
            if getattr(kernel, "n_regs", None) is not None:
                regs.append(kernel.n_regs)
                spills.append(kernel.n_spills)
    return (max(regs) if regs else None, max(spills) if spills else None)


def step_sweep(s: Session, until: float) -> dict:
    import torch

    from rlcore import linear_logprobs
    from rlcore.kernels import linear_logprobs as K

    device = _device()
    N, H, V = (64, 60, 203) if s.dry else (16384, 4096, 151936)
    dtype = torch.float32 if s.dry else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(N, H, generator=g) * 1.0).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[: N // 4] = -100
    n_cfg = max(len(lst) for table in K.CONFIGS.values() for lst in table["sm90"].values())
    settings = [dict(RLCORE_CONFIG_INDEX=str(i)) for i in range(n_cfg)]
    settings += [dict(RLCORE_BWD_GEMM="triton"), dict(RLCORE_BWD_GEMM="torch"), dict(RLCORE_AUTOTUNE="1")]
    if s.dry:   # the interpreter ignores configs: one of each kind of setting
        settings = [settings[0], settings[-2]]

    def timed(fn, reps):
        if device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=3, rep=reps * 20)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    fields = ["setting", "pass", "N", "H", "V", "time_ms", "tflops", "fwd_regs", "fwd_spills", "dz_regs",
              "dz_spills", "matmul_regs", "matmul_spills", "error"]
    n = 0
    with open(s.out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for setting in settings:
            for name, gemms in (("fwd", 1), ("fwd_bwd", 3)):
                if time.monotonic() > until:
                    break
                row = dict(setting=" ".join(f"{k}={v}" for k, v in setting.items()), **{"pass": name}, N=N, H=H,
                           V=V)
                saved = {k: os.environ.get(k) for k in setting}
                os.environ.update(setting)
                try:
                    if name == "fwd":
                        def fn():
                            with torch.no_grad():
                                linear_logprobs(h, w, t, backend="triton")
                    else:
                        def fn():
                            logp, ent = linear_logprobs(h, w, t, backend="triton", return_entropy=True)
                            (logp.sum() + ent.sum()).backward()
                    ms = timed(fn, 3)
                    row.update(time_ms=round(ms, 3), tflops=round(gemms * 2 * N * H * V / ms / 1e9, 1))
                except Exception as exc:  # noqa: BLE001 - a config that fails is a row of the sweep
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                for kernel, fn_obj in (("fwd", K._fwd_kernel), ("dz", K._dz_kernel), ("matmul", K._matmul_kernel)):
                    row[f"{kernel}_regs"], row[f"{kernel}_spills"] = _kernel_resources(fn_obj)
                writer.writerow(row)
                f.flush()
                n += 1
                h.grad = w.grad = None
    return {"rows": n}


def step_summary(s: Session, until: float) -> dict:
    (s.out / "summary.md").write_text(summarize(s.out))
    return {}


# ----------------------------------------------------------------------------------------------------------------------
# Summary and check
# ----------------------------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x) -> str:
    value = _num(x)
    return "" if value is None else f"{value:.4g}"


def summarize(out: Path) -> str:
    """``summary.md`` from the files in ``out``: every target with its measured ratio (met or not), every bench
    ratio, the accuracy verdicts, the test counts and the sweep."""
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    rows = [r for r in _read_csv(out / "bench.csv") if r.get("status") == "ok"]
    lines = [f"# GPU session: {env.get('device', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {str(env.get('git_commit'))[:12]}, "
             f"{env.get('date')}{' (dry run: CPU, interpreter, tiny shapes: ratios mean nothing)' if env.get('dry_run') else ''}",
             "", "## Targets", "", "| target | N | measured | bound | met |", "|---|---|---|---|---|"]
    by_key = {(r["case"], r["provider"], r["N"]): r for r in rows}
    for text, case, provider, column, bound in TARGETS:
        for N in sorted({r["N"] for r in rows if r["case"] == case}, key=int):
            r = by_key.get((case, provider, N))
            value = None
            if r is not None and column == "vs_bf16":
                base = by_key.get((case, "rlcore-triton", N))
                a, b = _num(r.get("time_ms")), _num(base.get("time_ms")) if base else None
                value = a / b if a and b else None
            elif r is not None:
                value = _num(r.get(column))
            shown = f"{value:.3f}" if value is not None else "n/a"
            met = "n/a" if value is None else ("yes" if value <= bound else "NO")
            lines.append(f"| {text} | {N} | {shown} | {bound} | {met} |")
    lines += ["", "## Every bench row", "", "| case | N | provider | time ms | TFLOP/s | vs floor | vs reference | "
              "mem vs reference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in ("time_ms", "tflops", "time_vs_floor", "time_vs_reference",
                                           "mem_vs_reference")]
        lines.append(f"| {r['case']} | {r['N']} | {r['provider']} | " + " | ".join(cells) + " |")
    skipped = [r for r in _read_csv(out / "bench.csv") if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{r['provider']} ({r['case']}, N={r['N']}): {r.get('status')} "
                                                   f"{(r.get('reason') or '')[:80]}" for r in skipped)]
    acc = json.loads((out / "accuracy.json").read_text()) if (out / "accuracy.json").exists() else []
    judged = [a for a in acc if "passed" in a]
    lines += ["", "## Accuracy against float64", "",
              f"{sum(a['passed'] for a in judged)} of {len(judged)} mode x shape cases within their bars"]
    for a in judged:
        if not a["passed"]:
            lines.append(f"- FAILED {a['shape']} {a.get('case', '')} {a['hidden']}/{a['weight']} {a['precision']}: "
                         f"{a['failures']}")
    for a in (a for a in acc if a.get("case", "").startswith("fused_gspo")):
        cap = " (soft cap)" if a["case"].endswith("softcap") else ""
        lines.append(f"- fused GSPO loss{cap}, {a['shape']}, {a['strategy']}: loss rel error {a['loss_rel']:.2e}, "
                     f"dh {a['norm_err']['dh']:.2e}, dW {a['norm_err']['dW']:.2e} (normwise, vs float64)")
    for a in (a for a in acc if a.get("case") == "nan_padding"):
        ok = all(a["finite"].values()) and a["dead_dh_zero"]
        lines.append(f"- NaN padding, {a['shape']}, backward GEMMs {a['gemm']}: {'ok' if ok else 'BROKEN'} "
                     f"(norm errors {', '.join(f'{k} {v:.2e}' for k, v in a['norm_err'].items())})")
    lines += ["", "## Tests", "", _junit_counts(out / "tests.xml"), "", "## Sweep", "",
              "| setting | pass | ms | TFLOP/s | regs fwd/dz/mm | spills fwd/dz/mm | error |", "|---|---|---|---|---|---|---|"]
    for r in _read_csv(out / "sweep.csv"):
        lines.append(f"| {r['setting']} | {r['pass']} | {r['time_ms']} | {r['tflops']} | "
                     f"{r['fwd_regs']}/{r['dz_regs']}/{r['matmul_regs']} | "
                     f"{r['fwd_spills']}/{r['dz_spills']}/{r['matmul_spills']} | {r['error']} |")
    lines += ["", "## Steps", ""] + [f"- {k}: {v.get('status')} ({v.get('seconds')} s) {v.get('error', '')}"
                                     for k, v in env.get("steps", {}).items()]
    return "\n".join(lines) + "\n"


def _junit_counts(path: Path) -> str:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return "no tests.xml"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    totals = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    return ", ".join(f"{v} {k}" for k, v in totals.items())


def check(out: Path) -> list[str]:
    """Problems with the session files in ``out`` (empty: all there and parse)."""
    import xml.etree.ElementTree as ET

    problems = []
    for name in FILES:
        path = out / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".csv"):
                if not _read_csv(path):
                    problems.append(f"{name}: no rows")
            elif name.endswith(".xml"):
                ET.parse(path)
            elif not path.read_text().strip():
                problems.append(f"{name}: empty")
        except (ValueError, ET.ParseError) as exc:
            problems.append(f"{name}: does not parse ({exc})")
    if (out / "env.json").exists() and not problems:
        steps = json.loads((out / "env.json").read_text()).get("steps", {})
        problems += [f"step {k}: {v.get('status')} {v.get('error', '')}" for k, v in steps.items()
                     if v.get("status") != "ok"]
        acc = json.loads((out / "accuracy.json").read_text())
        problems += [f"accuracy: {a['shape']} {a['hidden']}/{a['weight']} {a['precision']}: {a['failures']}"
                     for a in acc if a.get("passed") is False]
    return problems


STEPS = [("env", step_env), ("accuracy", step_accuracy), ("bench", step_bench), ("sweep", step_sweep),
         ("tests", step_tests), ("summary", step_summary)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole session (default 450, dry 420)")
    p.add_argument("--check", action="store_true", help="only check that OUT's files exist and parse")
    args = p.parse_args(argv)
    if args.check:
        problems = check(args.out)
        print("\n".join(problems) if problems else f"{args.out}: all {len(FILES)} files present and parse")
        return 1 if problems else 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("--dry-run needs TRITON_INTERPRET=1 (bench/gpu_session.sh sets it)", file=sys.stderr)
        return 2
    s = Session(args.out, args.dry_run, args.deadline or (420 if args.dry_run else 450))
    s.log_path.write_text("")
    for name, fn in STEPS:
        s.run(name, fn)
    s.log("done: " + ", ".join(f"{k} {v['status']}" for k, v in s.steps.items()))
    return 0 if all(v["status"] == "ok" for v in s.steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
