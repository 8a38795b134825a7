"""The benchmark suite runs end to end: ``python -m bench --quick --shapes tiny`` in a subprocess, as a user would."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    cmd = [sys.executable, "-m", "bench", "--quick", "--shapes", "tiny", "--out", str(out)]
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
