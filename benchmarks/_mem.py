"""Peak-memory helper shared by the benchmarks: run a function in a fresh process.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` around the call; on CPU it is the
growth of the process's peak resident set (``ru_maxrss``) during the call, measured in a
fresh subprocess so that earlier work does not hide it.
"""

from __future__ import annotations

import multiprocessing as mp
import resource


def _child(fn, args, queue):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    fn(*args, warmup=True)  # allocate what is allocated once (imports, caches)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(*args)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def peak_mib(fn, *args) -> float:
    """Peak memory (MiB) that ``fn(*args)`` adds, measured in a fresh process.

    ``fn`` must be a module-level function accepting ``warmup: bool = False``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return round(value, 1)
