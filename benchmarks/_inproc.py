"""``python -m tcplug ARGS`` in this process, for the benchmarks' smoke runs: what a subprocess
spends starting and importing (about 12 s on 2 cores) is not paid again. Full runs keep their
subprocesses (a fresh process per measurement: its own peak memory, no state carried over)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path


def tcplug(args: list[str], cwd: str | Path, in_process: bool, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tcplug ARGS`` in ``cwd`` with ``env``: in this process when ``in_process`` (stdout and
    stderr captured; ``env`` added to the environment; the working directory and environment
    restored after), else as ``python -m tcplug`` with ``env`` as its whole environment (None:
    this one's). The test suite's in-process runs are this function too."""
    if not in_process:
        return subprocess.run([sys.executable, "-m", "tcplug", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                              env=env)
    from tcplug.cli import main

    out, err, here, environ = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env or {})
    try:
        # what a run changes for its process (warning filters, PL_GLOBAL_SEED...) is undone after it
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:  # what the command would die of: its traceback, status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["tcplug", *map(str, args)], code or 0, out.getvalue(), err.getvalue())
