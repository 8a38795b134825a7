"""``python -m bench.compare A.json B.json``: two runs side by side, with the ratios B / A.

Rows are matched by (case, shape, dtype, N, provider). For each pair it prints both medians and ``B / A``, both runs'
time relative to their own GEMM floor (the figure that travels between machines: each is measured within its run), and
both peak memories with their ratio. Rows present in one run only, and rows measured in one but skipped in the other,
are listed after the table with the reason.

Typical uses: before/after a change on one machine (``B / A`` below 1 is a speed-up), or two GPUs on one commit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from .report import _fmt as _f, _mib, _ms

__all__ = ["load", "compare", "main"]

Key = tuple[str, str, str, int, str]


def load(path: Path) -> tuple[dict, dict[Key, dict]]:
    """A run's ``meta`` and its rows by key. Raises ``ValueError`` naming the file if it is not a bench JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
        raise ValueError(f"{path}: not a bench result (expected the {{'meta', 'rows'}} JSON that python -m bench "
                         "writes)")
    rows = {}
    for r in data["rows"]:
        rows[(r["case"], r["shape"], r["dtype"], int(r["N"]), r["provider"])] = r
    return data["meta"], rows


def _ratio(b: Optional[float], a: Optional[float]) -> Optional[float]:
    if a is None or b is None or a <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return b / a


_COLUMNS = [  # (header, width, (key, a, b, time ratio, memory ratio) -> text); the first 5 are left-aligned
    ("case", 10, lambda k, a, b, rt, rm: k[0]),
    ("shape", 11, lambda k, a, b, rt, rm: k[1]),
    ("dtype", 5, lambda k, a, b, rt, rm: k[2]),
    ("N", 6, lambda k, a, b, rt, rm: str(k[3])),
    ("provider", 18, lambda k, a, b, rt, rm: k[4]),
    ("A ms", 9, lambda k, a, b, rt, rm: _ms(a["time_ms"])),
    ("B ms", 9, lambda k, a, b, rt, rm: _ms(b["time_ms"])),
    ("B/A", 6, lambda k, a, b, rt, rm: _f(rt, ".2f")),
    ("A x floor", 9, lambda k, a, b, rt, rm: _f(a.get("time_vs_floor"), ".2f")),
    ("B x floor", 9, lambda k, a, b, rt, rm: _f(b.get("time_vs_floor"), ".2f")),
    ("A MiB", 9, lambda k, a, b, rt, rm: _mib(a["peak_mem_bytes"])),
    ("B MiB", 9, lambda k, a, b, rt, rm: _mib(b["peak_mem_bytes"])),
    ("mem B/A", 7, lambda k, a, b, rt, rm: _f(rm, ".2f")),
]


def _line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, (_h, w, _fn)) in enumerate(zip(cells, _COLUMNS)))


def _describe(meta: dict) -> str:
    commit = str(meta.get("git_commit", "?"))[:10] + (" (dirty)" if meta.get("git_dirty") else "")
    return (f"{meta.get('device', '?')}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
            f"rlcore {meta.get('rlcore', '?')} @ {commit}; {meta.get('date', '?')}")


def compare(meta_a: dict, rows_a: dict[Key, dict], meta_b: dict, rows_b: dict[Key, dict]) -> str:
    """The side-by-side report as text (see the module docstring)."""
    out = [f"A: {_describe(meta_a)}", f"B: {_describe(meta_b)}", ""]
    out.append(_line([h for h, _, _ in _COLUMNS]))
    out.append("-" * len(out[-1]))
    notes, prev = [], None
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        a, b = rows_a.get(key), rows_b.get(key)
        if a is None or b is None:
            notes.append(f"{' '.join(map(str, key))}: only in {'A' if b is None else 'B'}")
            continue
        if a["status"] != "ok" or b["status"] != "ok":
            if a["status"] == "ok" or b["status"] == "ok":
                missing = ("A", a) if a["status"] != "ok" else ("B", b)
                notes.append(f"{' '.join(map(str, key))}: {missing[1]['status']} in {missing[0]} "
                             f"({missing[1]['reason']})")
            continue
        if prev is not None and key[:4] != prev:
            out.append("")
        prev = key[:4]
        rt, rm = _ratio(b["time_ms"], a["time_ms"]), _ratio(b["peak_mem_bytes"], a["peak_mem_bytes"])
        out.append(_line([f(key, a, b, rt, rm) for _, _, f in _COLUMNS]))
    if prev is None:
        out.append("(no row was measured in both runs)")
    if notes:
        out += ["", "Not compared:"] + [f"  {n}" for n in notes]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                epilog="B/A below 1: B is faster (or smaller). 'x floor' is each run's time divided "
                                       "by its own GEMM floor.")
    p.add_argument("a", type=Path, help="the baseline run's JSON (python -m bench writes it next to the CSV)")
    p.add_argument("b", type=Path, help="the run to compare with it")
    args = p.parse_args(argv)
    try:
        meta_a, rows_a = load(args.a)
        meta_b, rows_b = load(args.b)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(compare(meta_a, rows_a, meta_b, rows_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
