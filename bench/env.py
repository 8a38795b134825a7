"""Where and with what a benchmark ran: the metadata stamped on every result row."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["REPO_ROOT", "device_name", "device_slug", "environment"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable name: ``NVIDIA H100 80GB HBM3``, or ``AMD EPYC (2 threads)`` for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder-safe name for results: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
    else:   # "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" -> "cpu intel xeon platinum 8375c"
        name = "cpu " + re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", _cpu_model().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Device, versions, commit and date, as flat JSON-able fields."""
    import rlcore

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "rlcore": rlcore.__version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),   # tracked files modified since the commit
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        # CPU timings are only as good as the machine is idle: a load near the core count means shared cores.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
