"""The prepared GPU session's bookkeeping (``bench/gpu_session.py``): the file check and the summary's ratios.

The session itself runs in CI as ``bash bench/gpu_session.sh --dry-run`` (``.ci/run``), followed by its ``--check``;
here its two pure functions are checked on hand-made files, so a wrong ratio or a check that passes anything fails.
"""

import csv
import json

from bench import gpu_session
from bench.runner import FIELDS


def _write_session(out, bench_rows, accuracy=None, steps=None):
    (out / "env.json").write_text(json.dumps(dict(device="H100", dry_run=False,
                                                  steps=steps or {"env": {"status": "ok"}})))
    (out / "accuracy.json").write_text(json.dumps(accuracy or []))
    (out / "tests.xml").write_text('<testsuites><testsuite name="p" tests="3" failures="1" errors="0" skipped="1">'
                                   '</testsuite></testsuites>')
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in bench_rows:
            w.writerow({k: r.get(k) for k in FIELDS})
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["setting", "pass", "time_ms", "tflops", "fwd_regs", "dz_regs",
                                          "matmul_regs", "fwd_spills", "dz_spills", "matmul_spills", "error"])
        w.writeheader()
        w.writerow({"setting": "RLCORE_CONFIG_INDEX=0", "pass": "fwd", "time_ms": 30.0})
    (out / "session.log").write_text("done\n")
    (out / "summary.md").write_text(gpu_session.summarize(out))


def _row(case, provider, N, **kw):
    return dict(case=case, provider=provider, N=N, status="ok", **kw)


def test_summary_states_every_target_with_its_ratio(tmp_path):
    rows = [
        _row("fwd", "rlcore-triton", 4096, time_ms=32.0, time_vs_floor=1.07),
        _row("fwd_bwd", "rlcore-triton", 4096, time_ms=100.0, time_vs_floor=1.62, mem_vs_reference=0.04),
        _row("fwd_bwd", "rlcore-triton-fp32", 4096, time_ms=150.0, time_vs_floor=2.4),
        _row("loss_gspo", "rlcore-triton", 4096, time_ms=90.0, time_vs_floor=1.3),
    ]
    _write_session(tmp_path, rows)
    text = (tmp_path / "summary.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "1.070 | 1.1 | yes" in lines["forward log-probs within 1.1x of one bare GEMM"]
    assert "1.620 | 1.5 | NO" in lines["linear_logprobs fwd+bwd within 1.5x of the 3-GEMM floor"]
    assert "1.300 | 1.25 | NO" in lines["fused_policy_loss fwd+bwd within 1.25x of the 3-GEMM floor"]
    assert "1.500 | 2.0 | yes" in lines["precision='fp32' within 2x of bf16 (fwd+bwd)"]   # 150 / 100
    assert "0.040 | 0.05 | yes" in lines["peak extra memory under 5% of the reference's (fwd+bwd)"]
    assert "3 tests, 1 failures, 0 errors, 1 skipped" in text


def test_check_reports_missing_unparsable_and_failed(tmp_path):
    _write_session(tmp_path, [_row("fwd", "rlcore-triton", 64, time_ms=1.0)])
    assert gpu_session.check(tmp_path) == []
    (tmp_path / "sweep.csv").unlink()
    (tmp_path / "accuracy.json").write_text("{not json")
    problems = gpu_session.check(tmp_path)
    assert any(p.startswith("sweep.csv: missing") for p in problems)
    assert any(p.startswith("accuracy.json: does not parse") for p in problems)
    _write_session(tmp_path, [_row("fwd", "rlcore-triton", 64)], steps={"bench": {"status": "failed", "error": "x"}},
                   accuracy=[dict(shape="s", hidden="bf16", weight="bf16", precision="default", passed=False,
                                  failures=["dh: norm error"])])
    problems = gpu_session.check(tmp_path)
    assert any("step bench: failed" in p for p in problems) and any("accuracy:" in p for p in problems)
