"""Every shipped launch configuration of the divergence kernels (``rlcore.kernels.divergence``) builds for real GPUs
(sm_80 A100, sm_90 H100) without a GPU: the compile gate of ``tests/test_gpu_compile.py`` for the two-head kernels.

Run as a script (``python tests/test_divergence_compile.py``) it compiles each ``(kernel, variant, config, dtypes,
arch)`` combination with ``triton.compile`` and an explicit ``GPUTarget`` and prints one JSON list of records; the
tests below run it in a subprocess without ``TRITON_INTERPRET`` (the interpreter's ``@triton.jit`` objects cannot be
compiled) and assert on the records, with ``gpu_compile_check.py``'s inspection helpers (shared memory, tensor-core
instructions, int64 row offsets, ptxas spills). The backward's two GEMMs are ``linear_logprobs``'s ``_matmul_kernel``,
already compiled by that gate for every dz dtype these kernels write.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def _check_module():
    """``gpu_compile_check.py``, imported by path (importing it changes nothing)."""
    spec = importlib.util.spec_from_file_location("rlcore_gpu_compile_check", HERE / "gpu_compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (hidden dtype, weight dtype, CAST_FP32, DOT_PRECISION) of each head, as rlcore.divergence._modes maps them
# (linear_logprobs's precision="default"); both heads take the same pair here.
MODES = [("bf16", "bf16", False, "tf32"), ("fp16", "fp16", False, "tf32"), ("fp32", "fp32", True, "tf32x3"),
         ("bf16", "fp32", True, "tf32x3")]
# (kernel, config table, constexprs): the KL forward of each direction, the JSD's second pass, and the dz kernel of a
# KL and of the JSD, with both heads' gradients (the superset of code paths).
VARIANTS = [("fwd", "fwd", {"KIND": 0}), ("fwd", "fwd", {"KIND": 1}), ("jsd", "jsd", {}),
            ("dz", "dz", {"KIND": 0, "NEED_S": True, "NEED_T": True}),
            ("dz", "dz", {"KIND": 2, "NEED_S": True, "NEED_T": True})]
_KERNEL_FN = {"fwd": "_fwd_kernel", "jsd": "_jsd_kernel", "dz": "_dz_kernel"}
_HEADS = {"hs_ptr": "*h", "ws_ptr": "*w", "bs_ptr": "*w", "ht_ptr": "*h", "wt_ptr": "*w", "bt_ptr": "*w",
          "valid_ptr": "*i1", "N": "i32", "V": "i32", "HS": "i32", "HT": "i32",
          **{f"stride_{x}": "i32" for x in ("hsn", "hsh", "wsv", "wsh", "htn", "hth", "wtv", "wth")},
          "inv_temp": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1mbeta": "fp32"}
_ARG_TYPES = {
    "fwd": {**_HEADS, "part_ptr": "*fp32", "SPAN": "i32", "SPLITS": "i32"},
    "jsd": {**_HEADS, "stats_ptr": "*fp32", "part_ptr": "*fp32", "SPAN": "i32", "SPLITS": "i32"},
    "dz": {**_HEADS, "stats_ptr": "*fp32", "g_ptr": "*fp32", "dzs_ptr": "*dz", "dzt_ptr": "*dz", "v_start": "i32",
           "VC": "i32"},
}
_UNIT_STRIDES = {"stride_hsh", "stride_wsh", "stride_hth", "stride_wth"}
_DIVISIBLE_INTS = {"HS", "HT", "SPAN", "VC", "stride_hsn", "stride_wsv", "stride_htn", "stride_wtv"}
_INT64_CHECKS = {
    "fwd": {"hs": ("hs_ptr", "stride_hsn"), "ws": ("ws_ptr", "stride_wsv"), "ht": ("ht_ptr", "stride_htn"),
            "wt": ("wt_ptr", "stride_wtv")},
    "dz": {"hs": ("hs_ptr", "stride_hsn"), "ws": ("ws_ptr", "stride_wsv"), "ht": ("ht_ptr", "stride_htn"),
           "wt": ("wt_ptr", "stride_wtv"), "dzs": ("dzs_ptr", "VC"), "dzt": ("dzt_ptr", "VC")},
}
_INT64_CHECKS["jsd"] = _INT64_CHECKS["fwd"]


def enumerate_jobs(archs=(80, 90)) -> list[dict]:
    import dataclasses

    import torch

    from rlcore.kernels import divergence as kd
    from rlcore.kernels.linear_logprobs import KernelMode

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    jobs = []
    for h, w, cast, dot in MODES:
        mode = KernelMode(cast, dot)
        key = kd._config_key((mode, mode), (torch_dtype[h], torch_dtype[h]))
        for kernel, table, constexprs in VARIANTS:
            for index, cfg in enumerate(kd.CONFIGS[table][key]):
                for arch in archs:
                    variant = "".join(f"{k}{int(v)}" for k, v in constexprs.items() if k == "KIND")
                    jobs.append(dict(
                        kernel=kernel, constexprs=constexprs, config=dataclasses.asdict(cfg), table=key, index=index,
                        dtypes={"h": h, "w": w, "dz": "fp32" if cast else h}, cast=cast, dot=dot, arch=arch,
                        id=f"{kernel}{'-' + variant if variant else ''}-{key}[{index}]-{h}+{w}-sm{arch}"))
    return jobs


def compile_job(job: dict) -> dict:
    """Compile one combination; ``job`` extended with what the binary needs (never raises)."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlcore.kernels import divergence as kd

    check = _check_module()
    fn = getattr(kd, _KERNEL_FN[job["kernel"]])
    blocks = {k: v for k, v in job["config"].items() if k not in ("num_warps", "num_stages")}
    constexprs = dict({s: 1 for s in _UNIT_STRIDES}, HAS_BIAS_S=True, HAS_BIAS_T=True, CAST_S=job["cast"],
                      CAST_T=job["cast"], DOT_S=job["dot"], DOT_T=job["dot"], UPCAST_S=False, UPCAST_T=False,
                      **job["constexprs"], **blocks)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = _ARG_TYPES[job["kernel"]][name]
        if ty[1:] in job["dtypes"]:
            ty = "*" + job["dtypes"][ty[1:]]
        signature[name] = ty
        if ty.startswith("*") or name in _DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    record = dict(job, ok=False, error=None, shared=None, mma=None, int64_offsets=None, n_spills=None)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", job["arch"], 32),
                                      options=dict(num_warps=job["config"]["num_warps"],
                                                   num_stages=job["config"]["num_stages"]))
    except Exception as exc:  # noqa: BLE001 - a failure is a result to report
        record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        return record
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    record["ok"] = bool(compiled.asm.get("cubin"))
    record["shared"] = compiled.metadata._asdict()["shared"]
    record["mma"] = bool(re.search(r"\bwgmma\.mma_async|\bmma\.sync\.aligned", ptx))
    record["int64_offsets"] = {k: check.int64_row_offsets(ttir, p, s) for k, (p, s) in
                               _INT64_CHECKS[job["kernel"]].items()}
    record["n_spills"] = check._ptxas_resources(log.getvalue(), compiled.metadata._asdict())[1]
    return record


def _worker_init() -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True


def main() -> int:
    import multiprocessing
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    os.environ.pop("TRITON_INTERPRET", None)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="rlcore-div-compile-")
    workers = int(os.environ.get("RLCORE_COMPILE_WORKERS", "2"))
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
            records = list(pool.map(compile_job, enumerate_jobs()))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    json.dump(records, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# --- the tests ------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("needs triton with its NVIDIA backend (ptxas ships with it)", allow_module_level=True)


# This file run as a script, once: started when collection is done, it runs beside the rest of the suite, and the test
# runs last (conftest.py).
_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
BACKGROUND = dict(args=[sys.executable, str(Path(__file__).resolve())], cwd=REPO_ROOT,
                  env=dict(_ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), _ENV.get("PYTHONPATH")]))))


@pytest.fixture(scope="module")
def records(background_run) -> list:
    code, out, err = background_run.result(timeout=1200)
    if code != 0:
        pytest.fail(f"the divergence compile script exited with {code}:\n{err[-6000:]}")
    return json.loads(out)


def test_every_divergence_kernel_builds_and_fits(records):
    """Each record: a cubin; shared memory within the architecture's per-block maximum; dots on the tensor cores;
    int64 row offsets of both heads' h and W (and of the dz buffers); no register spills where ptxas reports them."""
    limits = _check_module().SHARED_MEMORY_LIMIT
    assert {r["id"] for r in records} == {j["id"] for j in enumerate_jobs()}
    failures = []
    for r in records:
        if not r["ok"]:
            failures.append(f"{r['id']}: {r['error']}")
            continue
        if r["shared"] > limits[r["arch"]]:
            failures.append(f"{r['id']}: {r['shared']} bytes of shared memory > {limits[r['arch']]}")
        if not r["mma"]:
            failures.append(f"{r['id']}: no tensor-core instruction (mma.sync / wgmma) in the PTX")
        if not all(r["int64_offsets"].values()):
            failures.append(f"{r['id']}: int32 row offsets of {[k for k, v in r['int64_offsets'].items() if not v]}")
        if r["n_spills"]:
            failures.append(f"{r['id']}: spills {r['n_spills']} bytes")
    assert not failures, "\n".join(failures)
