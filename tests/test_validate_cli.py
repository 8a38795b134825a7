"""``python -m rlcore.validate`` runs on this machine, prints its table, and passes (exit code 0)."""

import os
import subprocess
import sys
from pathlib import Path

from .helpers import cpp_skip_reason

ROOT = Path(__file__).resolve().parent.parent


def test_validate_quick_passes_and_prints_every_row():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it must set that itself on CPU
    proc = subprocess.run([sys.executable, "-m", "rlcore.validate", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("torch ", "triton ", "cpp "))]
    from rlcore.validate import MODES

    backends = {"torch", "triton"} | ({"cpp"} if cpp_skip_reason() is None else set())
    assert len(rows) == len(MODES) * len(backends), proc.stdout
    assert all(" PASS " in row for row in rows)
    assert "all checks passed" in proc.stdout
    for column in ("logp", "ent", "dh", "dW", "db", "err/bar"):
        assert column in proc.stdout


def test_validate_exits_nonzero_on_a_failure(monkeypatch, capsys):
    """The verdict is real: a backend that returns wrong gradients makes the run fail."""
    import rlcore.validate as validate

    real = validate.run_rlcore

    def broken(case, **kw):
        out = real(case, **kw)
        out["dW"] = out["dW"] * 1.01
        return out

    monkeypatch.setattr(validate, "run_rlcore", broken)
    monkeypatch.setattr(validate, "MODES", [("fp32", "fp32", "default")])
    assert validate.main(["--quick", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
