"""The opt-in autotuner of the Triton kernels (``RLCORE_AUTOTUNE=1``): its choice, its key and its two caches.

On a GPU it times real launches; here the timer is a stand-in that says how long each config "takes", so the test
checks the logic that must hold anywhere: the fastest candidate wins, a candidate that fails to launch never does,
each key is timed once per process and once per cache file, and the key separates what it must (N buckets, dtypes).
"""

import json

import pytest
import torch

from rlcore.kernels import linear_logprobs as K

MODE = K.KernelMode(cast_fp32=False, dot_precision="tf32")


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "is_interpreter", lambda: False)   # choose_config never tunes under the interpreter
    monkeypatch.setenv("RLCORE_AUTOTUNE", "1")
    monkeypatch.setenv("RLCORE_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(K, "_TUNED", {})
    return tmp_path / "tune.json"


def _timer_for(times_by_config, calls):
    def timer(fn):
        calls.append(fn)
        return fn()
    return timer, lambda cfg: times_by_config[cfg]


def test_fastest_candidate_wins_and_is_cached(tuner):
    cands = K.candidate_configs("fwd", MODE, torch.bfloat16, "sm90")
    assert len(cands) >= 2
    times = {c: 10.0 + i for i, c in enumerate(cands)}
    times[cands[1]] = 1.0                                     # the second candidate is the fastest
    calls = []
    timer, bench = _timer_for(times, calls)
    cpu = torch.device("cpu")
    got = K.choose_config("fwd", MODE, torch.bfloat16, cpu, 4096, 151936, 16384, bench=bench, timer=timer)
    assert got == cands[1] and len(calls) == len(cands)
    again = K.choose_config("fwd", MODE, torch.bfloat16, cpu, 4096, 151936, 10000, bench=bench, timer=timer)
    assert again == cands[1] and len(calls) == len(cands)     # same N bucket (16384): no new timing
    disk = json.loads(tuner.read_text())
    assert [v["index"] for v in disk.values()] == [1]
    K._TUNED.clear()                                          # a new process: the file answers, nothing is timed
    assert K.choose_config("fwd", MODE, torch.bfloat16, cpu, 4096, 151936, 16384, bench=bench, timer=timer) == cands[1]
    assert len(calls) == len(cands)


def test_a_candidate_that_cannot_launch_never_wins(tuner):
    cands = K.candidate_configs("matmul", MODE, torch.bfloat16, "sm90")

    def bench(cfg):
        if cfg == cands[0]:
            raise RuntimeError("out of resources: shared memory")
        return 5.0 if cfg == cands[-1] else 7.0

    got = K.choose_config("matmul", MODE, torch.bfloat16, torch.device("cpu"), 4096, 8192, 16384, bench=bench,
                          timer=lambda fn: fn())
    assert got == cands[-1]


def test_key_separates_buckets_and_dtypes():
    key = K.tuning_key("fwd", 4096, 151936, torch.bfloat16, MODE, "sm90", 16384)
    assert key == K.tuning_key("fwd", 4096, 151936, torch.bfloat16, MODE, "sm90", 9000)
    assert key != K.tuning_key("fwd", 4096, 151936, torch.bfloat16, MODE, "sm90", 17000)
    assert key != K.tuning_key("fwd", 4096, 151936, torch.float16, MODE, "sm90", 16384)
    assert key != K.tuning_key("fwd", 4096, 151936, torch.bfloat16, MODE, "sm80", 16384)
    assert K.n_bucket(1) == 256 and K.n_bucket(16384) == 16384 and K.n_bucket(16385) == 32768


def test_off_by_default_gives_the_fixed_default(monkeypatch):
    monkeypatch.delenv("RLCORE_AUTOTUNE", raising=False)
    monkeypatch.setattr(K, "is_interpreter", lambda: False)
    got = K.choose_config("dz", MODE, torch.bfloat16, torch.device("cpu"), 4096, 151936, 16384,
                          bench=lambda cfg: pytest.fail("timed with autotuning off"))
    assert got == K.candidate_configs("dz", MODE, torch.bfloat16, "sm90")[0]


def test_bad_bwd_gemm_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RLCORE_BWD_GEMM", "cublas")
    with pytest.raises(ValueError, match="RLCORE_BWD_GEMM"):
        K.bwd_gemm(MODE, torch.bfloat16, torch.device("cpu"))
