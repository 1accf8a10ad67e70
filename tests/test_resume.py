"""Scale out: DDP on CPU (gloo), two nodes under torchrun, the FSDP preset. (Resume after a
kill and atomic checkpoints are in the fault catalogue, tests/test_faults.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import RECIPES, ROOT, run_tcplug

ENV = {"PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_full_recipe_ddp_two_ranks(tmp_path, tiny):
    """full.yaml on 2 gloo ranks: validation metrics reduced across ranks (equal on both),
    one run folder, files written by rank 0 only."""
    tiny = [a for a in tiny if not a.startswith(("--data.train_clips", "--data.val_clips", "--model.num_val_samples"))]
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, "--data.train_clips=16", "--data.shard_size=2",
                      "--data.val_clips=4", "--model.num_val_samples=2",
                      "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      "--trainer.callbacks+=tests.helpers.DumpMetrics", f"--trainer.callbacks.init_args.out_dir={tmp_path}",
                      cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("val/loss", "val/tvs", "val/tvs_data", "val/warp_error", "val/flicker"):
        assert ranks[0][key] == pytest.approx(ranks[1][key], rel=1e-6), key
    runs = list((tmp_path / "runs" / "full").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    run = runs[0]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert len(list((run / "samples").glob("*.mp4"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_torchrun(tmp_path, tiny):
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on localhost (node ranks 0 and 1),
    `--trainer.num_nodes=2`: the two processes train together."""
    tiny = [a for a in tiny if not a.startswith(("--data.train_clips",))]
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "tcplug", "fit", "--config", str(RECIPES / "baseline.yaml"), *tiny,
               "--data.train_clips=16", "--data.shard_size=2", "--trainer.num_nodes=2", "--trainer.devices=1",
               "--trainer.strategy=ddp", "--trainer.accelerator=cpu",
               "--trainer.callbacks+=tests.helpers.RecordBatches", f"--trainer.callbacks.init_args.out_dir={tmp_path}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 2
    assert not set(ranks[0]["urls"]) & set(ranks[1]["urls"])
    assert [p.name for p in (tmp_path / "runs" / "baseline").iterdir()] == ["version_0"]


def test_fsdp_preset_wraps_each_dit_block():
    """FSDP is selectable by a preset; its policy resolves to the dit block class (FSDP itself
    needs GPUs in Lightning: on CPU the run stops with one clear line, see test_faults.py)."""
    from tcplug import get_component
    from tests.helpers import fsdp_wrapped_classes

    block = __import__(get_component("backbone", "dit").__module__).DiTBlock
    assert fsdp_wrapped_classes(RECIPES / "presets" / "fsdp.yaml") == {block}
