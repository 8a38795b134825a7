"""Test setup: on a machine without CUDA, the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before ``rlcore.kernels`` is first imported (Triton reads it when the kernels are
decorated), hence here, at collection time.

The GPU compile gates (``tests/test_gpu_compile.py``, ``tests/test_divergence_compile.py``) compile hundreds of
kernels for real GPUs in a subprocess: minutes of CPU that need nothing of this session. Each declares its command as
a module-level ``BACKGROUND`` (``subprocess.Popen`` arguments), and its tests that need the output take the
``background_run`` fixture. The command starts as soon as collection is done, at a lower CPU priority, and those tests
run last, so the compiles fill the CPU time the rest of the suite leaves idle (most of it runs on one core: the
interpreter is single-threaded numpy).
"""

import os
import subprocess
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


def pytest_configure(config):
    # The interpreter evaluates both sides of tl.where in numpy; the discarded side may overflow or be 0 * inf.
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:triton\..*")

# The interpreter runs each Triton program in numpy: examples are kept few and small, and never timed.
settings.register_profile(
    "rlcore", deadline=None, max_examples=int(os.environ.get("RLCORE_HYPOTHESIS_EXAMPLES", "30")),
    suppress_health_check=[HealthCheck.too_slow], derandomize=True, print_blob=True,
)
settings.load_profile("rlcore")


@pytest.fixture(autouse=True)
def _cpp_backend_is_really_built(request):
    """A test of ``backend="cpp"`` that runs (it is skipped where no compiler exists) must run the compiled
    kernels: without this, a broken build would fall back to the chunked path and pass silently."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cpp":
        import rlcore.cpp

        assert rlcore.cpp.available(), f"the compiled CPU backend did not build: {rlcore.cpp.unavailable_reason()}"


class BackgroundRun:
    """A command run once per session in the background (a module's ``BACKGROUND``: ``subprocess.Popen`` arguments).

    Started by ``pytest_collection_finish`` when one of its module's tests is selected (else on first ``result``), in
    a process group of its own (so that it and the worker processes it spawns are stopped together), with ``nice``.
    Not in a session of its own: with the kernel's autogroup scheduling a new session gets a new group, whose nice
    level is 0 whatever its processes' own, and then it takes as much CPU as this session. Its output goes to
    temporary files, not pipes, so it never blocks on a full pipe while nobody reads it."""

    def __init__(self, args: list, *, cwd, env: dict, nice: int = 10):
        self.args, self.cwd, self.env, self.nice = args, cwd, env, nice
        self.proc = None

    def start(self) -> None:
        if self.proc is not None:
            return
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        nice = self.nice

        def lower_priority_own_group():
            os.setpgid(0, 0)
            os.nice(nice)

        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=self.out, stderr=self.err,
                                     text=True, preexec_fn=lower_priority_own_group)

    def result(self, timeout: float) -> tuple:
        """``(returncode, stdout, stderr)``, waiting at most ``timeout`` seconds from now (then it is stopped and
        ``subprocess.TimeoutExpired`` raised)."""
        self.start()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self.out.seek(0)
        self.err.seek(0)
        return code, self.out.read(), self.err.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


_RUNS: dict = {}     # module name -> its BackgroundRun


def _background(module):
    """The ``BackgroundRun`` of ``module``'s ``BACKGROUND`` command (made once), or ``None`` if it declares none."""
    spec = getattr(module, "BACKGROUND", None)
    if spec is None:
        return None
    if module.__name__ not in _RUNS:
        _RUNS[module.__name__] = BackgroundRun(**spec)
    return _RUNS[module.__name__]


@pytest.fixture(scope="module")
def background_run(request) -> BackgroundRun:
    """The test module's ``BACKGROUND`` command, already running: ``background_run.result(timeout)`` waits for it."""
    run = _background(request.module)
    assert run is not None, f"{request.module.__name__} declares no BACKGROUND command"
    return run


def _needs_background(item) -> bool:
    return "background_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_needs_background)           # stable: those tests last, every other one in the same order as before


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        for item in filter(_needs_background, session.items):
            if (run := _background(item.module)) is not None:
                run.start()


def pytest_sessionfinish(session, exitstatus):
    for run in _RUNS.values():                                      # a session stopped early (-x, Ctrl-C)
        run.stop()
