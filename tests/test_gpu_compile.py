"""Every shipped Triton launch configuration builds for real GPUs (sm_80 A100, sm_90 H100), checked without a GPU.

Why this exists: without a GPU the numerical tests run the kernels in Triton's CPU interpreter, which never invokes
the GPU compiler. It happily runs tiles whose software pipeline needs more shared memory than the GPU has (the
launch would fail with ``OutOfResources``), configs that spill registers to local memory, or dots that miss the
tensor cores. ``tests/gpu_compile_check.py`` compiles each ``(kernel, config, dtypes, mode)`` combination that
``rlcore`` can launch all the way to a cubin for each architecture (``triton.compile`` with an explicit
``GPUTarget``; ``ptxas`` ships with Triton) and reports what the binaries need; this module asserts on that report.

The compiles run in a subprocess because this pytest session sets ``TRITON_INTERPRET=1`` (no CUDA), under which
``@triton.jit`` yields interpreter objects that cannot be compiled. The combinations are enumerated from
``CONFIGS`` and the op's launched modes (for the segment reductions: their ``CONFIGS`` times the value and offset
dtypes), so a newly added config or mode is covered with no change here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("needs triton with its NVIDIA backend (ptxas ships with it)", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "gpu_compile_check.py"
REPO_ROOT = SCRIPT.parent.parent


def _load_check_module():
    """Import ``gpu_compile_check.py`` by path (tests/ is not a package); importing it has no side effects."""
    spec = importlib.util.spec_from_file_location("rlcore_gpu_compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _load_check_module()
# RLCORE_GATE_DEFAULTS_ONLY=1: only each table's default config (every variant and shape), as CI's second run under
# another Triton version does, to keep its time small.
DEFAULTS_ONLY = os.environ.get("RLCORE_GATE_DEFAULTS_ONLY") == "1"
JOBS = [job for job in CHECK.enumerate_jobs() if not DEFAULTS_ONLY or job["index"] == 0]
IDS = [job["id"] for job in JOBS]
DOT_IDS = [job["id"] for job in JOBS if job["mode"] is not None]  # segment reductions, dz from logits: no dot


# The compile script, run once (about 4.5 CPU-minutes on 2 cores): started when collection is done, it runs beside the
# rest of the suite, and these tests run last (conftest.py).
BACKGROUND = dict(
    args=[sys.executable, str(SCRIPT), "--workers", "2", *(["--defaults-only"] if DEFAULTS_ONLY else [])],
    cwd=REPO_ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
)


@pytest.fixture(scope="module")
def records(background_run) -> dict:
    """The compile script's records, indexed by id."""
    code, out, err = background_run.result(timeout=900)
    if code != 0:
        pytest.fail(f"{SCRIPT.name} exited with {code}:\n{err[-6000:]}")
    return {record["id"]: record for record in json.loads(out)}


def _compiled(records: dict, job_id: str) -> dict:
    record = records[job_id]
    if not record["ok"]:
        pytest.skip("did not compile: see test_compiles")
    return record


def test_every_combination_was_compiled(records):
    assert sorted(records) == sorted(IDS)
    assert {job["arch"] for job in JOBS} == set(CHECK.ARCHS)
    # both segment kernels, with fp32 and bf16 values and int32 and int64 offsets, on every architecture
    segments = {(job["kernel"], *job["inputs"], job["arch"]) for job in JOBS if job["mode"] is None}
    assert {(k, v, o, a) for k in ("segment_sum", "segment_broadcast") for v in ("fp32", "bf16")
            for o in ("i32", "i64") for a in CHECK.ARCHS} <= segments


@pytest.mark.parametrize("job_id", IDS)
def test_compiles(records, job_id):
    record = records[job_id]
    assert record["ok"], f"{job_id} failed to build:\n{record['error']}"


@pytest.mark.parametrize("job_id", IDS)
def test_shared_memory_fits(records, job_id):
    """Shared memory per block within the device's opt-in maximum (Triton refuses the launch above it)."""
    record = _compiled(records, job_id)
    limit = CHECK.SHARED_MEMORY_LIMIT[record["arch"]]
    assert record["shared"] <= limit, (
        f"{job_id} needs {record['shared']} bytes of shared memory; sm_{record['arch']} allows {limit} per block"
    )


@pytest.mark.parametrize("job_id", DOT_IDS)
def test_uses_tensor_cores(records, job_id):
    """bf16/fp16 and tf32/tf32x3 dots must lower to the architecture's tensor-core instruction: warp-group ``wgmma``
    on sm_90 (``mma.sync`` there runs at about half of Hopper's tensor-core rate, so it is rejected), ``mma.sync``
    on sm_80. An FMA fallback would still be correct, just many times slower."""
    record = _compiled(records, job_id)
    mode = record["mode"]
    if mode["cast_fp32"] and mode["dot_precision"] not in ("tf32", "tf32x3"):
        pytest.skip(f"DOT_PRECISION={mode['dot_precision']!r} does not use tensor cores")
    if record["arch"] >= 90:
        assert record["ptx_wgmma"], f"{job_id}: no wgmma in the PTX"
        assert not record["ptx_mma_sync"], f"{job_id}: mma.sync on sm_90 (Hopper's wgmma is twice as fast)"
    else:
        assert record["ptx_mma_sync"], f"{job_id}: no mma.sync in the PTX"


@pytest.mark.parametrize("job_id", DOT_IDS)
def test_inner_loop_is_software_pipelined(records, job_id):
    """With ``num_stages > 1`` the GEMM loop's tiles are fetched asynchronously ahead of use (``cp.async``, or TMA's
    ``cp.async.bulk``): without it every slice waits for its load, and the kernel runs at memory latency, not at
    tensor-core speed. Checked on the very binary a launch at the real shapes runs (``launch_ints``)."""
    record = _compiled(records, job_id)
    if record["config"]["num_stages"] <= 1:
        pytest.skip("num_stages = 1: no pipeline asked for")
    assert record["pipelined"], f"{job_id}: the inner loop is not software-pipelined (no cp.async in the PTX)"


def test_every_variant_and_shape_is_built():
    """The default config of each table is built in every bias / entropy / soft-cap variant, at a shape whose ints
    are all multiples of 16 and at one whose row count is not (different specialisations, different binaries)."""
    for kernel, flags in (("fwd", {"HAS_BIAS", "Z_OUT", "SOFTCAP"}), ("dz", {"HAS_BIAS", "HAS_GRAD_ENT", "SOFTCAP"}),
                          ("dz_from_logits", {"HAS_GRAD_ENT", "SOFTCAP"})):
        built = {tuple(sorted(k for k in flags if job["constexprs"].get(k))) for job in JOBS
                 if job["kernel"] == kernel and job["index"] == 0}
        assert len(built) == 2 ** len(flags), f"{kernel}: variants built {built}"
    for kernel in ("fwd", "dz", "matmul"):
        assert {job["shape"] for job in JOBS if job["kernel"] == kernel and job["index"] == 0} == set(CHECK.SHAPES)
    ragged = next(job for job in JOBS if job["kernel"] == "fwd" and job["shape"] == "ragged")
    assert "N" not in CHECK._divisible(ragged) and "N" in CHECK._divisible(
        next(job for job in JOBS if job["kernel"] == "fwd" and job["shape"] == "aligned"))


@pytest.mark.parametrize("job_id", IDS)
def test_row_offsets_are_int64(records, job_id):
    """Row offsets of h and W (and of the fp32 dh / dW buffers in the backward) are computed in int64.

    ``h_ptr + n * stride_hn`` reaches ``N * H`` elements and ``w_ptr + v * stride_wv`` reaches ``V * H``: 2^31 already
    at 256k tokens (or a 256k vocabulary) with H = 8192, where an int32 product wraps and addresses out of bounds. The
    check reads the TTIR: every ``tt.addptr`` on a pointer derived from the argument, whose offset depends on the
    row stride (``stride_hn`` / ``stride_wv``; ``H`` for the contiguous dh / dW), must have an ``i64`` offset type,
    and there must be at least one (see ``gpu_compile_check.int64_row_offsets``). The segment reductions likewise:
    row offsets ``k * stride`` (``K N`` elements), and the sum's token offsets, which come from ``cu_seqlens``.
    """
    record = _compiled(records, job_id)
    int32 = sorted(name for name, ok in record["int64_offsets"].items() if not ok)
    assert not int32, f"{job_id}: row offsets of {int32} are not computed in int64"


def spill_allowance(record: dict) -> int:
    """Spilled bytes tolerated for ``record``: 0, except one known case. Under Triton 3.6 the soft-capped dz kernel
    with the entropy term at its 128 x 128 half-precision tile on sm_90 spills 16-56 bytes per thread (measured on
    the four bf16/fp16 x bias builds of the aligned shape; Triton 3.9 spills none there, and neither spills on sm_80).
    Bounded, so that any growth still fails."""
    import triton

    c = record["constexprs"]
    known = (triton.__version__.startswith("3.6") and record["kernel"] == "dz" and record["arch"] == 90
             and record["table"] == "half" and c.get("SOFTCAP") and c.get("HAS_GRAD_ENT"))
    return 64 if known else 0


@pytest.mark.parametrize("job_id", IDS)
def test_no_register_spills(records, job_id):
    """No spills to local memory (but the one known case of ``spill_allowance``). Read from the compiled metadata
    when this Triton has ``n_spills`` there (it fills it only when loading on a GPU), else from ``ptxas -v`` on the
    very cubin; skipped when neither reports it."""
    record = _compiled(records, job_id)
    if record["n_spills"] is None:
        pytest.skip("spill count not reported by this Triton / ptxas")
    assert record["n_spills"] <= spill_allowance(record), (
        f"{job_id} spills {record['n_spills']} bytes (stores + loads) per thread with {record['n_regs']} registers"
    )


# --- the TTIR check itself, on excerpts of real Triton 3.9 output -----------------------------------------------------

_TTIR_INT64 = """
  tt.func public @k(%h_ptr: !tt.ptr<bf16> loc("h_ptr"(#loc)), %stride_hn: i32 loc("stride_hn"(#loc))) {
    %p_h = tt.expand_dims %o_n_10 {axis = 1 : i32} : tensor<128xi32> -> tensor<128x1xi32> loc(#loc173)
    %p_h_24 = arith.extsi %p_h : tensor<128x1xi32> to tensor<128x1xi64> loc(#loc173)
    %p_h_25 = arith.extsi %stride_hn : i32 to i64 loc(#loc173)
    %p_h_26 = tt.splat %p_h_25 : i64 -> tensor<128x1xi64> loc(#loc173)
    %p_h_27 = arith.muli %p_h_24, %p_h_26 : tensor<128x1xi64> loc(#loc173)
    %p_h_28 = tt.splat %h_ptr : !tt.ptr<bf16> -> tensor<128x1x!tt.ptr<bf16>> loc(#loc174)
    %p_h_29 = tt.addptr %p_h_28, %p_h_27 : tensor<128x1x!tt.ptr<bf16>>, tensor<128x1xi64> loc(#loc174)
    %p_h_31 = tt.broadcast %p_h_29 : tensor<128x1x!tt.ptr<bf16>> -> tensor<128x64x!tt.ptr<bf16>> loc(#loc174)
    %p_h_33 = tt.addptr %p_h_31, %p_h_32 : tensor<128x64x!tt.ptr<bf16>>, tensor<128x64xi32> loc(#loc174)
"""
_TTIR_INT32 = """
  tt.func public @k(%h_ptr: !tt.ptr<bf16> loc("h_ptr"(#loc)), %stride_hn: i32 loc("stride_hn"(#loc))) {
    %p_h = tt.expand_dims %o_n_10 {axis = 1 : i32} : tensor<128xi32> -> tensor<128x1xi32> loc(#loc173)
    %p_h_26 = tt.splat %stride_hn : i32 -> tensor<128x1xi32> loc(#loc173)
    %p_h_27 = arith.muli %p_h, %p_h_26 : tensor<128x1xi32> loc(#loc173)
    %p_h_28 = tt.splat %h_ptr : !tt.ptr<bf16> -> tensor<128x1x!tt.ptr<bf16>> loc(#loc174)
    %p_h_29 = tt.addptr %p_h_28, %p_h_27 : tensor<128x1x!tt.ptr<bf16>>, tensor<128x1xi32> loc(#loc174)
"""


def test_int64_check_tells_int64_from_int32():
    assert CHECK.int64_row_offsets(_TTIR_INT64, "h_ptr", "stride_hn")
    assert not CHECK.int64_row_offsets(_TTIR_INT32, "h_ptr", "stride_hn")
    # never vacuously true: a pointer whose offsets do not involve the stride at all
    assert not CHECK.int64_row_offsets(_TTIR_INT64, "h_ptr", "stride_wv")
