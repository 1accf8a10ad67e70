"""A separately installed plugin package works by name, with no change to tcplug.

The package in examples/tcplug-token-shift is pip-installed into a temporary folder (no
network, no build isolation) and put on PYTHONPATH of the `tcplug` subprocesses, exactly as
a user's `pip install` would make its entry point visible.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import RECIPES, ROOT, run_tcplug

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "tcplug-token-shift"  # a private copy: workers build in parallel
    shutil.copytree(ROOT / "examples" / "tcplug-token-shift", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return {"PYTHONPATH": str(target)}


def test_listed_by_plugins(site):
    data = json.loads(run_tcplug("plugins", "--json", env=site).stdout)
    plugin = {p["name"]: p for p in data["plugins"]}["token_shift"]
    assert plugin == {"name": "token_shift", "version": "0.1.0", "status": "ok", "error": None}
    assert data["components"]["attention"]["token_shift"] == "tcplug_token_shift:TokenShift"


def test_used_by_name_in_yaml(site, tmp_path, tiny):
    recipe = tmp_path / "ts.yaml"
    recipe.write_text(f"base: {RECIPES / 'baseline.yaml'}\nmodel:\n  backbone:\n    init_args:\n      attention:\n"
                      "        class_path: token_shift\n        init_args:\n          fraction: 0.5\n")
    proc = run_tcplug("fit", "--config", recipe, *tiny, env=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "tcplug_token_shift.TokenShift" in cfg and "fraction: 0.5" in cfg


def test_used_by_name_on_command_line(site, tmp_path, tiny):
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny,
                      "--model.backbone.init_args.attention=token_shift",
                      "--model.backbone.init_args.attention.init_args.fraction=0.5", env=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and the trained model samples (all at once: full.yaml has conditioners)
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", "4", "--out", tmp_path / "a.mp4", "--steps", "2",
                      "--clip", "0", env=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tutorial_variant_streams_in_tcplug_sample(site, tmp_path, tiny):
    """The tutorial's variant, copied verbatim, trains and then streams a long video with
    `tcplug sample` (the K/V buffer hands it kv_index; its memory() keeps one frame)."""
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny,
                      "--model.backbone.init_args.attention=token_shift", "--model.sampler=ddim", env=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", "9", "--chunk", "3", "--out", tmp_path / "long.mp4",
                      "--steps", "2", env=site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "long.mp4").stat().st_size > 0


def test_gate_excludes_third_party_but_keeps_builtins(site):
    env = dict(site, TCPLUG_LOAD_PLUGINS="")
    data = json.loads(run_tcplug("plugins", "--json", env=env).stdout)
    names = {p["name"] for p in data["plugins"]}
    assert "token_shift" not in names and "tcplug.backbones" in names
    assert "token_shift" not in data["components"]["attention"]
    env = dict(site, TCPLUG_LOAD_PLUGINS="token_shift")
    data = json.loads(run_tcplug("plugins", "--json", env=env).stdout)
    assert "token_shift" in data["components"]["attention"]


def test_plugin_that_raises_on_import(tmp_path):
    """A broken plugin warns, shows as failed, and everything else still works."""
    site = tmp_path / "site"
    (site / "broken_plugin").mkdir(parents=True)
    (site / "broken_plugin" / "__init__.py").write_text("raise ImportError('no module named zzz')\n")
    dist = site / "broken_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[tcplug]\nbroken = broken_plugin\n")
    env = {"PYTHONPATH": str(site)}
    proc = run_tcplug("plugins", "--json", env=env)
    assert proc.returncode == 0
    assert "plugin 'broken' failed to load" in proc.stderr and "no module named zzz" in proc.stderr
    data = json.loads(proc.stdout)
    broken = {p["name"]: p for p in data["plugins"]}["broken"]
    assert broken["status"] == "failed" and broken["version"] == "1.2.3"
    assert "dit" in data["components"]["backbone"]
    # a recipe asking for a component of the failed plugin says so
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", "--model.backbone.init_args.attention=zzz",
                      "--print_config", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "failed to load and may provide it: broken" in proc.stderr
    # and training still works with the rest
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", "--config", RECIPES / "presets" / "cpu-smoke.yaml",
                      "--trainer.fast_dev_run=true", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
