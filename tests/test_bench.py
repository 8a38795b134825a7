"""The benchmark suite runs end to end: ``python -m bench --quick --shapes tiny --smoke`` in a subprocess, as a user
would (``--smoke``: one timed call per row, no warm-up; every provider, case and check as in any run), then
``python -m bench.compare`` on what it wrote."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.compare import compare, load

HAS_CUDA = torch.cuda.is_available()
REPO_ROOT = Path(__file__).resolve().parent.parent

ENV_FIELDS = ["device", "device_slug", "torch", "triton", "rlcore", "git_commit", "date"]
ROW_FIELDS = ["case", "provider", "shape", "H", "V", "N", "dtype", "status", "reason", "time_ms", "time_p20_ms",
              "time_p80_ms", "reps", "tflops", "time_vs_floor", "time_vs_reference", "peak_mem_bytes",
              "mem_vs_reference", "err_logp", "err_entropy", "err_dh", "err_loss"]
LOSS_CASES = ("loss_gspo", "loss_cispo", "loss_apo")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)   # the benchmark must skip the Triton provider on CPU, not time the interpreter
    cmd = [sys.executable, "-m", "bench", "--quick", "--shapes", "tiny", "--smoke", "--out", str(out)]
    if HAS_CUDA:   # time the Triton kernels too, but leave out torch.compile's minutes of compiling
        cmd += ["--providers", "gemm-floor,reference,rlcore-torch,rlcore-1pass,rlcore-triton"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def test_exits_cleanly(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_writes_json_and_csv_with_the_same_rows(tiny_run):
    _, out = tiny_run
    (json_path,), (csv_path,) = list(out.glob("*.json")), list(out.glob("*.csv"))
    data = json.loads(json_path.read_text())
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(data["rows"]) == len(csv_rows) > 0
    assert "flop_convention" in data["meta"]
    for row in csv_rows:
        assert set(ENV_FIELDS + ROW_FIELDS) <= set(row)
        assert all(row[k] for k in ENV_FIELDS)


def test_rows_are_complete_and_sane(tiny_run):
    _, out = tiny_run
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    for row in rows:
        assert set(ENV_FIELDS + ROW_FIELDS) <= set(row)
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], row
    ok = {(r["case"], r["N"], r["provider"]): r for r in rows if r["status"] == "ok"}
    # Every (case, N) of tiny has the floor, the eager reference and the chunked rlcore path measured on CPU; the
    # policy-loss cases also the single-pass fused loss.
    measured = ("gemm-floor", "reference", "rlcore-torch") + (("rlcore-triton",) if HAS_CUDA else ())
    for case in ("fwd", "fwd_bwd") + LOSS_CASES:
        for N in (100, 1024):
            for provider in measured + (("rlcore-1pass",) if case in LOSS_CASES else ()):
                assert (case, N, provider) in ok, (case, N, provider)
    for (case, _, provider), row in ok.items():
        for k in ("time_ms", "time_p20_ms", "time_p80_ms", "tflops", "time_vs_floor", "time_vs_reference",
                  "mem_vs_reference"):
            assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)
        assert row["time_p20_ms"] <= row["time_ms"] <= row["time_p80_ms"]
        assert row["peak_mem_bytes"] > 0
        if provider == "gemm-floor":
            continue
        if case in LOSS_CASES:
            # a loss provider returns the loss and its gradients: the scalar loss and dh are checked, not logp
            assert row["err_logp"] is None and row["err_entropy"] is None, row
            assert row["err_loss"] < 1e-3, row
            assert row["err_dh"] < 1e-3, row
            assert row["err_rows"] > 0, row
            continue
        assert row["err_loss"] is None, row
        assert row["err_logp"] < 1e-3, row
        if case == "fwd_bwd":
            assert row["err_entropy"] < 1e-3, row
            assert row["err_dh"] < 1e-3, row
        else:
            assert row["err_entropy"] is None


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_triton_and_compile_are_skipped_with_reasons_on_cpu(tiny_run):
    _, out = tiny_run
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    skipped = {r["provider"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "CUDA" in skipped["rlcore-triton"]
    assert "compile" in skipped["compile"]


def test_single_pass_provider_runs_the_loss_cases_only(tiny_run):
    _, out = tiny_run
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    one_pass = [r for r in rows if r["provider"] == "rlcore-1pass"]
    assert {r["case"] for r in one_pass} == {"fwd", "fwd_bwd", *LOSS_CASES}
    for r in one_pass:
        if r["case"] in LOSS_CASES:
            assert r["status"] == "ok", r
        else:
            assert r["status"] == "skipped" and "loss_" in r["reason"], r


PEERS = ("liger-flce", "liger-grpo", "cce")


def test_peers_run_or_say_why_not(tiny_run):
    """Each peer either ran (when installed) or was skipped with a reason that says what is missing."""
    _, out = tiny_run
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    for peer in PEERS:
        peer_rows = [r for r in rows if r["provider"] == peer]
        assert len(peer_rows) == 2 * (2 + len(LOSS_CASES)), peer       # every (case, N) has a row
        for r in peer_rows:
            if r["status"] == "skipped":
                assert any(w in r["reason"] for w in ("not installed", "CUDA", "entropy", "loss")), r



def test_liger_grpo_computes_rlcores_loss_when_installed(tiny_run):
    """Liger's chunked GRPO loss is pure PyTorch, so it runs on CPU: configured as ``LigerGRPO.options`` says, its loss
    and dh equal the float64 truth of rlcore's preset (a wrong mapping would be off by O(1))."""
    pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed (the bench extra has it)")
    _, out = tiny_run
    rows = [r for r in json.loads(next(out.glob("*.json")).read_text())["rows"]
            if r["provider"] == "liger-grpo" and r["case"] in ("loss_gspo", "loss_cispo")]
    assert len(rows) == 4
    for r in rows:
        assert r["status"] == "ok", r
        assert r["err_loss"] < 1e-6 and r["err_dh"] < 1e-5, r


def test_peer_coverage_reasons():
    """What each peer cannot compute, whether or not it is installed here."""
    from bench.cases import CASES
    from bench.providers import PROVIDERS

    liger, flce, cce = PROVIDERS["liger-grpo"], PROVIDERS["liger-flce"], PROVIDERS["cce"]
    assert "squared-regression" in liger.not_for(CASES["loss_apo"])
    assert "loss_" in liger.not_for(CASES["fwd"])
    assert liger.not_for(CASES["loss_gspo"]) is None and liger.not_for(CASES["loss_cispo"]) is None
    for peer in (flce, cce):
        assert "entropy" in peer.not_for(CASES["fwd_bwd"])
        assert peer.not_for(CASES["fwd"]) is None and peer.not_for(CASES["loss_gspo"]) is None
    # Liger's GSPO and CISPO settings follow rlcore's presets (its CISPO bound is absolute: 1 + eps_high)
    from rlcore.losses import LOSSES

    assert liger.options("gspo")["epsilon_low"] == LOSSES["gspo"].default("eps_low")
    assert liger.options("cispo")["epsilon_high"] == 1 + LOSSES["cispo"].default("eps_high")


def test_writes_one_png_per_case(tiny_run):
    proc, out = tiny_run
    assert len(list(out.glob("*.png"))) == 2 + len(LOSS_CASES)
    stem = next(out.glob("*.json")).stem
    for case in ("fwd", "fwd_bwd") + LOSS_CASES:
        png = out / f"{stem}-{case}.png"
        assert png.is_file(), (png, proc.stdout[-2000:])
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert f"plots: {stem}-fwd.png" in proc.stdout


def test_progress_bar_on_stderr(tiny_run):
    proc, _ = tiny_run
    # tqdm's bar: "k/total [elapsed<remaining, rate]" per update, the total being groups x providers
    assert "row/s]" in proc.stderr or "s/row]" in proc.stderr, proc.stderr[-2000:]


def test_compare_cli_on_a_run_against_itself(tiny_run):
    _, out = tiny_run
    path = next(out.glob("*.json"))
    proc = subprocess.run([sys.executable, "-m", "bench.compare", str(path), str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("A: ") and lines[1].startswith("B: ")
    measured = [r for r in json.loads(path.read_text())["rows"] if r["status"] == "ok"]
    body = [ln for ln in lines if ln.split()[:1] and ln.split()[0] in ("fwd", "fwd_bwd", *LOSS_CASES)]
    assert len(body) == len(measured)
    for ln in body:        # a run against itself: every time and memory ratio is exactly 1
        cells = ln.split()
        assert cells[7] == "1.00" and cells[-1] == "1.00", ln


def _row(provider, time_ms, mem, status="ok", reason=None, N=1024):
    return {"case": "fwd", "shape": "tiny", "dtype": "fp32", "N": N, "provider": provider, "status": status,
            "reason": reason, "time_ms": time_ms, "peak_mem_bytes": mem, "time_vs_floor": None}


def test_compare_ratios_and_unmatched_rows():
    meta = {"device": "d", "git_commit": "abc"}
    a = {("fwd", "tiny", "fp32", 1024, p): r for p, r in (
        ("reference", _row("reference", 10.0, 2**20)), ("rlcore-torch", _row("rlcore-torch", 4.0, 2**21)),
        ("cce", _row("cce", None, None, "skipped", "cut-cross-entropy is not installed")))}
    b = {("fwd", "tiny", "fp32", 1024, p): r for p, r in (
        ("reference", _row("reference", 12.5, 2**20)), ("rlcore-torch", _row("rlcore-torch", 2.0, 2**20)),
        ("cce", _row("cce", 3.0, 2**19)))}
    b[("fwd", "tiny", "fp32", 4096, "reference")] = _row("reference", 40.0, 2**22, N=4096)
    text = compare(meta, a, meta, b)
    ref = next(ln for ln in text.splitlines() if " reference " in ln and " 1024 " in ln).split()
    assert ref[7] == "1.25" and ref[-1] == "1.00", ref
    ours = next(ln for ln in text.splitlines() if " rlcore-torch " in ln).split()
    assert ours[7] == "0.50" and ours[-1] == "0.50", ours
    assert "fwd tiny fp32 1024 cce: skipped in A (cut-cross-entropy is not installed)" in text
    assert "fwd tiny fp32 4096 reference: only in B" in text


def test_compare_rejects_a_file_that_is_not_a_run(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a bench result"):
        load(bad)
    proc = subprocess.run([sys.executable, "-m", "bench.compare", str(bad), str(bad)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a bench result" in proc.stderr
