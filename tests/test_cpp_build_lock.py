"""The compiled CPU backend's build lock and cache folder (``rlcore/cpp.py``): a killed build never blocks a later
process, a wait for another's build is bounded, and two torch installations never share a cache folder.

The build itself is simulated (``cpp_extension.load`` replaced by a stand-in that behaves like its own lock file),
and the other process is a real one: it holds the lock, or holds it and is killed with SIGKILL mid-"build". No test
waits more than a few seconds.
"""

import os
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import rlcore.cpp

pytest.importorskip("filelock")

# A process that takes the build lock the way rlcore does, leaves cpp_extension's own lock file (as a build in
# progress does), says so, and then sleeps until it is killed.
_HOLDER = """
import sys, time
from pathlib import Path
from filelock import FileLock
build = Path(sys.argv[1])
lock = FileLock(str(build / "rlcore.lock"))
lock.acquire()
(build / "lock").write_text("")
print("holding", flush=True)
time.sleep(120)
"""


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    """An empty extension cache, a first use of the loader, and a stand-in for ``cpp_extension.load`` that, like the
    real one, would wait forever on a ``lock`` file it finds (here: it fails the test instead)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("RLCORE_CPP", raising=False)
    calls = []

    def fake_load(name, sources, build_directory, **kw):
        from torch.utils.file_baton import FileBaton

        baton = FileBaton(os.path.join(build_directory, "lock"))
        if not baton.try_acquire():
            raise AssertionError("cpp_extension would wait forever on the lock file of a killed build")
        baton.release()
        calls.append(build_directory)
        return types.SimpleNamespace(__name__="rlcore_cpu_stand_in")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    rlcore.cpp._reset()
    path = rlcore.cpp._build_directory()
    path.mkdir(parents=True)
    yield path, calls
    rlcore.cpp._reset()


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_killed_build_is_recovered(build_dir):
    """A build killed mid-way (SIGKILL: no cleanup runs) leaves cpp_extension's lock file; the next process removes
    it, says so in one line, and builds."""
    path, calls = build_dir
    proc = _holder(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (path / "lock").exists()
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="left by a build of the compiled CPU backend that was killed"):
        module = rlcore.cpp.load()
    assert module is not None and module.__name__ == "rlcore_cpu_stand_in" and calls == [str(path)]
    assert not (path / "lock").exists()
    assert time.monotonic() - t0 < 20


def test_waiting_for_another_build_is_bounded(build_dir, monkeypatch):
    """A live process holding the build lock past RLCORE_CPP_BUILD_TIMEOUT: this one gives up after that long,
    runs the chunked path with the one-line notice, and never touches the other's build."""
    path, calls = build_dir
    monkeypatch.setenv("RLCORE_CPP_BUILD_TIMEOUT", "0.5")
    proc = _holder(path)
    try:
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="unavailable .*held the build lock for over 0.5 s") as record:
            assert rlcore.cpp.load() is None
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert 0.4 < waited < 15 and calls == []
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert (path / "lock").exists()                  # the live build's file is left alone
    h, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the notice came once
        assert torch.equal(rlcore.linear_logprobs(h, w, t, backend="cpp"),
                           rlcore.linear_logprobs(h, w, t, backend="torch"))


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_timeout_is_named(build_dir, monkeypatch, value):
    monkeypatch.setenv("RLCORE_CPP_BUILD_TIMEOUT", value)
    with pytest.warns(RuntimeWarning, match="RLCORE_CPP_BUILD_TIMEOUT must be a number of seconds >= 0"):
        assert rlcore.cpp.load() is None


def test_two_torch_installations_get_two_cache_folders(monkeypatch):
    """Same versions, another install path (another virtual environment): another folder, so neither rebuilds
    over the other's binary."""
    first = rlcore.cpp._build_directory()
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/lib/python3/site-packages/torch/__init__.py")
    second = rlcore.cpp._build_directory()
    assert first.parent == second.parent and first != second
