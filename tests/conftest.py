import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# Keep CPU tests quiet and small, and the synthetic-world cache out of the user's home (and removed
# when the tests end).
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
if "TCPLUG_CACHE" not in os.environ:
    os.environ["TCPLUG_CACHE"] = tempfile.mkdtemp(prefix="tcplug-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TCPLUG_CACHE"], True)
# pytest runs as many workers as the machine has cores (-n 2): one thread each, in the runs they start
# too, or their thread pools oversubscribe the cores and small ops run several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Overrides that turn any recipe into a seconds-long CPU smoke run.
TINY = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=2",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=false",
    "--data.frames=4",
    "--data.size=16",
    "--data.batch_size=2",
    "--data.train_clips=8",
    "--data.epoch_batches=2",
    "--data.val_clips=2",
    "--model.sample_steps=2",
    "--model.num_val_samples=1",
]


#: environment a test may hand an in-process run (read by the recipes when they are parsed, or the
#: checkout's own path): anything else is read at start-up and needs a process
IN_PROCESS_ENV = ("WAN_MODEL_DIR", "WAN_SHARDS", "LTX_MODEL_DIR", "LTX_SHARDS")
#: arguments that need a process of their own: a callback that signals or kills its process, DDP
#: (Lightning starts the other ranks by running the command line again)
NEEDS_PROCESS = ("tests.helpers.Kill", "strategy=ddp", "devices=2", "num_nodes")


def run_tcplug(*args, env=None, cwd=None, timeout=300, process=None):
    """Run ``tcplug ARGS``: in this process (:func:`tcplug_in_process`, no interpreter start-up
    and imports to pay for, ~12 s a call on a 2-core machine), or as the real console command in a
    subprocess when ``process`` is true -- the default when ``env`` holds more than
    :data:`IN_PROCESS_ENV` and the checkout's ``PYTHONPATH``, or the arguments name a kill or DDP
    (:data:`NEEDS_PROCESS`). Tests of exit paths, warnings and imports ask for one. Returns a
    ``CompletedProcess`` either way."""
    if process is None:
        process = any(k not in IN_PROCESS_ENV and not (k == "PYTHONPATH" and v == str(ROOT)) for k, v in (env or {}).items()) \
            or any(m in str(a) for a in args for m in NEEDS_PROCESS)
    if not process:
        code, out, err = tcplug_in_process(*args, cwd=cwd or os.getcwd(),
                                           env={k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
        return subprocess.CompletedProcess(["tcplug", *map(str, args)], code, out, err)
    full_env = dict(os.environ)
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("tcplug")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tcplug"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def tcplug_in_process(*args, cwd, env=None) -> tuple[int, str, str]:
    """Run ``tcplug ARGS`` in this process (no interpreter start-up or imports to pay for: for the
    many short fits whose subject is a recipe, not the command line); ``(status, stdout, stderr)``.
    The same runner the benchmarks' smoke runs use (``benchmarks/_inproc.py``)."""
    from benchmarks._inproc import tcplug

    proc = tcplug(list(args), cwd, True, env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def tiny():
    return list(TINY)
