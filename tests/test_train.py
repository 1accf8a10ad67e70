"""End to end: a short fit leaves the whole run folder."""

import json

import pytest

from tests.conftest import RECIPES, run_tcplug, tcplug_in_process

RECIPE_FILES = [p for p in sorted(RECIPES.glob("*.yaml")) if p.stem != "base"]  # baseline.yaml is base.yaml alone


def test_fit_leaves_run_folder(tmp_path, tiny):
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, "--trainer.max_steps=4",
                      "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "full" / "version_0"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    samples = sorted((run / "samples").glob("*.mp4"))
    assert len(samples) == 2  # one per validation
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and "val/loss" in metrics["metrics"]
    for key in ("val/tvs", "val/tvs_data", "val/warp_error", "val/flicker", "val/bg_flicker", "val/coverage",
                "val/motion_ratio", "val/sharpness_ratio", "val/frame_distance", "val/trajectory_error_data",
                "val/tvs_data_gt", "val/motion_ratio_data", "val/frame_distance_data", "val/expert_steps_0",
                "train/expert_share_0", "train/expert_share_1"):
        assert key in metrics["metrics"], key
    assert metrics["metrics"]["val/tvs_data"] > metrics["metrics"]["val/tvs_data_gt"] + 0.01  # DIS floor vs exact flow
    assert metrics["metrics"]["val/tvs_data_gt"] < 1e-4
    assert metrics["last_checkpoint"].endswith("last.ckpt")
    from tcplug.video import read_video

    frames = read_video(samples[-1])
    assert frames.shape == (4, 16, 16, 3)  # T frames, one sample side by side
    # the sample GIF reached TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    assert "samples/video" in acc.Tags()["images"]
    assert "train/loss_denoise" in acc.Tags()["scalars"]


def test_resume_from_last(tmp_path, tiny):
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt"
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, "--trainer.max_steps=4",
                      f"--ckpt_path={ckpt}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_recipe_smoke(recipe, tmp_path, tiny):
    code, _, err = tcplug_in_process("fit", "--config", recipe, *tiny, cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert (tmp_path / "runs" / recipe.stem / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_other_lightning_subcommands(sub, tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith(("--trainer.max_steps", "--trainer.val_check_interval"))]
    proc = run_tcplug(sub, "--config", RECIPES / "full.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


PRESETS = sorted((RECIPES / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_overlay_full_recipe(preset, capsys):
    """Every preset composes with full.yaml into a valid config (cpu-smoke also trains: the
    TensorBoard tutorial runs it)."""
    import yaml

    from tcplug.cli import main

    try:
        code = main(["fit", "--config", str(RECIPES / "full.yaml"), "--config", str(preset), "--print_config"])
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr().out
    assert code == 0
    cfg = yaml.safe_load(out)
    if preset.stem == "gpu":
        assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["model"]["compile"] is True
        assert cfg["model"]["backbone"]["init_args"]["dim"] == 384
    if preset.stem == "ddp":
        assert cfg["trainer"]["strategy"] == "ddp"
