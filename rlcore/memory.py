"""Peak-memory measurement of a callable, on CUDA and on CPU, for tests and benchmarks.

- CUDA: ``torch.cuda.max_memory_allocated`` around the call, minus what was allocated before it.
- CPU: PyTorch's CPU allocator reports every allocation and free to the profiler (``profile_memory=True``); replaying
  those events in order gives the peak of live bytes the call added. Memory allocated outside PyTorch (numpy, the
  Triton interpreter's own buffers) is not seen.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["peak_memory"]


def _cpu_peak(fn: Callable[[], object]) -> tuple[int, object]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, object]:
    """Run ``fn()`` and return ``(peak_extra_bytes, result)``: the most bytes it had allocated at once beyond what
    was live when it started (its result included)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    return _cpu_peak(fn)
