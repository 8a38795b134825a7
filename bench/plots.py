"""PNG figures of a run: for each case, time and peak memory against N, one line per provider.

One figure per case (``<stem>-<case>.png``). A case run on several heads or dtypes gets one row of panels per
(shape, dtype); each row has the time panel (median; the 20-80% band where every point of the line was timed at least
``BAND_MIN_REPS`` times, so a band is never drawn from one or two samples) and the peak-memory panel, both on log-log
axes with plain-number ticks (``200``, ``500``, ``1k``), since N spans 1k-64k tokens. Only measured rows are drawn; a
provider skipped at some N just has no point there. A panel with a single N draws every provider as a marker
(the GEMM floor too, which is a bare line elsewhere), so nothing vanishes for want of a second point.

matplotlib is an optional dependency (the ``bench`` extra). Without it ``write_plots`` writes nothing and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["write_plots", "plots_unavailable", "figure", "BAND_MIN_REPS"]

BAND_MIN_REPS = 5      # timed repetitions behind each point before a 20-80% band means anything

# A fixed style per provider, so the same provider looks the same in every figure and every run; the baselines are
# grey and dashed, rlcore solid.
_STYLE = {
    "gemm-floor": dict(color="0.55", linestyle="--", marker=""),
    "reference": dict(color="0.15", linestyle="--", marker="o"),
    "compile": dict(color="0.45", linestyle=":", marker="s"),
    "rlcore-torch": dict(color="tab:blue", marker="o"),
    "rlcore-cpp": dict(color="tab:green", marker="D"),
    "rlcore-1pass": dict(color="tab:cyan", marker="^"),
    "rlcore-triton": dict(color="tab:red", marker="o"),
    "rlcore-triton-fp32": dict(color="tab:orange", marker="v"),
    "liger-flce": dict(color="tab:purple", marker="x"),
    "liger-grpo": dict(color="tab:purple", marker="P", linestyle="-."),
    "cce": dict(color="tab:brown", marker="*"),
}


def plots_unavailable() -> Optional[str]:
    """Why no figure can be drawn here, or ``None``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)"
    return None


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    """The (shape, dtype) pairs of the measured rows, in run order."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((r["shape"], r["dtype"]), None)
    return list(seen)


def _plain(value: float, _pos=None) -> str:
    """A log-axis tick as a plain number: 0.5, 20, 500, 2k, 1.5M."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _log_y(ax) -> None:
    """Log y axis with ticks at 1, 2, 5 x 10^k written as plain numbers (matplotlib's default leaves a narrow range
    with no labelled tick at all)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if hi > 5 * lo else tuple(float(k) for k in range(1, 10))   # a narrow range: every digit
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(NullFormatter())


def figure(case: str, rows: list[dict], meta: dict):
    """The matplotlib figure of one case's measured ``rows`` (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")      # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = _panels(rows)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.8 * len(panels)), squeeze=False)
    for (shape, dtype), (ax_t, ax_m) in zip(panels, axes):
        sel = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        ns = sorted({r["N"] for r in sel})
        banded = False
        for prov in providers:
            pts = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["N"])
            n = [r["N"] for r in pts]
            style = dict(_STYLE.get(prov, {}))
            style.setdefault("linestyle", "-")
            if len(ns) == 1 and not style.get("marker"):
                style.update(marker="_", markersize=18, markeredgewidth=2)   # a lone point of a marker-less line
            ax_t.plot(n, [r["time_ms"] for r in pts], label=prov, **style)
            if all((r.get("reps") or 0) >= BAND_MIN_REPS and r.get("time_p20_ms") is not None for r in pts):
                banded = True
                ax_t.fill_between(n, [r["time_p20_ms"] for r in pts], [r["time_p80_ms"] for r in pts],
                                  color=style.get("color"), alpha=0.15, linewidth=0)
            if prov != "gemm-floor":            # the floor's buffers are not a provider's footprint
                ax_m.plot(n, [r["peak_mem_bytes"] / 2**20 for r in pts], label=prov, **style)
        H, V = sel[0]["H"], sel[0]["V"]
        time_label = "median time (ms)" + (", 20-80% band" if banded else "")
        for ax, what in ((ax_t, time_label), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [f"{n / 1024:g}k" if n >= 1024 and n % 128 == 0 else str(n) for n in ns])
            ax.xaxis.set_minor_locator(NullLocator())       # the N actually run, nothing between
            if len(ns) == 1:
                ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
            _log_y(ax)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(what)
            ax.set_title(f"{case}  {shape} (H={H}, V={V})  {dtype}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
    fig.suptitle(f"{meta.get('device', '?')}  torch {meta.get('torch', '?')}  triton {meta.get('triton', '?')}  "
                 f"rlcore {meta.get('rlcore', '?')} @ {str(meta.get('git_commit', '?'))[:10]}", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_case(case: str, rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(case, rows, meta)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """One PNG per case with measured rows, ``out_dir/<stem>-<case>.png``; returns their paths ([] without
    matplotlib: see ``plots_unavailable``)."""
    if plots_unavailable():
        return []
    measured = [r for r in rows if r["status"] == "ok" and r["time_ms"] is not None]
    paths = []
    for case in dict.fromkeys(r["case"] for r in measured):
        path = out_dir / f"{stem}-{case}.png"
        _draw_case(case, [r for r in measured if r["case"] == case], meta, path)
        paths.append(path)
    return paths
