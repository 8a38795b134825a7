"""The package works in every way it is used: from the checkout, editable, and from a wheel, with the Triton kernels
always importable as ``rlcore.kernels`` (the symlink ``rlcore/kernels -> ../kernels``) and never as ``kernels``."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rlcore.cpp

from .helpers import cpp_skip_reason

ROOT = Path(__file__).resolve().parent.parent
SMOKE = (
    "import torch, rlcore, rlcore.kernels.linear_logprobs as k; "
    "h, w = torch.randn(3, 8), torch.randn(11, 8); "
    "lp = rlcore.linear_logprobs(h, w, torch.tensor([1, 2, 3])); "
    "assert lp.shape == (3,) and bool((lp < 0).all()); "
    "print(rlcore.__file__); print(k.__file__); print(rlcore.cpp.available())"
)
# Where a compiler exists, the compiled CPU backend must build from the sources each copy of the package ships.
CPP_EXPECTED = str(cpp_skip_reason() is None)


def _run(cmd, cwd, env=None):
    env = {**(env or os.environ)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_layout():
    assert (ROOT / "rlcore" / "kernels").is_symlink()
    assert os.readlink(ROOT / "rlcore" / "kernels") == "../kernels"
    assert (ROOT / "rlcore" / "csrc").is_symlink() and os.readlink(ROOT / "rlcore" / "csrc") == "../csrc"
    assert all((ROOT / "rlcore" / "csrc" / f).is_file() for f in rlcore.cpp._SOURCES + rlcore.cpp._HEADERS)
    for entry in ("csrc", "kernels", "rlcore", "bench", "tests", "setup.py", "README.md"):
        assert (ROOT / entry).exists(), entry


def test_from_the_checkout(tmp_path):
    """``python -c`` in the repository root imports the checkout's rlcore (whatever is installed)."""
    out = _run([sys.executable, "-c", SMOKE], cwd=ROOT)
    assert Path(out.splitlines()[0]).resolve().is_relative_to(ROOT)
    assert out.splitlines()[2] == CPP_EXPECTED


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
         cwd=out)
    (path,) = out.glob("rlcore-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlcore/kernels/linear_logprobs.py" in names and "rlcore/kernels/__init__.py" in names
    for src in ("linear_logprobs_cpu.cpp", "divergence_cpu.cpp", "cpu_tiles.h"):
        assert f"rlcore/csrc/{src}" in names, "the compiled CPU backend builds from the wheel's sources"
    assert not [n for n in names if n.startswith("kernels/")], "no top-level `kernels` package (HF's kernel hub)"
    assert not [n for n in names if n.startswith("tests/") or n.startswith("bench/")]


def test_wheel_install_in_a_fresh_venv(wheel, tmp_path):
    """Install the wheel into a new virtual environment (torch and triton from the system site-packages) and use
    it from outside the checkout; then from inside it, where the checkout shadows the wheel as under pytest."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)], cwd=tmp_path)
    outside = _run([py, "-c", SMOKE], cwd=tmp_path).splitlines()
    for path in outside[:2]:
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"imported {path}, not the wheel's copy"
    assert outside[2] == CPP_EXPECTED
    inside = _run([py, "-c", SMOKE], cwd=ROOT).splitlines()
    assert Path(inside[1]).resolve().is_relative_to(ROOT)
