"""Peak-memory helper shared by the benchmarks.

On CUDA: ``torch.cuda.max_memory_allocated`` growth around the call. On CPU: the peak of
torch's own allocations during the call, replayed from the profiler's memory events
(allocations are charged to the op that made them, frees appear as ``[memory]`` events),
i.e. the CPU analogue of ``max_memory_allocated``. Resident-set figures are useless here:
the allocator keeps freed memory mapped.
"""

from __future__ import annotations

import torch


def peak_mib(fn, *args) -> float:
    """Peak memory (MiB) that torch allocates while ``fn(*args)`` runs."""
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
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return round(peak / 2**20, 1)
