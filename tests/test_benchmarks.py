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


def test_ablation_rule_refuses_blur_and_lost_motion():
    """A recipe improves only with a lower TVS interval *and* motion, sharpness and frame distance
    near baseline's: blurred or frozen samples lower TVS too (the controls show it)."""
    import argparse

    sys.path.insert(0, str(BENCH))
    from ablation import verdict

    tol = argparse.Namespace(motion_tol=0.2, distance_tol=1.25, sharpness_tol=0.4)
    base = {"recipe": "baseline", "kind": "recipe", "motion_ratio": 2.27, "sharpness_ratio": 1.21,
            "frame_distance": 0.80}
    good = {"recipe": "x", "kind": "recipe", "tvs_diff_ci": [-3.0, -1.0], "motion_ratio": 1.1,
            "sharpness_ratio": 1.05, "frame_distance": 0.6}
    assert verdict(good, base, tol) == "improves"
    assert verdict({**good, "tvs_diff_ci": [-1.0, 0.5]}, base, tol) == "does not improve (TVS interval overlaps 0)"
    assert verdict({**good, "sharpness_ratio": 0.08}, base, tol) == "does not improve (blurred)"
    assert verdict({**good, "motion_ratio": 0.0}, base, tol) == "does not improve (motion off)"
    assert verdict({**good, "frame_distance": 1.2}, base, tol) == "does not improve (frames farther from data)"
