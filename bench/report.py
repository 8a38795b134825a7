"""Output of a run: one progress line per row, a table at the end, and the JSON and CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

__all__ = ["progress_line", "table", "write_files"]


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ms(x: Optional[float]) -> str:
    """Milliseconds to three significant figures, whole numbers from 1000 up."""
    return "-" if x is None else (f"{x:,.0f}" if x >= 1000 else f"{x:.3g}")


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def progress_line(row: dict) -> str:
    """One line for a finished row: where it is, then its time, memory and error, or why it did not run."""
    where = f"{row['case']:<10} {row['shape']:<11} N={row['N']:<6} {row['dtype']:<5} {row['provider']:<14}"
    if row["status"] != "ok":
        return f"{where} {row['status']}: {row['reason']}"
    err = "" if row["err_logp"] is None else f"  err(logp) {row['err_logp']:.1e}"
    if row.get("err_loss") is not None:
        err += f"  err(loss) {row['err_loss']:.1e}"
    return (f"{where} {_ms(row['time_ms']):>8} ms  {_fmt(row['tflops'], '.3f')} TFLOP/s  "
            f"peak {_mib(row['peak_mem_bytes'])} MiB{err}  [{row['reps']} reps, {row['wall_s']:.1f} s]")


_COLUMNS = [  # (header, width, row -> text)
    ("case", 10, lambda r: r["case"]),
    ("shape", 11, lambda r: r["shape"]),
    ("N", 6, lambda r: str(r["N"])),
    ("dtype", 5, lambda r: r["dtype"]),
    ("provider", 14, lambda r: r["provider"]),
    ("median ms", 10, lambda r: _ms(r["time_ms"])),
    ("p20-p80 ms", 15, lambda r: "-" if r["time_ms"] is None else f"{_ms(r['time_p20_ms'])}-{_ms(r['time_p80_ms'])}"),
    ("reps", 4, lambda r: _fmt(r["reps"], "d")),
    ("TFLOP/s", 8, lambda r: _fmt(r["tflops"], ".3f")),
    ("x floor", 7, lambda r: _fmt(r["time_vs_floor"], ".2f")),
    ("x ref", 6, lambda r: _fmt(r["time_vs_reference"], ".2f")),
    ("peak MiB", 10, lambda r: _mib(r["peak_mem_bytes"])),
    ("mem x ref", 9, lambda r: _fmt(r["mem_vs_reference"], ".3f")),
    ("err logp", 8, lambda r: _fmt(r["err_logp"], ".1e")),
    ("err ent", 8, lambda r: _fmt(r["err_entropy"], ".1e")),
    ("err dh", 8, lambda r: _fmt(r["err_dh"], ".1e")),
    ("err loss", 8, lambda r: _fmt(r.get("err_loss"), ".1e")),
]


def table(rows: list[dict]) -> str:
    """The measured rows as an aligned text table, then one line per distinct reason a provider was skipped."""
    measured = [r for r in rows if r["status"] == "ok"]
    lines = ["  ".join(h.rjust(w) if i >= 5 else h.ljust(w) for i, (h, w, _) in enumerate(_COLUMNS))]
    lines.append("-" * len(lines[0]))
    prev_group = None
    for r in measured:
        group = (r["case"], r["shape"], r["N"], r["dtype"])
        if prev_group is not None and group != prev_group:
            lines.append("")
        prev_group = group
        lines.append("  ".join(f(r).rjust(w) if i >= 5 else f(r).ljust(w) for i, (_, w, f) in enumerate(_COLUMNS)))
    not_run: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if r["status"] != "ok":
            key = (r["provider"], r["status"], r["reason"])
            not_run[key] = not_run.get(key, 0) + 1
    if not_run:
        lines.append("")
        for (prov, status, reason), n in not_run.items():
            lines.append(f"{prov} {status} ({n} row{'s' if n > 1 else ''}): {reason}")
    return "\n".join(lines)


def write_files(rows: list[dict], meta: dict, fields: list[str], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``{"meta": ..., "rows": [...]}``) and ``<stem>.csv`` (one line per row, ``fields``
    as header) under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path
