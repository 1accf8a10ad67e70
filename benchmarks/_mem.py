"""Peak-memory helper shared by the benchmarks.

On CUDA: ``torch.cuda.max_memory_allocated`` growth around the call. On CPU: the peak of
torch's own allocations during the call, i.e. the CPU analogue of ``max_memory_allocated``.
It is read from the profiler's ``[memory]`` events in its exported trace: each carries the
CPU allocator's running total (``Total Allocated``) at that allocation or free, so the peak
is exact, whatever op made or freed the memory. (Summing the per-op ``self_cpu_memory_usage``
in start order undercounts: an op that frees a temporary its child allocated — the column
buffer of a 3-D convolution — carries a negative self figure that lands before the child's
allocation.) Resident-set figures are useless here: the allocator keeps freed memory mapped.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch


def peak_mib(fn, *args) -> float:
    """Peak memory (MiB) that torch allocates while ``fn(*args)`` runs, above what was
    allocated when it started."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    return round(trace_peak(prof) / 2**20, 1)


def trace_peak(prof) -> int:
    """Peak bytes allocated on the CPU during a finished profile, above its starting level."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e["ts"], e["args"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0)
    if not memory:
        return 0
    first = memory[0][1]
    start = first["Total Allocated"] - first["Bytes"]
    return max(0, max(a["Total Allocated"] for _, a in memory) - start)
