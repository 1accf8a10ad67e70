"""The `tcplug` command: LightningCLI features, registry names, clear errors."""

import json

import pytest
import yaml

from tests.conftest import RECIPES, run_tcplug

FULL = RECIPES / "full.yaml"


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_plugins_json_lists_builtins_and_components():
    proc = run_tcplug("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"plugins", "components"}
    names = {p["name"]: p for p in data["plugins"]}
    for builtin in ("tcplug.backbones", "tcplug.attention", "tcplug.latents", "tcplug.losses"):
        assert names[builtin]["status"] == "ok" and names[builtin]["version"]
        assert set(names[builtin]) == {"name", "version", "status", "error"}
    comps = data["components"]
    assert comps["backbone"]["dit"] == "tcplug_backbones:DiT"
    assert comps["attention"]["per_frame"] == "tcplug_attention:PerFrame"
    assert set(comps) == {"backbone", "attention", "latent", "loss", "discriminator", "router",
                          "conditioner", "motion_lock", "metric"}
    assert comps["metric"]["motion_ratio"] == "tcplug.metrics.fidelity:MotionRatio"


def test_plugins_text_and_python_dash_m():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tcplug", "plugins"], capture_output=True, text=True)
    assert proc.returncode == 0 and "dit" in proc.stdout and "tcplug.backbones" in proc.stdout


def test_help_lists_subcommands():
    proc = run_tcplug("--help")
    assert proc.returncode == 0 and "fit" in proc.stdout and "plugins" in proc.stdout


def test_print_config_roundtrip(tmp_path, tiny):
    proc = run_tcplug("fit", "--config", FULL, "--print_config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["backbone"]["class_path"] == "tcplug_backbones.DiT"
    x = tmp_path / "x.yaml"
    x.write_text(proc.stdout)
    run = run_tcplug("fit", "--config", x, *tiny, "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]


def test_several_configs_overrides_and_interpolation(tmp_path, tiny):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "model:\n  backbone:\n    init_args:\n      depth: 2\n      dim: 32\n"
        "data:\n  frames: 4\n  size: 16\n  batch_size: ${data.frames}\n"
    )
    proc = run_tcplug("fit", "--config", FULL, "--config", overlay, "--model.lr=1.0e-3", "--print_config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["backbone"]["init_args"]["depth"] == 2
    assert cfg["data"]["batch_size"] == 4  # interpolated from data.frames
    assert cfg["model"]["lr"] == pytest.approx(1e-3)


def test_short_names_on_command_line():
    proc = run_tcplug("fit", "--config", FULL, "--model.backbone.init_args.attention=per_frame", "--print_config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["backbone"]["init_args"]["attention"]["class_path"] == "tcplug_attention.PerFrame"


def test_full_import_path_works():
    proc = run_tcplug("fit", "--config", FULL, "--model.latent=tcplug_latents.Pixel", "--print_config")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("override", ["--model.backbone.init_args.attention=per_fram",
                                      "--model.backbone.init_args.attention.class_path=per_fram"])
def test_unknown_component_name(override):
    proc = run_tcplug("fit", "--config", FULL, override, "--print_config")
    assert proc.returncode == 2
    no_traceback(proc)
    assert "unknown attention 'per_fram'" in proc.stderr
    available = proc.stderr.split("Available attention components: ")[1].split(".")[0]
    assert {"per_frame", "cross_frame", "first_frame"} <= set(available.split(", "))
    assert "Did you mean 'per_frame'?" in proc.stderr


def test_unknown_component_name_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {FULL}\nmodel:\n  backbone:\n    class_path: ditt\n")
    proc = run_tcplug("fit", "--config", bad, "--print_config")
    assert proc.returncode == 2
    no_traceback(proc)
    assert "unknown backbone 'ditt'" in proc.stderr and "Did you mean 'dit'?" in proc.stderr


def test_wrong_init_argument():
    proc = run_tcplug("fit", "--config", FULL, "--model.backbone.init_args.dimm=3", "--print_config")
    assert proc.returncode == 2
    no_traceback(proc)
    assert "DiT takes no argument 'dimm'. Did you mean 'dim'?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, not the whole usage


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [1,\n")
    proc = run_tcplug("fit", "--config", bad)
    assert proc.returncode == 2
    no_traceback(proc)
    assert "error" in proc.stderr.lower()


def test_missing_config_file(tmp_path):
    proc = run_tcplug("fit", "--config", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    no_traceback(proc)


def test_invalid_value_raises_tcplug_error_cleanly(tmp_path, tiny):
    # in_channels that does not match the latent design is caught with a one-line message
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--model.backbone.init_args.in_channels=4",
                      cwd=tmp_path)
    assert proc.returncode == 2
    no_traceback(proc)
    assert "in_channels=4" in proc.stderr and "latent_channels=3" in proc.stderr


def test_validate_of_a_checkpoint_writes_into_its_run_folder(tmp_path, tiny):
    """`tcplug validate --ckpt_path RUN/checkpoints/last.ckpt` writes into RUN (no new version_N)
    and names its sample by the checkpoint's step, not step 0."""
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    proc = run_tcplug("validate", "--config", RECIPES / "baseline.yaml", *tiny, "--ckpt_path", ckpt, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "runs" / "baseline").iterdir()] == ["version_0"]
    assert (tmp_path / "runs" / "baseline" / "version_0" / "samples" / "validate_step_0000002.mp4").exists()


def test_a_run_prints_its_summary(tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith("--trainer.enable_model_summary")]
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0
    out = proc.stdout + proc.stderr
    assert "Total FLOPs" in out and "Total FLOPs: 0 " not in out  # counted on a one-clip example batch
    assert "tcplug: run finished at step 2 — runs/baseline/version_0" in proc.stderr
    assert "checkpoint  runs/baseline/version_0/checkpoints/last.ckpt" in proc.stderr
    assert "metrics     " in proc.stderr and "tvs=" in proc.stderr


def test_progress_counts_the_whole_run_and_the_world_announces_itself(tmp_path, tiny):
    """The training bar counts the run's steps (not per epoch) with an ETA; the first run on a
    new synthetic world says where it writes it and how big it is, before writing."""
    tiny = [a for a in tiny if not a.startswith(("--trainer.enable_progress_bar", "--trainer.max_steps",
                                                 "--trainer.val_check_interval"))]
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--trainer.max_steps=6",
                      "--trainer.val_check_interval=6", cwd=tmp_path, env={"TCPLUG_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr.replace("\r", "\n")
    assert "tcplug: generating the synthetic world once (8 + 2 clips of 4 frames at 16x16, about" in err
    assert f"MB) into {tmp_path / 'cache'}" in err
    bar = proc.stdout.replace("\r", "\n")  # Lightning's bars write to stdout
    assert "train (steps): 100%" in bar and "6/6" in bar  # data.epoch_batches=2: three epochs, one bar
    assert "Epoch" not in bar
