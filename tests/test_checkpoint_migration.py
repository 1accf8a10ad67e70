"""A checkpoint written before the house move (main d77ea62: the model's weights at the module's
top level, no layout stamp) still loads, samples the very clips it sampled then, and resumes to
the very weights it resumed to then (tests/data/README.md says how each file was made)."""

import json
import shutil

import pytest
import torch

from tcplug.checkpoint import LAYOUT, migrate
from tcplug.module import TCPlugModule
from tests.conftest import ROOT, run_tcplug
from tests.helpers import synthetic_batch

DATA = ROOT / "tests" / "data" / "pre_house"


def test_old_checkpoint_samples_the_same_clips():
    old = torch.load(DATA / "last.ckpt", weights_only=True)
    assert "tcplug_layout" not in old and any(k.startswith("experts.") for k in old["state_dict"])
    model = TCPlugModule.from_checkpoint(str(DATA / "last.ckpt"))
    batch = synthetic_batch(n=2, frames=4, size=16, seed=7)
    batch.pop("video")
    expected = torch.load(DATA / "sample.pt", weights_only=True)
    video = model.generate(2, 4, 16, 16, steps=3, seed=5, batch=batch)
    unlocked = model.generate(2, 4, 16, 16, steps=3, seed=6, batch=batch, guidance_scale=1.0, lock=False)
    torch.testing.assert_close(video, expected["video"], rtol=0, atol=1e-5)
    torch.testing.assert_close(unlocked, expected["unlocked"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_old_checkpoint_resumes_to_the_same_weights(tmp_path):
    """Weights, EMA weights, optimizer states (their parameter order), the data position and the
    step's randomness all carry over: two steps after resuming, every tensor sums as it did."""
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(DATA / "last.ckpt", ckpt)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(torch.load(ckpt, weights_only=True)["tcplug_config"])
    proc = run_tcplug("fit", "--config", recipe, "--trainer.max_steps=5", "--trainer.val_check_interval=5",
                      "--trainer.enable_progress_bar=false", "--data.epoch_batches=3", "--ckpt_path", ckpt,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(tmp_path / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 5 and resumed["tcplug_layout"] == LAYOUT
    expected = json.loads((DATA / "resumed.json").read_text())
    for part, sums in expected.items():
        new = {k: v for k, v in resumed[part].items()}
        for key, (total, absolute) in sums.items():
            value = new[f"diffusion.{key}" if not key.startswith(("losses.", "discriminator.")) else key].double()
            assert abs(float(value.sum()) - total) <= 1e-6 * max(1.0, abs(total)), (part, key)
            assert abs(float(value.abs().sum()) - absolute) <= 1e-6 * max(1.0, absolute), (part, key)


def test_migration_moves_the_model_keys_once():
    old = {"state_dict": {"experts.0.w": 1, "latent.s": 2, "conditioners.0.a": 3, "router.g": 4,
                          "motion_lock.m": 5, "losses.0.net.w": 6, "discriminator.d": 7},
           "current_model_state": {"experts.0.w": 1}, "tcplug_folder_weights": ["experts.0.model.x", "latent.vae.y"]}
    migrate(old)
    assert old["state_dict"] == {"diffusion.experts.0.w": 1, "diffusion.latent.s": 2, "diffusion.conditioners.0.a": 3,
                                 "diffusion.router.g": 4, "diffusion.motion_lock.m": 5, "losses.0.net.w": 6,
                                 "discriminator.d": 7}
    assert old["current_model_state"] == {"diffusion.experts.0.w": 1}
    assert old["tcplug_folder_weights"] == ["diffusion.experts.0.model.x", "diffusion.latent.vae.y"]
    assert old["tcplug_layout"] == LAYOUT
    again = json.loads(json.dumps(old))
    migrate(again)  # today's layout is left as it is
    assert again == old

