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


def run_tcplug(*args, env=None, cwd=None, timeout=300):
    """Run the real `tcplug` console command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("tcplug")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tcplug"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def tcplug_in_process(*args, cwd) -> tuple[int, str, str]:
    """Run ``tcplug ARGS`` in this process (no interpreter start-up or imports to pay for: for the
    many short fits whose subject is a recipe, not the command line); ``(status, stdout, stderr)``."""
    import contextlib
    import io
    import warnings

    from tcplug.cli import main

    out, err, here, environ = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    try:
        # what a run changes for its process (warning filters, PL_GLOBAL_SEED...) is undone after it
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return int(code or 0), out.getvalue(), err.getvalue()


@pytest.fixture
def tiny():
    return list(TINY)
