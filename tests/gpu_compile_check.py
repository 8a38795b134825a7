"""Compile every shipped Triton kernel configuration of rlcore for real GPUs (sm_80 and sm_90), on any machine.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, what the numerical tests run under when there is no GPU) executes
the kernels with numpy and never goes through the GPU compiler, so it accepts launch configurations that a GPU build
rejects or cannot launch: tiles whose software pipeline needs more shared memory than an A100 / H100 has, register
spills, dots that silently miss the tensor cores. This script closes that gap without a GPU: it hands each
``(kernel, config, dtypes, mode)`` combination that ``rlcore`` can launch to ``triton.compile`` with an explicit
``GPUTarget``, which runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ``ptxas`` cubin), and reports
what the binaries need.

Usage::

    python tests/gpu_compile_check.py [--workers 2] [--arch 80 90]

prints one JSON list of result records on stdout (a summary table goes to stderr). ``tests/test_gpu_compile.py`` runs
it in a subprocess and asserts on the records. It must run without ``TRITON_INTERPRET`` in its environment: under the
interpreter ``@triton.jit`` makes ``InterpretedFunction`` objects, which cannot be compiled. ``main`` removes the
variable before anything imports the kernels (the spawned workers inherit that environment), and the test also strips
it from the subprocess environment. Importing this file as a module changes nothing in the environment: the test does
that to enumerate the combinations for its parametrization.

The combinations are enumerated from ``CONFIGS`` in ``rlcore.kernels.linear_logprobs`` and from the op's own
precision mapping (``rlcore.logprobs.launched_modes``), so a config or mode added there is covered automatically.
The segment reductions (``rlcore.kernels.segments``: ``_segment_sum_kernel`` and ``_segment_broadcast_kernel``) are
compiled with their shipped ``CONFIGS`` for every value dtype in ``SEGMENT_VALUE_DTYPES`` and both offset dtypes
(``cu_seqlens`` int32 / int64); they have no dot, so their records carry ``mode=None``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python tests/gpu_compile_check.py` from a checkout, without an install

# ----------------------------------------------------------------------------------------------------------------------
# What gets compiled
# ----------------------------------------------------------------------------------------------------------------------

# Compute capabilities to build for, and the most shared memory one block may use there (the opt-in maximum that
# Triton checks at launch): A100 163 KiB, H100 227 KiB.
ARCHS = (80, 90)
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def launched_modes() -> list[tuple]:
    """``(pass, hidden dtype, weight dtype, cast_fp32, dot_precision)`` for every launch rlcore can make, taken
    from ``rlcore.logprobs.launched_modes`` (the op's own precision mapping), so a new mode is covered at once.
    UPCAST is a CPU-interpreter workaround and is always False on a GPU."""
    from rlcore.logprobs import launched_modes as modes

    return [(kind, _DTYPE_NAMES[str(h)], _DTYPE_NAMES[str(w)], m.cast_fp32, m.dot_precision)
            for kind, h, w, m in modes()]


def kernel_launches(kind: str, h: str, w: str, cast_fp32: bool) -> list[tuple]:
    """The kernels one pass launches: ``(kernel, role, pointer dtypes, constexprs, unit strides)``.

    The forward is one kernel. The backward is ``_dz_kernel`` (dz in the GEMM dtype: FP32 when tiles are upcast,
    else the inputs' half dtype) and ``_matmul_kernel`` twice: ``dW[slice] = dz^T @ h`` (a transposed view, written in
    the weight's dtype) and ``dh += dz @ W[slice]`` (FP32 accumulator).
    """
    dz = "fp32" if cast_fp32 else h
    if kind == "fwd":
        return [("fwd", "fwd", {"h": h, "w": w}, {}, {"stride_hh", "stride_wh"})]
    return [
        ("dz", "dz", {"h": h, "w": w, "dz": dz}, {}, {"stride_hh", "stride_wh"}),
        ("matmul", "dW", {"x": dz, "y": h, "out": w}, {"ACCUMULATE": False, "ROWS": 2}, {"stride_xm", "stride_yn", "stride_on"}),
        ("matmul", "dh", {"x": dz, "y": w, "out": "fp32"}, {"ACCUMULATE": True, "ROWS": 1},
         {"stride_xk", "stride_yn", "stride_on"}),
    ]


# Pointer and scalar types of each kernel argument, as a real launch specializes them ("*h", "*w", ... stand for the
# dtypes of the launch). Targets are int64; the saved lse / entropy and the upstream gradients (the op's outputs) are
# float32; the bias has the weight's dtype. Arguments absent here are constexprs.
_ARG_TYPES = {
    "fwd": {
        "h_ptr": "*h", "w_ptr": "*w", "b_ptr": "*w", "t_ptr": "*i64", "part_ptr": "*fp32", "z_ptr": "*fp32",
        "N": "i32", "V": "i32", "H": "i32", "SPAN": "i32", "SPLITS": "i32",
        "stride_hn": "i32", "stride_hh": "i32", "stride_wv": "i32", "stride_wh": "i32", "inv_temp": "fp32",
        "ignore_index": "i32", "softcap": "fp32",
    },
    "dz": {
        "h_ptr": "*h", "w_ptr": "*w", "b_ptr": "*w", "t_ptr": "*i64", "live_ptr": "*i8", "lse_ptr": "*fp32",
        "ent_ptr": "*fp32",
        "glp_ptr": "*fp32", "gent_ptr": "*fp32", "dz_ptr": "*dz",
        "N": "i32", "V": "i32", "H": "i32", "v_start": "i32", "VC": "i32",
        "stride_hn": "i32", "stride_hh": "i32", "stride_wv": "i32", "stride_wh": "i32",
        "inv_temp": "fp32", "ignore_index": "i32", "softcap": "fp32",
    },
    "matmul": {
        "x_ptr": "*x", "y_ptr": "*y", "out_ptr": "*out", "live_ptr": "*i8", "klist_ptr": "*i32",
        "kcount_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_xk": "i32", "stride_yk": "i32", "stride_yn": "i32",
        "stride_om": "i32", "stride_on": "i32",
    },
}
# Triton specializes launch arguments: an int equal to 1 becomes a constexpr, and pointers / ints divisible by 16 get
# a `tt.divisibility = 16` attribute that enables vectorized loads. We compile the common case: contiguous rows
# (unit inner strides, per launch above), 16-byte aligned tensors, H (hence the row strides), SPAN and the slice
# width VC multiples of 16 by construction; N, V, M, K arbitrary.
_DIVISIBLE_INTS = {"H", "SPAN", "VC", "stride_hn", "stride_wv", "stride_xm", "stride_xk", "stride_yk", "stride_om"}

# The pointers whose offsets must be 64-bit, and the argument their row index is multiplied by (see int64_row_offsets).
_INT64_CHECKS = {
    "fwd": {"h": ("h_ptr", "stride_hn"), "w": ("w_ptr", "stride_wv")},
    "dz": {"h": ("h_ptr", "stride_hn"), "w": ("w_ptr", "stride_wv"), "dz": ("dz_ptr", "VC")},
    "matmul:dW": {"x": ("x_ptr", "stride_xk"), "y": ("y_ptr", "stride_yk"), "out": ("out_ptr", "stride_om")},
    "matmul:dh": {"x": ("x_ptr", "stride_xm"), "y": ("y_ptr", "stride_yk"), "out": ("out_ptr", "stride_om")},
}
_KERNEL_FN = {"fwd": "_fwd_kernel", "dz": "_dz_kernel", "matmul": "_matmul_kernel"}

# --- segment reductions (rlcore.kernels.segments) ---------------------------------------------------------------------

# Value dtypes (x of the sum, s of the broadcast; the output has the same dtype) and cu_seqlens dtypes compiled: every
# dtype the ops take. fp32 and bf16 are what the losses pass; fp64 is its own code path (the ACC_FP64 switch: a float64
# accumulator). These builds take about 0.1 s each.
SEGMENT_VALUE_DTYPES = ("fp32", "bf16", "fp16", "fp64")
SEGMENT_OFFSET_DTYPES = ("i32", "i64")
_SEGMENT_KERNELS = ("segment_sum", "segment_broadcast")
_ARG_TYPES.update({
    "segment_sum": {
        "x_ptr": "*x", "cu_ptr": "*cu", "out_ptr": "*x", "N": "i32", "K": "i32",
        "stride_xk": "i32", "stride_xn": "i32", "stride_ok": "i32", "stride_ob": "i32",
    },
    "segment_broadcast": {
        "s_ptr": "*x", "cu_ptr": "*cu", "out_ptr": "*x", "N": "i32", "K": "i32", "B": "i32", "SEARCH_STEPS": "i32",
        "stride_sk": "i32", "stride_sb": "i32", "stride_ok": "i32", "stride_on": "i32",
    },
})
# Contiguous rows, as the ops produce and the losses pass them: x [K, N], out [K, B] / s [K, B], out [K, N].
_SEGMENT_UNIT_STRIDES = {"segment_sum": {"stride_xn", "stride_ob"}, "segment_broadcast": {"stride_sb", "stride_on"}}
# Row offsets k * stride reach K * N; the sum's token offsets come from cu_seqlens loads and must be int64 as well
# (checked as "offsets into x that depend on a value loaded through cu_ptr").
_INT64_CHECKS.update({
    "segment_sum": {"x": ("x_ptr", "stride_xk"), "x:tokens": ("x_ptr", "cu_ptr"), "out": ("out_ptr", "stride_ok")},
    "segment_broadcast": {"s": ("s_ptr", "stride_sk"), "out": ("out_ptr", "stride_ok")},
})
_KERNEL_FN.update(segment_sum="_segment_sum_kernel", segment_broadcast="_segment_broadcast_kernel")


# --- the fused loss's single pass (rlcore.kernels.slice_head): dz from the stored FP32 logits, no dot ----------------
_ARG_TYPES["dz_from_logits"] = {
    "z_ptr": "*fp32", "t_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32",
    "gent_ptr": "*fp32", "dz_ptr": "*dz", "C": "i32", "V": "i32", "inv_temp": "fp32", "softcap": "fp32",
}
_INT64_CHECKS["dz_from_logits"] = {"z": ("z_ptr", "V"), "dz": ("dz_ptr", "V")}
_KERNEL_FN["dz_from_logits"] = "_dz_from_logits_kernel"


def _slice_head_jobs(archs) -> list[dict]:
    """The elementwise dz kernel of the single pass: dz in bf16, fp16 or FP32, with and without the entropy term,
    with and without a soft cap."""
    module = _kernels_module("dz_from_logits")
    jobs = []
    for dz, grad_ent, softcap, arch in itertools.product(("bf16", "fp16", "fp32"), (False, True), (False, True),
                                                         archs):
        job = dict(
            kernel="dz_from_logits", role="dz_from_logits", table="default", index=0,
            config=dict(BLOCK_N=module._DZ_BLOCK_N, BLOCK_V=module._DZ_BLOCK_V, num_warps=module._DZ_WARPS,
                        num_stages=1),
            inputs=(dz, "fp32"), dtypes={"dz": dz}, constexprs={"HAS_GRAD_ENT": grad_ent, "SOFTCAP": softcap},
            unit_strides=[], mode=None, arch=arch,
            ints=dict(C=3500, V=151936),
        )
        job["id"] = job_id(job) + ("-ent" if grad_ent else "") + ("-cap" if softcap else "")
        jobs.append(job)
    return jobs


def _kernels_module(kernel: str = "fwd"):
    """The module defining ``kernel``: ``rlcore.kernels.segments`` for the segment reductions,
    ``rlcore.kernels.slice_head`` for the single pass's dz kernel, else ``rlcore.kernels.linear_logprobs``."""
    if kernel == "dz_from_logits":
        from rlcore.kernels import slice_head

        return slice_head
    if kernel in _SEGMENT_KERNELS:
        from rlcore.kernels import segments

        return segments
    from rlcore.kernels import linear_logprobs

    return linear_logprobs


def job_id(job: dict) -> str:
    """A readable pytest id, e.g. ``matmul:dW-half[0]-128x128x64-w8s3-bf16+bf16-native-sm80``."""
    c = job["config"]
    if job["mode"] is None:  # no dot: e.g. ``segment_sum-default[0]-1x1024-w4s1-bf16+i64-sm80`` (values + offsets)
        mode = ""
    else:
        mode = "-" + (job["mode"]["dot_precision"] if job["mode"]["cast_fp32"] else "native")
    name = job["kernel"] if job["role"] == job["kernel"] else f"{job['kernel']}:{job['role']}"
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK_"))
    flags = "".join(f for f, k in (("b", "HAS_BIAS"), ("e", "HAS_GRAD_ENT"), ("z", "Z_OUT"), ("c", "SOFTCAP"))
                    if job["constexprs"].get(k))
    variant = "" if job["kernel"] not in ("fwd", "dz") else f"-v{flags or '0'}"
    shape = f"-{job['shape']}" if "shape" in job else ""
    return (f"{name}-{job['table']}[{job['index']}]-{blocks}-w{c['num_warps']}s{c['num_stages']}"
            f"-{job['inputs'][0]}+{job['inputs'][1]}{mode}{variant}{shape}-sm{job['arch']}")


# The shapes whose launches are compiled: Qwen2.5-7B's head (H = 3584, V = 152064) and a 4096 x 151936 head, with a
# batch of rows that is a multiple of 16 and one that is not. Triton specializes every int argument by its value
# (``% 16 == 0`` gives ``tt.divisibility = 16``, which decides vectorized loads, TMA use and pipelining; ``== 1``
# becomes a constant), so the binary a launch runs depends on these values: ``launch_ints`` mirrors the host code
# to compute them, and ``compile_job`` specializes exactly as a launch would.
SHAPES = {"aligned": dict(N=16384, H=4096, V=151936), "ragged": dict(N=16383, H=3584, V=152064)}
SM_COUNT = {80: 108, 90: 132}


def launch_ints(kernel: str, role: str, shape: dict, cfg: dict, arch: int) -> dict:
    """The int arguments ``kernel`` (``role``) is launched with at ``shape`` (its first, widest vocabulary slice for
    the backward), as ``rlcore.kernels.linear_logprobs`` computes them."""
    module = _kernels_module()
    N, H, V = shape["N"], shape["H"], shape["V"]
    if kernel == "fwd":
        n_blocks = -(-N // cfg["BLOCK_N"])
        target = module._TARGET_PROGRAMS_PER_SM * SM_COUNT[arch]
        splits = max(module._MIN_SPLITS, -(-target // n_blocks))
        splits = max(1, min(-(-V // module._SPAN_QUANTUM), splits))
        span = -(-(-(-V // splits)) // module._SPAN_QUANTUM) * module._SPAN_QUANTUM
        return dict(N=N, V=V, H=H, SPAN=span, SPLITS=-(-V // span), stride_hn=H, stride_hh=1, stride_wv=H,
                    stride_wh=1, ignore_index=-100)
    cols = max(module._DZ_BUFFER_FACTOR * H, module._DZ_BUFFER_MIN_ELEMENTS // N)
    cols = min(max(module._SLICE_QUANTUM, cols // module._SLICE_QUANTUM * module._SLICE_QUANTUM), V)
    if kernel == "dz":
        return dict(N=N, V=V, H=H, v_start=cols, VC=cols, stride_hn=H, stride_hh=1, stride_wv=H, stride_wh=1,
                    ignore_index=-100)
    if role == "dW":   # dz^T [c, N] (strides 1, c) @ h [N, H] -> dW[slice] [c, H]
        return dict(M=cols, N=H, K=N, stride_xm=1, stride_xk=cols, stride_yk=H, stride_yn=1, stride_om=H,
                    stride_on=1)
    return dict(M=N, N=H, K=cols, stride_xm=cols, stride_xk=1, stride_yk=H, stride_yn=1, stride_om=H, stride_on=1)


def _variants(kernel: str) -> list[dict]:
    """The compile-time variants a kernel ships in: bias or not, an entropy gradient or not, a soft cap or not. The
    last is the superset (every flag on: the most live values), which the alternatives and the ragged shape build."""
    if kernel == "fwd":   # Z_OUT: the fused loss's single pass, which keeps the logits
        return [dict(HAS_BIAS=b, Z_OUT=z, SOFTCAP=c) for c in (False, True) for z in (False, True)
                for b in (False, True)]
    if kernel == "dz":
        return [dict(HAS_BIAS=b, HAS_GRAD_ENT=e, SOFTCAP=c) for c in (False, True) for b in (False, True)
                for e in (False, True)]
    return [{}]


def enumerate_jobs(archs=ARCHS) -> list[dict]:
    """Every (kernel, role, config table, config, dtypes, mode, variant, shape, arch) combination, as JSON-able
    dicts with an ``id``. The default config of each table (the one that launches unless autotuning or
    ``RLCORE_CONFIG_INDEX`` says otherwise) is built in every variant at the aligned shape and in the superset
    variant (bias and entropy on) at the ragged one; the alternatives in the superset variant at the aligned shape.

    Importing the kernels module is all this needs (it works under the interpreter too), so the test can build its
    parametrization at collection time.
    """
    import dataclasses

    import torch

    module = _kernels_module()
    jobs, seen = [], set()
    for kind, h_dtype, w_dtype, cast_fp32, dot_precision in launched_modes():
        mode = module.KernelMode(cast_fp32, dot_precision)
        for kernel, role, dtypes, constexprs, unit_strides in kernel_launches(kind, h_dtype, w_dtype, cast_fp32):
            operand = dtypes.get("x", h_dtype)  # the dtype the config table is chosen by, as the host does
            key = module._config_key(mode, getattr(torch, _TORCH_DTYPES[operand]))
            for arch in archs:
                for index, cfg in enumerate(module.CONFIGS[kernel][f"sm{arch}"][key]):
                    superset = _variants(kernel)[-1]
                    builds = [(superset, "aligned")]
                    if index == 0:
                        builds = [(v, "aligned") for v in _variants(kernel)] + [(superset, "ragged")]
                    for variant, shape in builds:
                        config = dataclasses.asdict(cfg)
                        job = dict(
                            kernel=kernel, role=role, table=key, index=index, config=config,
                            inputs=(h_dtype, w_dtype), dtypes=dtypes, constexprs=dict(constexprs, **variant),
                            unit_strides=sorted(unit_strides), shape=shape,
                            ints=launch_ints(kernel, role, SHAPES[shape], config, arch),
                            mode=dict(cast_fp32=cast_fp32, dot_precision=dot_precision), arch=arch,
                        )
                        # one job per distinct binary: e.g. bf16 and fp16 activations under an FP32 head reach
                        # the same dh GEMM, fp32 "default" / "fp32" launch the same kernels, and two shapes may
                        # specialize alike
                        binary = json.dumps(
                            {k: v for k, v in job.items() if k not in ("inputs", "shape", "ints")} |
                            {"divisible": _divisible(job)}, sort_keys=True)
                        if binary not in seen:
                            seen.add(binary)
                            job["id"] = job_id(job)
                            jobs.append(job)
    return jobs + _segment_jobs(archs) + _slice_head_jobs(archs)


def _divisible(job: dict) -> list:
    """The int arguments of ``job`` a launch marks divisible by 16."""
    return sorted(k for k, v in job.get("ints", {}).items() if v % 16 == 0 and k not in job["unit_strides"])


def _segment_jobs(archs) -> list[dict]:
    """The segment reductions: each kernel's shipped config x value dtype x offset dtype x arch."""
    import dataclasses

    module = _kernels_module("segment_sum")
    jobs = []
    for kernel in _SEGMENT_KERNELS:
        cfg = module.CONFIGS[kernel]
        for value in SEGMENT_VALUE_DTYPES:
            for offsets in SEGMENT_OFFSET_DTYPES:
                for arch in archs:
                    job = dict(
                        kernel=kernel, role=kernel, table="default", index=0, config=dataclasses.asdict(cfg),
                        inputs=(value, offsets), dtypes={"x": value, "cu": offsets},
                        constexprs={"ACC_FP64": value == "fp64"} if kernel == "segment_sum" else {},
                        unit_strides=sorted(_SEGMENT_UNIT_STRIDES[kernel]), mode=None, arch=arch,
                    )
                    job["id"] = job_id(job)
                    jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------------------------------------------------
# Inspecting the compiled kernel
# ----------------------------------------------------------------------------------------------------------------------

_VALUE = r"%[\w.$-]+"
_RESULT_RE = re.compile(rf"^\s*({_VALUE})(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_ITER_ARG_RE = re.compile(rf"({_VALUE})\s*=\s*({_VALUE})")


def _strip_loc(text: str) -> str:
    return text.split(" loc(", 1)[0]


def int64_row_offsets(ttir: str, ptr_arg: str, stride_arg: str) -> bool:
    """Whether every row offset added to the pointer argument ``ptr_arg`` is computed in 64 bits.

    The kernels address ``h[n, :]`` as ``h_ptr + n * stride_hn + k``: ``n * stride_hn`` reaches ``N * H``, beyond
    2^31 for long batches, so it must be an int64 product (the ``.to(tl.int64)`` on the row index); the column
    offset ``k < H`` may stay int32. In the TTIR this reads: every ``tt.addptr`` whose pointer operand comes from
    ``ptr_arg`` and whose offset operand depends on ``stride_arg`` has an ``i64`` (or ``tensor<...xi64>``) offset,
    and there is at least one such ``tt.addptr`` (so the check cannot pass vacuously).

    A forward data-flow scan over the SSA text: a value "comes from" the pointer if it is produced by an op that
    takes a value from the pointer as an operand (splat, broadcast, addptr, loop-carried iter_args...), and
    "depends on" the stride likewise through any op. Flat scanning over-approximates both sets (names reused in
    other regions), which can only make the check stricter.
    """
    from_ptr, from_stride = {f"%{ptr_arg}"}, {f"%{stride_arg}"}
    seen, all_i64 = 0, True
    for line in ttir.splitlines():
        body = _strip_loc(line)
        if "iter_args(" in body:  # block arguments of a loop take the values of its init operands
            for block_arg, init in _ITER_ARG_RE.findall(body.split("iter_args(", 1)[1]):
                init = init.split("#")[0]
                if init in from_ptr:
                    from_ptr.add(block_arg)
                if init in from_stride:
                    from_stride.add(block_arg)
        match = _RESULT_RE.match(body)
        if not match:
            continue
        result, op, rest = match.groups()
        operands_text = rest.split(" : ", 1)[0]
        operands = {v.split("#")[0] for v in re.findall(rf"{_VALUE}(?:#\d+)?", operands_text)}
        if operands & from_ptr:
            from_ptr.add(result)
        if operands & from_stride:
            from_stride.add(result)
        if op == "tt.addptr":
            ptr, offset = (v.strip().split("#")[0] for v in operands_text.split(",")[:2])
            if ptr in from_ptr and offset in from_stride:
                seen += 1
                offset_type = rest.split(" : ", 1)[1].rsplit(",", 1)[1].strip()
                all_i64 &= offset_type == "i64" or offset_type.endswith("xi64>")
    return seen > 0 and all_i64


_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS_RE = re.compile(r"Used (\d+) registers")


def _ptxas_resources(log: str, metadata: dict):
    """(registers, spilled bytes) of the cubin: from the compiled metadata when this Triton puts them there,
    else from the ``ptxas -v`` log Triton prints with ``TRITON_DUMP_PTXAS_LOG``; None where neither has it."""
    regs, spills = metadata.get("n_regs"), metadata.get("n_spills")
    if regs is None and (m := _PTXAS_REGS_RE.search(log)):
        regs = int(m.group(1))
    if spills is None and (m := _PTXAS_SPILL_RE.search(log)):
        spills = int(m.group(1)) + int(m.group(2))
    return regs, spills


# ----------------------------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------------------------


def _worker_init() -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas already runs with -v; this prints its log (registers, spills)


def compile_job(job: dict) -> dict:
    """Compile one combination and return ``job`` extended with what the binary needs (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _kernels_module(job["kernel"])
    fn = getattr(module, _KERNEL_FN[job["kernel"]])
    dtype = job["dtypes"]
    arg_types = _ARG_TYPES[job["kernel"]]

    blocks = {k: v for k, v in job["config"].items() if k not in ("num_warps", "num_stages")}
    mode = {} if job["mode"] is None else dict(
        CAST_FP32=job["mode"]["cast_fp32"], DOT_PRECISION=job["mode"]["dot_precision"])
    constexprs = dict(
        {name: 1 for name in job["unit_strides"]},
        UPCAST=False, ROUND_BF16=False, **mode, **job["constexprs"], **blocks,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = arg_types[name]  # a KeyError here means the kernel's signature changed: update _ARG_TYPES
        if ty[1:] in dtype:
            ty = "*" + dtype[ty[1:]]
        signature[name] = ty
        divisible = (name in job["ints"] and job["ints"][name] % 16 == 0) if "ints" in job else (
            name in _DIVISIBLE_INTS)
        if ty.startswith("*") or divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(fn.arg_names) - set(signature)
    assert not missing, f"no type for {missing}"

    record = dict(job, ok=False, error=None, shared=None, ptx_wgmma=None, ptx_mma_sync=None, int64_offsets=None,
                  pipelined=None, n_regs=None, n_spills=None, compile_s=None)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # the ptxas log, and Triton's dump of the PTX if ptxas fails
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", job["arch"], 32),
                options=dict(num_warps=job["config"]["num_warps"], num_stages=job["config"]["num_stages"]),
            )
    except Exception as exc:  # noqa: BLE001 - any failure is a result to report
        record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        record["compile_s"] = round(time.perf_counter() - start, 2)
        return record
    record["compile_s"] = round(time.perf_counter() - start, 2)

    metadata = compiled.metadata._asdict()
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    record["ok"] = bool(compiled.asm.get("cubin"))
    record["error"] = None if record["ok"] else "no cubin produced"
    record["shared"] = metadata["shared"]
    record["ptx_wgmma"] = bool(re.search(r"\bwgmma\.mma_async", ptx))  # Hopper warp-group MMA
    record["ptx_mma_sync"] = bool(re.search(r"\bmma\.sync\.aligned", ptx))  # Ampere-style warp MMA
    # a software pipeline: the inner loop's tiles are fetched asynchronously into shared memory ahead of their use,
    # by cp.async (sm_80, sm_90) or the tensor-memory accelerator (cp.async.bulk.tensor, sm_90)
    record["pipelined"] = bool(re.search(r"\bcp\.async\.", ptx))
    record["int64_offsets"] = {
        name: int64_row_offsets(ttir, ptr, stride)
        for name, (ptr, stride) in _INT64_CHECKS[job["kernel"] if job["kernel"] == job["role"] else
                                                 f"{job['kernel']}:{job['role']}"].items()
    }
    record["n_regs"], record["n_spills"] = _ptxas_resources(log.getvalue(), metadata)
    return record


def run(jobs: list[dict], workers: int = 2) -> list[dict]:
    """Compile ``jobs`` on ``workers`` processes, in a throwaway Triton cache (every job is really compiled)."""
    cache = tempfile.mkdtemp(prefix="rlcore-gpu-compile-")
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the workers
    try:
        # spawn: fresh interpreters, no state forked from a parent that imported torch/triton
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
            # backward builds are the slowest: start them first so the two workers finish together; the small
            # segment kernels go last
            order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["mode"] is None, jobs[i]["kernel"] == "fwd"))
            results = dict(zip(order, pool.map(compile_job, [jobs[i] for i in order])))
        return [results[i] for i in range(len(jobs))]
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
        shutil.rmtree(cache, ignore_errors=True)


def _summary(records: list[dict]) -> str:
    lines = [f"{'id':<58} {'ok':<3} {'shared':>7} {'regs':>4} {'spill':>5} {'mma':<6} {'int64':<5} {'s':>5}"]
    for r in records:
        mma = "wgmma" if r["ptx_wgmma"] else "mma" if r["ptx_mma_sync"] else "-"
        i64 = "yes" if r["int64_offsets"] and all(r["int64_offsets"].values()) else "NO"
        lines.append(f"{r['id']:<58} {'ok' if r['ok'] else 'ERR':<3} {r['shared'] or 0:>7} {r['n_regs'] or 0:>4} "
                     f"{r['n_spills'] if r['n_spills'] is not None else '?':>5} {mma:<6} {i64:<5} {r['compile_s']:>5}")
        if r["error"]:
            lines.append("    " + r["error"].splitlines()[0][:200])
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported here or in the workers
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default 80 90)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default config of each table (every variant and shape), no alternatives")
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the builds whose id contains TEXT")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    jobs = enumerate_jobs(tuple(args.arch))
    if args.defaults_only:
        jobs = [job for job in jobs if job["index"] == 0]
    if args.only:
        jobs = [job for job in jobs if args.only in job["id"]]
    records = run(jobs, workers=args.workers)
    print(_summary(records), file=sys.stderr)
    print(f"{len(records)} builds in {time.perf_counter() - start:.1f} s on {args.workers} workers", file=sys.stderr)
    json.dump(records, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
