"""Every benchmark runs in smoke mode and prints one JSON line (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_listed():
    assert set(SCRIPTS) >= {"attention.py", "flow_warp.py", "loader.py", "overhead.py", "sampling.py", "score.py",
                            "streaming.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert json.loads(lines[0])["bench"] == script[:-3]


@pytest.mark.slow
def test_overhead_benchmark_covers_the_wan_family(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "overhead.py"), "--smoke", "--recipe", "wan"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][0])
    assert line["recipe"] == "recipes/wan/tiny.yaml" and line["plain_ms_per_step"] > 0
