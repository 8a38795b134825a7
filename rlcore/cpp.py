"""The compiled CPU backend of ``linear_logprobs`` and ``linear_divergence`` (``backend="cpp"``): one extension,
``csrc/linear_logprobs_cpu.cpp`` and ``csrc/divergence_cpu.cpp`` (sharing ``csrc/cpu_tiles.h``), built on first use.

Why compile on first use (``torch.utils.cpp_extension.load``) rather than in ``setup.py``: a build-time extension
needs torch importable while pip builds the package, which either forces ``--no-build-isolation`` or makes pip fetch
a second torch (often the CUDA one) into the isolated build environment. Building on the user's machine also lets
the compiler target that machine's vector ISA (``-march=native``). The cost is one compile (30-60 s on 2 cores)
the first time a process uses the backend; the result is cached on disk and reused by every later process.

- Sources: ``rlcore/csrc`` (the symlink ``rlcore/csrc -> ../csrc``, shipped in the wheel as package data), copied
  into the build folder, so a checkout and an install of the same version share one binary.
- Cache: ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), under a folder named after rlcore's and
  torch's versions, Python's, a hash of torch's install path and a fingerprint of the CPU, so a cache shared between
  machines, upgrades or virtual environments never loads (or rebuilds over) a binary built for another;
  ``cpp_extension`` rebuilds when the sources or flags change.
- Lock: a build runs under an OS file lock (``filelock``, a torch dependency) on ``rlcore.lock`` in that folder.
  The kernel releases it when its holder dies, so a build killed by a timeout, Ctrl-C or the OOM killer never
  blocks a later process. Whoever holds it removes the lock file a killed ``cpp_extension`` build leaves behind
  (``lock``, on which ``cpp_extension`` itself would wait forever). A process waits at most
  ``$RLCORE_CPP_BUILD_TIMEOUT`` seconds (default 300) for another's build, then runs the chunked path with the
  notice below.
- Unavailable (no compiler, no ninja, a failed build): the chunked PyTorch path runs instead, after a one-line
  ``RuntimeWarning`` on first use; never an error. ``RLCORE_CPP=0`` turns the backend off without a notice.
  The choice is made where the op runs (its CPU kernel calls ``linear_logprobs_fwd`` / ``_bwd`` below), never
  while ``torch.compile`` traces: the graph holds the op with ``backend="cpp"`` either way.
- GEMMs: oneDNN's (``mkldnn::_linear_pointwise``) when torch has it, else ``at::mm`` (MKL/OpenBLAS);
  ``RLCORE_CPP_GEMM=aten`` forces the latter (to measure what the GEMM choice is worth).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import chunked

__all__ = ["available", "unavailable_reason", "load", "linear_logprobs_fwd", "linear_logprobs_bwd", "divergence_fwd",
           "divergence_bwd", "divergence_fused", "TILE_ROWS", "TILE_VOCAB", "DIVERGENCE_TILE_ROWS",
           "DIVERGENCE_TILE_VOCAB", "FUSED_DIVERGENCE_ELEMENTS"]

# Tile of the logits one GEMM and its epilogue work on: TILE_VOCAB vocabulary entries x TILE_ROWS positions, 8 MiB in
# FP32, resident in the 32 MiB L3 of the development machine while its epilogue and (backward) two GEMMs read it.
# Measured there (oneDNN, H = 1024): 2048 x 1024 tiles run each GEMM form at 400-470 GFLOP/s; 256-row tiles drop
# the dW GEMM to ~260.
TILE_ROWS = 2048
TILE_VOCAB = 1024
# The divergence holds two such tiles (one per head) while its epilogue reads both: half the vocabulary per tile keeps
# the pair at 8 MiB.
DIVERGENCE_TILE_ROWS = 2048
DIVERGENCE_TILE_VOCAB = 512
# The single pass of a reduced divergence (divergence_fused) holds a block of rows of both heads' logits over the whole
# vocabulary: 2 R V FP32 entries at most this many (R a multiple of 16: 256 rows at V = 32000, 64 MiB). Measured at
# N = 4096, H = 1024, V = 32000 on the 2-core CPU: 256 to 2048 rows all within the noise (6.5-7.0 s, against 8.5 s
# for the per-token op's separate forward and backward), so the least of them.
FUSED_DIVERGENCE_ELEMENTS = 2 ** 24

_SOURCES = ("linear_logprobs_cpu.cpp", "divergence_cpu.cpp")   # compiled, into one module
_HEADERS = ("cpu_tiles.h",)                                      # staged next to them
# -ffp-contract=off: the backward recomputes each logit with the forward's exact FP32 operations, so log p of a
# position's only (or dominant) entry is exactly 0; a multiply-add fused into ((acc + b) / T - lse) would not be.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]

_BUILD_TIMEOUT_S = 300.0
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_reason: Optional[str] = None
_tried = False


def _staged_sources(build_dir: Path) -> list[str]:
    """The package's sources, copied into the build folder (rewritten only when their content changed).

    Compiling the copy makes the build independent of where rlcore is installed: the checkout, an editable and a
    wheel install of the same version share one cached binary instead of rebuilding each other's (ninja rebuilds
    whenever a source path in its command line changes)."""
    staged = []
    for name in _SOURCES + _HEADERS:
        text = (Path(__file__).resolve().parent / "csrc" / name).read_bytes()
        dest = build_dir / name
        if not dest.exists() or dest.read_bytes() != text:
            tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_bytes(text)
            os.replace(tmp, dest)   # atomic: a concurrent build never reads half a file
        if name in _SOURCES:
            staged.append(str(dest))
    return staged


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (a binary built elsewhere could fault here)."""
    info = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()}|{platform.processor()}|{info}".encode()).hexdigest()[:12]


def _torch_install() -> str:
    """A short hash of where this torch is installed: two virtual environments with the same versions hold two
    torches (and link the binary against their own libraries), so they get two cache folders."""
    return hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]


def _build_directory() -> Path:
    from . import __version__

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    tag = (f"rlcore-{__version__}-torch{torch.__version__}-{_torch_install()}-py{sys.version_info.major}"
           f"{sys.version_info.minor}-{_cpu_fingerprint()}").replace("+", "_")
    return root / tag


def _build_timeout() -> float:
    """Seconds to wait for another process's build: ``$RLCORE_CPP_BUILD_TIMEOUT`` (a number >= 0), default 300."""
    text = os.environ.get("RLCORE_CPP_BUILD_TIMEOUT")
    if text is None:
        return _BUILD_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"RLCORE_CPP_BUILD_TIMEOUT must be a number of seconds >= 0, got {text!r}")
    return value


class BuildWaitTimeout(RuntimeError):
    """Another process held the build lock for longer than the bound."""


def _clear_killed_build(build_dir: Path) -> None:
    """Remove the ``lock`` file of a ``cpp_extension`` build that was killed (only called with the file lock held:
    every build of this folder runs under it, so no live build can own that file)."""
    baton = build_dir / "lock"
    try:
        baton.unlink()
    except FileNotFoundError:
        return
    warnings.warn(f"rlcore: removed {baton}, left by a build of the compiled CPU backend that was killed; "
                  "rebuilding", RuntimeWarning, stacklevel=4)


def _build() -> ModuleType:
    from filelock import FileLock, Timeout
    from torch.utils import cpp_extension

    build_dir = _build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    timeout = _build_timeout()
    lock = FileLock(str(build_dir / "rlcore.lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise BuildWaitTimeout(f"another process has held the build lock for over {timeout:g} s "
                               f"(RLCORE_CPP_BUILD_TIMEOUT): {lock.lock_file}") from None
    try:
        _clear_killed_build(build_dir)
        return cpp_extension.load(name="rlcore_cpu", sources=_staged_sources(build_dir), extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    finally:
        lock.release()


def _one_line(err: BaseException) -> str:
    """The gist of a build error (compiler logs run to pages): its type and first non-empty line, shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def load() -> Optional[ModuleType]:
    """The extension module, built on the first call of the process; ``None`` when it cannot be (with a one-line
    ``RuntimeWarning`` the first time, unless ``RLCORE_CPP=0`` turned it off)."""
    global _module, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("RLCORE_CPP", "1") == "0":
            _reason = "turned off by RLCORE_CPP=0"
        else:
            try:
                _module = _build()
            except Exception as err:   # any build failure means "use the chunked path", never an error
                _reason = _one_line(err)
                warnings.warn(f"rlcore: the compiled CPU backend is unavailable ({_reason}); using the chunked "
                              "PyTorch path (set RLCORE_CPP=0 to silence)", RuntimeWarning, stacklevel=3)
        _tried = True
    return _module


def available() -> bool:
    """Whether ``backend="cpp"`` runs the compiled kernels in this process (builds them on the first call).

    Not for traced code (it takes a lock, and may build): the op decides where it runs, and
    ``fused_policy_loss`` does not ask while ``torch.compile`` traces."""
    return load() is not None


def unavailable_reason() -> Optional[str]:
    """Why the compiled backend is not available, or ``None`` (it is, or has not been tried yet)."""
    return _reason


def _reset() -> None:
    """Forget the loaded module and any failure (tests: simulate a fresh process)."""
    global _module, _reason, _tried
    with _lock:
        _module, _reason, _tried = None, None, False


def _onednn() -> bool:
    return os.environ.get("RLCORE_CPP_GEMM", "onednn") != "aten" and torch.backends.mkldnn.enabled


def linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp: float, softcap: float = 0.0):
    """``(lse, raw entropy, target logit)``, each FP32 ``[N]``: the signature of ``rlcore.chunked``'s forward.
    Without the extension (the op called directly with ``backend="cpp"``), the chunked path computes it."""
    mod = load()
    if mod is None:
        return chunked.linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp, softcap)
    return mod.linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp, TILE_ROWS, TILE_VOCAB, _onednn(),
                                   float(softcap))


def linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, inv_temp: float,
                        ignore_index: int, compute_dh: bool = True, compute_dw: bool = True, compute_db: bool = True,
                        softcap: float = 0.0):
    """``(dh, dW, db)`` in the dtypes of ``hidden``, ``weight``, ``bias``; ``None`` for a gradient not computed.
    Without the extension, the chunked path computes them."""
    mod = load()
    if mod is None:
        return chunked.linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, inv_temp,
                                           ignore_index, compute_dh, compute_dw, compute_db, softcap)
    dh, dw, db = mod.linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, targets, lse, ent, inv_temp,
                                            ignore_index, compute_dh, compute_dw, compute_db, TILE_ROWS, TILE_VOCAB,
                                            _onednn(), float(softcap))
    return (dh if compute_dh else None), (dw if compute_dw else None), (db if compute_db and bias is not None
                                                                       else None)


_DIVERGENCE_KINDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


def divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, inv_temp: float):
    """``stats [4, N]`` FP32: the signature of ``rlcore.divergence.chunked_divergence_fwd``. Without the extension,
    the chunked path computes it."""
    mod = load()
    if mod is None:
        from .divergence import chunked_divergence_fwd

        return chunked_divergence_fwd(hs, ws, bs, ht, wt, bt, valid, kind, beta, inv_temp)
    return mod.divergence_fwd(hs, ws, bs, ht, wt, bt, valid, _DIVERGENCE_KINDS[kind], float(beta), float(inv_temp),
                              DIVERGENCE_TILE_ROWS, DIVERGENCE_TILE_VOCAB, _onednn())


def divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind: str, beta: float, inv_temp: float, needs: tuple):
    """``(dh_S, dW_S, db_S, dh_T, dW_T, db_T)``, ``None`` where ``needs`` is False or there is no bias: the signature
    of ``rlcore.divergence.chunked_divergence_bwd``. Without the extension, the chunked path computes them."""
    mod = load()
    if mod is None:
        from .divergence import chunked_divergence_bwd

        return chunked_divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, kind, beta, inv_temp, needs)
    grads = mod.divergence_bwd(grad, hs, ws, bs, ht, wt, bt, valid, stats, _DIVERGENCE_KINDS[kind], float(beta),
                               float(inv_temp), [bool(n) for n in needs], DIVERGENCE_TILE_ROWS,
                               DIVERGENCE_TILE_VOCAB, _onednn())
    return tuple(g if n else None for g, n in zip(grads, needs))


def _fused_rows(V: int) -> int:
    rows = FUSED_DIVERGENCE_ELEMENTS // (2 * V)
    return max(1, rows // 16 * 16 if rows >= 16 else rows)


def divergence_fused(weights, hs, ws, bs, ht, wt, bt, valid, kind: str, beta: float, inv_temp: float, needs: tuple):
    """``(stats [4, N], dh_S, dW_S, db_S, dh_T, dW_T, db_T)`` of ``sum_i weights_i D_i`` in one pass: the signature of
    ``rlcore.divergence.chunked_divergence_fused``, which computes them without the extension."""
    mod = load()
    if mod is None:
        from .divergence import chunked_divergence_fused

        return chunked_divergence_fused(weights, hs, ws, bs, ht, wt, bt, valid, kind, beta, inv_temp, needs)
    stats, *grads = mod.divergence_fused(weights, hs, ws, bs, ht, wt, bt, valid, _DIVERGENCE_KINDS[kind], float(beta),
                                         float(inv_temp), [bool(n) for n in needs], _fused_rows(ws.shape[0]),
                                         _onednn())
    return (stats, *(g if n else None for g, n in zip(grads, needs)))
