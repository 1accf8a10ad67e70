"""Faults that must never lose work (the catalogue grows with the reliability issue)."""

import pytest
import torch

from tests.conftest import RECIPES, ROOT, run_tcplug


@pytest.mark.slow
def test_nan_loss_stops_naming_term_and_step_and_keeps_last_checkpoint(tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith(("--trainer.max_steps", "--trainer.val_check_interval",
                                                 "--data.epoch_batches"))]
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--trainer.max_steps=10",
                      "--data.epoch_batches=10", "--trainer.val_check_interval=10",
                      "--model.losses+=tests.helpers.NanAfter", "--model.losses.init_args.step=5",
                      "--checkpoint.every_n_train_steps=2", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "loss term 'nan_after' is nan at step 5" in proc.stderr
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4  # the last good checkpoint, written before the fault
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
