"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from .cases import CASES, FLOP_CONVENTION, LOGIT_STD, SAMPLE_ROWS
from .env import REPO_ROOT, environment
from .harness import TimingPolicy
from .providers import PROVIDERS
from .plots import plots_unavailable, write_plots
from .report import progress_line, table, write_files
from .runner import DTYPES, FIELDS, Config, plan, run
from .shapes import SHAPES, default_shapes

__all__ = ["main", "parse_args", "default_out"]

EPILOG = f"""\
shapes: {", ".join(f"{s.name} (H={s.H}, V={s.V})" for s in SHAPES.values())}
cases: {", ".join(f"{c.name} ({c.description})" for c in CASES.values())}
providers: {", ".join(PROVIDERS)}

{FLOP_CONVENTION}
"""


def _list(choices):
    """An argparse type: a comma-separated list, each item one of ``choices``."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be >= 1")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark rlcore's linear log-probs and fused policy losses.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small subset, timed briefly (CPU: every case at N=1024 on cpu-small, without "
                        "torch.compile; a few minutes and under 2 GB on a 2-core CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="time each row with one call and no warm-up: checks that the run works (the tests use it "
                        "with --quick --shapes tiny); its times mean nothing")
    default_cases = tuple(n for n, c in CASES.items() if c.in_default_run)
    p.add_argument("--only", type=_list(list(CASES)), default=default_cases, metavar="CASE[,CASE]",
                   help=f"cases to run (default: {', '.join(default_cases)}; also: "
                        f"{', '.join(n for n in CASES if n not in default_cases)})")
    p.add_argument("--shapes", type=_list(list(SHAPES)), default=None, metavar="NAME[,NAME]",
                   help="LM-head shapes (default: cpu-small on CPU, real heads on CUDA)")
    p.add_argument("--providers", type=_list(list(PROVIDERS)), default=tuple(PROVIDERS), metavar="P[,P]",
                   help="providers to run (default: all; unavailable ones are skipped with a reason)")
    p.add_argument("--dtype", type=_list(list(DTYPES)), default=None, metavar="DTYPE[,DTYPE]",
                   help="input dtypes (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--tokens", type=_ints, default=None, metavar="N[,N]",
                   help="token counts N, overriding the registry's")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: bench/runs/<device-slug>/, ignored by git; the committed results "
                        "in bench/results/ are written only when --out names that folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def default_out(device_slug: str) -> Path:
    """Where a run writes without ``--out``: ``bench/runs/<device-slug>/``, outside the tracked ``bench/results/``
    (and ignored by git), so a first run leaves the checkout clean."""
    return REPO_ROOT / "bench" / "runs" / device_slug


def _progress(total: int):
    """``(report(line), close())``: a tqdm bar (the ``bench`` extra) under the row lines when tqdm is importable, else
    each line prefixed with ``[k/total]``."""
    try:
        from tqdm import tqdm
    except ImportError:
        count = [0]

        def report(line: str) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {line}", flush=True)

        return report, lambda: None
    bar = tqdm(total=total, unit="row", file=sys.stderr)

    def report(line: str) -> None:
        bar.write(line)
        bar.update()

    return report, bar.close


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    # Providers always run in registry order: the floor and the reference first, so ratios are known as rows print.
    cfg = Config(
        device=device, quick=args.quick, cases=args.only,
        shapes=args.shapes or default_shapes(device.type, args.quick),
        dtypes=args.dtype or (("bf16",) if device.type == "cuda" else ("fp32",)),
        providers=tuple(p for p in PROVIDERS if p in args.providers), tokens=args.tokens, seed=args.seed,
        smoke=args.smoke,
    )
    env = environment(device)
    out_dir = args.out or default_out(env["device_slug"])
    meta = dict(
        env, argv=sys.argv[1:] if argv is None else list(argv), config={
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}, "device": str(device)},
        timing_policy=dataclasses.asdict(TimingPolicy.for_run(args.quick, args.smoke)), flop_convention=FLOP_CONVENTION,
        error_convention=(
            f"max abs error against rlcore.reference in float64, on the first {SAMPLE_ROWS} rows (fwd, fwd_bwd: "
            f"err_logp, err_entropy, err_dh); loss_*: err_loss = abs error of the scalar loss against the float64 "
            f"reference composition (rlcore.reference -> rlcore.policy_loss) on the whole batch, err_dh on its "
            f"first {SAMPLE_ROWS} loss rows"),
        logit_std=LOGIT_STD, threads=torch.get_num_threads(),
    )
    groups = plan(cfg)
    print(f"rlcore bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, rlcore {env['rlcore']}, "
          f"commit {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}")
    if device.type == "cpu" and env["load_avg_1m"] is not None and env["load_avg_1m"] > 0.5 * (env["cpu_count"] or 1):
        print(f"warning: load average {env['load_avg_1m']} on {env['cpu_count']} cores: other processes share the "
              "CPU, timings will be noisy (memory and error figures are not affected)")
    print(f"{len(groups)} groups x {len(cfg.providers)} providers; {FLOP_CONVENTION}", flush=True)

    t0 = time.perf_counter()
    report, close = _progress(len(groups) * len(cfg.providers))
    rows = []
    try:
        for row in run(cfg, env):
            rows.append(row)
            report(progress_line(row))
    finally:
        close()
        if rows:
            stem = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
            json_path, csv_path = write_files(rows, meta, list(env) + FIELDS, out_dir, stem)
            pngs = write_plots(rows, meta, out_dir, stem)
            print()
            print(table(rows))
            print(f"\nwrote {json_path} and {csv_path.name} ({len(rows)} rows) in {time.perf_counter() - t0:.0f} s")
            print(f"plots: {', '.join(p.name for p in pngs)}" if pngs else
                  f"plots: none ({plots_unavailable() or 'no measured rows'})")
    errors = sum(r["status"] == "error" for r in rows)
    if errors:
        print(f"{errors} row(s) failed: see the tracebacks above", file=sys.stderr)
    return 1 if errors else 0
