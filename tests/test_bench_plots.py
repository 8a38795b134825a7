"""``bench.plots``: what a reader of the figures needs. The GEMM floor is visible on a panel with one N, the log axes
carry labelled ticks in plain numbers, and the 20-80% band is drawn only behind enough repetitions."""

import pytest

pytest.importorskip("matplotlib")

from bench.plots import BAND_MIN_REPS, _plain, figure  # noqa: E402


def _rows(ns, reps, providers=("gemm-floor", "reference", "rlcore-torch")):
    rows = []
    for k, prov in enumerate(providers):
        for n in ns:
            t = (k + 1) * 100.0 * n / 1024 + 310
            rows.append(dict(case="fwd", shape="cpu-small", dtype="fp32", H=1024, V=32000, provider=prov, N=n,
                             status="ok", time_ms=t, time_p20_ms=0.95 * t, time_p80_ms=1.05 * t, reps=reps,
                             peak_mem_bytes=(k + 1) * 2**27))
    return rows


def _draw(rows):
    import matplotlib.pyplot as plt

    fig = figure("fwd", rows, dict(device="cpu"))
    fig.canvas.draw()
    return fig, plt


def _labels(axis):
    lo, hi = axis.get_view_interval()
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if lo <= v <= hi and t.get_text()]


def test_single_n_panels_show_every_provider_the_floor_included():
    fig, plt = _draw(_rows([8192], reps=3))
    ax_t, ax_m = fig.axes[:2]
    floor = [line for line in ax_t.get_lines() if line.get_label() == "gemm-floor"]
    assert floor and floor[0].get_marker() not in ("", "None", None) and floor[0].get_markersize() > 5
    lo, hi = ax_t.get_xlim()
    assert lo < 8192 < hi
    plt.close(fig)


def test_log_axes_have_readable_ticks():
    """A narrow time range (310-650 ms) still gets at least two labelled ticks on each log axis, in plain numbers."""
    fig, plt = _draw(_rows([1024, 2048], reps=3))
    for ax in fig.axes[:2]:
        labels = _labels(ax.yaxis)
        assert len(labels) >= 2, labels
        assert not any("$" in x or "times" in x for x in labels), labels
    plt.close(fig)
    assert [_plain(x) for x in (0.5, 20, 500, 2000, 1.5e6)] == ["0.5", "20", "500", "2k", "1.5M"]


@pytest.mark.parametrize("reps, band", [(1, False), (BAND_MIN_REPS - 1, False), (BAND_MIN_REPS, True)])
def test_the_band_needs_enough_repetitions(reps, band):
    fig, plt = _draw(_rows([1024, 4096], reps=reps))
    ax_t = fig.axes[0]
    assert bool(ax_t.collections) == band
    assert ("20-80% band" in ax_t.get_ylabel()) == band
    plt.close(fig)
