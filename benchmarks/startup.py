"""Start-up cost of the `tcplug` command: CPU seconds (user + system, the process and its
children) of commands that answer without training, median over repeats, and the heavy modules
each imported. The goal: `tcplug --help` in <= 2 s of CPU; `import torch` alone is the floor.

Prints one JSON line. Usage:
  python benchmarks/startup.py [--repeats 5]
  python benchmarks/startup.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "torchmetrics", "diffusers", "transformers", "peft")
REPORT = ("import sys, atexit\n"
          "atexit.register(lambda: print('LOADED', ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))\n")
COMMANDS = {
    "import torch": "import torch",
    "import tcplug": "import tcplug",
    "tcplug --help": "from tcplug.cli import main; main(['--help'])",
    "tcplug plugins": "from tcplug.cli import main; main(['plugins'])",
    "recipe error": "from tcplug.cli import main; main(['fit', '--config', 'recipes/nope.yaml'])",
    "option error": "from tcplug.cli import main; main(['fit', '--config', 'recipes/full.yaml', '--model.lrr=1'])",
}


def cpu_seconds(code: str) -> tuple[float, list[str]]:
    """CPU time of one fresh interpreter running ``code``, and the heavy modules it imported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", REPORT.format(heavy=HEAVY) + code], capture_output=True, text=True,
                          cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED")), "LOADED ")
    loaded = [m for m in line.split(" ", 1)[1].split(",") if m]
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), loaded


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    repeats = 1 if args.smoke else args.repeats
    out = {"bench": "startup", "machine": platform.machine(), "python": platform.python_version(), "repeats": repeats}
    commands = {k: COMMANDS[k] for k in ("import tcplug", "recipe error")} if args.smoke else COMMANDS  # smoke: seconds
    for name, code in commands.items():
        runs = [cpu_seconds(code) for _ in range(repeats)]
        out[name] = {"cpu_s": round(statistics.median(t for t, _ in runs), 2), "imports": runs[0][1]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
