"""Independent benchmark jobs (a recipe x seed) run here, one after another, or on a cluster
engine through submitit: ``local`` (this process), ``submitit-local`` (submitit's local executor:
each job in its own process, one at a time, as a cluster job would run), ``slurm`` (submitit's
SLURM executor: every job submitted at once, then waited for). A job writes its result where the
benchmark's gather step reads it (the benchmark's ``--out`` folder), so results are gathered and
resumed the same way whatever ran them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "submitit-local", "slurm")


def run_jobs(jobs: Sequence[tuple[Callable, tuple]], executor: str = "local", folder: str | Path = "sweep",
             slurm: dict[str, Any] | None = None) -> list[Any]:
    """Run ``fn(*args)`` for each job; returns their results in order. ``slurm``: submitit
    parameters for the SLURM executor (e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1,
    "timeout_min": 120}``)."""
    if executor not in EXECUTORS:
        raise SystemExit(f"--executor {executor!r}: one of {', '.join(EXECUTORS)}")
    if executor == "local":
        return [fn(*args) for fn, args in jobs]
    import os

    import submitit

    here = str(Path(__file__).resolve().parent)  # a job unpickles functions that import the benchmarks' helpers
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ex = submitit.AutoExecutor(folder=str(folder), cluster="local" if executor == "submitit-local" else "slurm")
    ex.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 24 * 60)))
    if executor == "slurm":
        ex.update_parameters(**{k: int(v) if str(v).isdigit() else v for k, v in (slurm or {}).items()
                                if k != "timeout_min"})
        return [job.result() for job in [ex.submit(fn, *args) for fn, args in jobs]]
    # the local executor starts every submitted job at once: on a small machine trainings side by side
    # oversubscribe its cores, so each job is waited for before the next is submitted
    return [ex.submit(fn, *args).result() for fn, args in jobs]


__all__ = ["EXECUTORS", "run_jobs"]
