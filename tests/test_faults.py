"""The catalogue of faults and bad inputs: configs, plugins, data, checkpoints, numbers, signals.

Each case asserts a clear message (one line, no traceback) and that nothing is lost. The
quick cases run the real command line in-process (`tcplug.cli.main`); the signal cases run
`tcplug fit` in a subprocess and kill it. docs/reliability.md lists every case: the count
there is checked against this file.
"""

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from tcplug import AttentionVariant
from tcplug import hookimpl as tcplug_hookimpl
from tcplug.cli import main
from tests.conftest import RECIPES, ROOT, TINY, run_tcplug

ENV = {"PYTHONPATH": str(ROOT)}
BASE = str(RECIPES / "baseline.yaml")
FULL = str(RECIPES / "full.yaml")


def weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def run_args(tiny, name, steps=10):
    tiny = [a for a in tiny if not a.startswith(("--trainer.max_steps", "--data.epoch_batches",
                                                 "--trainer.val_check_interval", "--trainer.limit_val_batches"))]
    return [*tiny, f"--trainer.max_steps={steps}", "--data.epoch_batches=4", "--trainer.limit_val_batches=0",
            "--checkpoint.every_n_train_steps=2", f"--trainer.logger.init_args.name={name}"]


def cli(capsys, *args):
    """Run the command line in-process: (exit code, stderr)."""
    import logging

    logging.raiseExceptions = False  # Lightning's log handler may hold an earlier test's captured stream
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def a_checkpoint(tmp_path, capsys) -> Path:
    code, err = cli(capsys, "fit", "--config", BASE, *TINY)
    assert code == 0, err[-2000:]
    return next((tmp_path / "runs").rglob("last.ckpt"))


def evil_checkpoint(path: Path, good: Path) -> Path:
    ckpt = weights(good)
    ckpt["payload"] = Evil()
    torch.save(ckpt, path)
    return path


class Evil:
    def __reduce__(self):
        return (print, ("this ran at load time",))


# ----- the catalogue: (id, what goes wrong, setup -> argv, exit code, message regex) ------------
def _yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


CONFIG_CASES = [
    ("unknown-component", lambda t: ["fit", "--config", BASE, "--model.backbone.init_args.attention=per_fram",
                                     "--print_config"], 2, r"Did you mean 'per_frame'"),
    ("wrong-init-argument", lambda t: ["fit", "--config", BASE, "--model.backbone.init_args.dimm=3",
                                       "--print_config"], 2, r"dimm"),
    ("malformed-yaml", lambda t: ["fit", "--config", _yaml(t, "model: [unclosed\n")], 2, r"."),
    ("missing-config", lambda t: ["fit", "--config", t / "nope.yaml"], 2, r"nope\.yaml"),
    ("channels-mismatch", lambda t: ["fit", "--config", BASE, *TINY, "--model.latent.init_args.channels=4",
                                     "--model.backbone.init_args.in_channels=3"], 2, r"in_channels=3.*latent_channels=4"),
    ("negative-loss-weight", lambda t: ["fit", "--config", BASE, *TINY, "--model.losses.init_args.weight=-1"], 2,
     r"loss weight must be >= 0"),
    ("adversarial-without-discriminator", lambda t: ["fit", "--config", BASE, *TINY, "--model.losses+=adversarial"],
     2, r"needs model.discriminator"),
    ("unknown-data-key", lambda t: ["fit", "--config", BASE, *TINY, "--data.keys=[flow,depht]"], 2,
     r"unknown data.keys \['depht'\]"),
    ("one-frame-clips", lambda t: ["fit", "--config", BASE, *TINY, "--data.frames=1"], 2, r"data.frames must be >= 2"),
    ("router-boundaries-out-of-order", lambda t: ["fit", "--config", BASE, *TINY, "--model.router=noise_boundary",
                                                  "--model.router.num_experts=3",
                                                  "--model.router.boundaries=[200,800]"], 2, r"decreasing"),
    ("text-encoder-not-local", lambda t: ["fit", "--config", str(RECIPES / "captions.yaml"), *TINY,
                                          "--model.conditioner.init_args.pretrained=org/model-on-the-hub"], 2,
     r"not a local directory \(weights are never downloaded\)"),
    ("mask-image-missing", lambda t: ["fit", "--config", BASE, *TINY, "--model.motion_lock=mask",
                                      f"--model.motion_lock.image={t / 'nope.png'}"], 2, r"does not exist"),
    ("fsdp-on-cpu", lambda t: ["fit", "--config", BASE, *TINY, "--trainer.strategy=fsdp", "--trainer.accelerator=cpu",
                               "--trainer.devices=2"], 2, r"trainer: The strategy `fsdp` requires a GPU"),
    # the command line (one short line, the closest valid name)
    ("misspelt-option", lambda t: ["fit", "--config", BASE, "--model.lrr=1"], 2,
     r"^tcplug: error: unrecognized option --model.lrr\. Did you mean --model.lr\?"),
    ("misspelt-data-option", lambda t: ["fit", "--config", BASE, "--data.sizee=3"], 2, r"Did you mean --data.size\?"),
    ("wrong-value-type", lambda t: ["fit", "--config", BASE, "--model.lr=abc"], 2, r"model.lr: Expected a <class 'float'>"),
    ("negative-learning-rate", lambda t: ["fit", "--config", BASE, *TINY, "--model.lr=-1"], 2, r"model.lr must be > 0"),
    ("size-not-multiple-of-patch", lambda t: ["fit", "--config", FULL, "--data.size=30"], 2,
     r"data.size=30 does not fit the model: .* a multiple of 4 \(e.g. 28 or 32\)"),
    ("shards-path-missing", lambda t: ["fit", "--config", BASE, *TINY, f"--data.shards={t / 'nope'}"], 2,
     r"data shards .*nope does not exist"),
    ("scheduler-folder-missing", lambda t: ["fit", "--config", BASE, *TINY, "--model.noise=flow_matching",
                                            "--model.prediction_type=flow", f"--model.scheduler={t / 'nope'}"], 2,
     r"no scheduler_config.json there"),
    # real model families (tiny random Wan)
    ("frames-not-4k+1", lambda t: ["fit", "--config", WAN_TINY, "--data.frames=8"], 2,
     r"data.frames=8: WanVAE compresses time 4x: a clip needs 4k\+1 frames \(e.g. 5 or 9\), got 8"),
    ("model-folder-without-transformer", lambda t: ["fit", "--config", WAN_TINY, *_no_config("backbone"),
                                                    f"--model.backbone.init_args.pretrained={_empty(t)}"], 2,
     r"has no transformer/ \(a diffusers model folder holds transformer/"),
    ("model-folder-not-local", lambda t: ["fit", "--config", WAN_TINY, *_no_config("latent"),
                                          "--model.latent.init_args.pretrained=Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], 2,
     r"is not a local folder \(weights are never downloaded\)"),
    ("vae-channels-mismatch", lambda t: ["fit", "--config", WAN_TINY, "--config", _yaml(t, WAN_4CH)], 2,
     r"in_channels=4 but the latent design WanVAE has latent_channels=16"),
    ("lora-targets-match-nothing", lambda t: ["fit", "--config", WAN_TINY, "--model.lora.rank=4",
                                              "--model.lora.target_modules=[q_proj]"], 2,
     r"target_modules \['q_proj'\] match no module of WanTransformer3DModel .*: .*to_q"),
    ("expert-backbones-without-router", lambda t: ["fit", "--config", WAN_TINY, "--config", _yaml(t, WAN_TWO)], 2,
     r"a list of 2 backbones: that needs a router with experts: backbone and num_experts: 2"),
    ("train-experts-out-of-range", lambda t: ["fit", "--config", WAN_TINY, "--model.router=noise_boundary",
                                              "--model.train_experts=[2]"], 2, r"train_experts \[2\]: give indices in 0..1"),
    ("text-precomputed-without-embeddings", lambda t: ["fit", "--config", WAN_TINY, *TINY_WAN,
                                                       "--model.conditioner=wan_text",
                                                       "--model.conditioner.precomputed=true"], 2,
     r"wan_text is precomputed: the batch must carry text_emb"),
]

WAN_TINY = str(RECIPES / "wan" / "tiny.yaml")
TINY_WAN = [a for a in TINY if not a.startswith(("--data.frames", "--data.size"))] + ["--data.frames=5", "--data.size=32"]
WAN_4CH = """model:
  backbone:
    init_args:
      config: {patch_size: [1, 2, 2], num_attention_heads: 2, attention_head_dim: 8, in_channels: 4, out_channels: 4,
               text_dim: 32, freq_dim: 32, ffn_dim: 32, num_layers: 1, rope_max_seq_len: 32}
"""
WAN_TWO = """model:
  backbone:
    - class_path: wan
      init_args:
        config: {patch_size: [1, 2, 2], num_attention_heads: 2, attention_head_dim: 8, in_channels: 16,
                 out_channels: 16, text_dim: 32, freq_dim: 32, ffn_dim: 32, num_layers: 1, rope_max_seq_len: 32}
    - class_path: wan
      init_args:
        config: {patch_size: [1, 2, 2], num_attention_heads: 2, attention_head_dim: 8, in_channels: 16,
                 out_channels: 16, text_dim: 32, freq_dim: 32, ffn_dim: 32, num_layers: 1, rope_max_seq_len: 32}
"""


def _no_config(component: str) -> list[str]:
    """Swap a tiny recipe's config-built component for a folder-loaded one."""
    return [f"--model.{component}.init_args.config=null"]


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_faults(case, tmp_path, capsys, monkeypatch):
    """Bad configs: exit 2 with one clear line; nothing started (no run folder)."""
    monkeypatch.chdir(tmp_path)
    name, make, want_code, pattern = case
    code, err = cli(capsys, *make(tmp_path))
    assert code == want_code, err[-2000:]
    assert "Traceback" not in err and re.search(pattern, err), err[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))


# ----- plugins ----------------------------------------------------------------------------------
class _BrokenHook:
    @tcplug_hookimpl
    def tcplug_register_components(self, register):
        raise RuntimeError("boom in register")


class PerFrame(AttentionVariant):
    """Same name as a built-in."""


class _Duplicate:
    @tcplug_hookimpl
    def tcplug_register_components(self, register):
        register(PerFrame, name="per_frame")


@pytest.mark.parametrize("plugin,expect", [(_BrokenHook, "boom in register"), (_Duplicate, "per_frame")],
                         ids=["plugin-hook-raises", "plugin-duplicate-name"])
def test_plugin_faults(plugin, expect, capsys):
    """A broken plugin is reported (`tcplug plugins` says failed, a warning names it) and
    every other plugin's components still work."""
    import warnings

    import tcplug

    name = tcplug.register_plugin(plugin(), name="faulty-test")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _ = cli(capsys, "plugins", "--json")
        assert code == 0
        info = {i.name: i for i in tcplug.plugin_infos()}
        assert info["faulty-test"].status == "failed" and expect in info["faulty-test"].error
        assert any("faulty-test" in str(w.message) for w in caught)
        assert tcplug.get_component("attention", "per_frame").__module__ == "tcplug_attention"
        assert "dit" in tcplug.list_components("backbone")
    finally:
        tcplug.unregister_plugin(name)


# ----- data -------------------------------------------------------------------------------------
def _synth(tmp_path, capsys, clips=8):
    out = tmp_path / "shards"
    code, err = cli(capsys, "data", "synth", "--out", out, "--clips", clips, "--frames", 4, "--size", 16,
                    "--shard-size", 4)
    assert code == 0, err
    return out


def _corrupt_first_frames(shard: Path) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        done = False
        for m, data in members:
            if not done and m.name.endswith("frames.npy"):
                data, done = b"\x93NUMPY garbage", True
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_data_corrupt_sample_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = _synth(tmp_path, capsys)
    _corrupt_first_frames(sorted(shards.glob("*.tar"))[0])
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, f"--data.shards={shards}")
    assert code == 0, err[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["global_step"] == 2 and metrics["metrics"]["data/skipped"] >= 1


def test_data_missing_ground_truth_for_a_conditioner(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "fit", "--config", RECIPES / "world_model.yaml", *TINY, "--data.keys=[static]")
    assert code == 2 and "Traceback" not in err
    assert "conditioner 'physics_state' needs 'state' in the batch" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("version_*"))  # no empty run folder


def test_data_no_shards_at_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, f"--data.shards={tmp_path / 'empty'}")
    assert code == 2 and "no shards found" in err and "Traceback" not in err


def test_data_too_few_shards_for_the_processes(tmp_path, capsys):
    from tcplug import TcplugError
    from tcplug.data import VideoDataModule

    shards = _synth(tmp_path, capsys, clips=4)  # one shard
    dm = VideoDataModule(shards=str(shards), frames=4, size=16)
    dm.setup()
    with pytest.raises(TcplugError, match="1 training shard\\(s\\) for 2 processes: every process needs its own"):
        dm.train_dataset(0, 2)


# ----- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_with_pickled_payload_refused_by_sample_and_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = evil_checkpoint(tmp_path / "evil.ckpt", a_checkpoint(tmp_path, capsys))
    code, err = cli(capsys, "sample", "--ckpt", evil, "--frames", 4, "--out", tmp_path / "x.mp4")
    assert code == 2 and "refused to load: the checkpoint carries pickled objects" in err
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, "--ckpt_path", evil)
    assert code == 2 and "refused to load" in err and "Traceback" not in err
    assert "this ran at load time" not in capsys.readouterr().out
    assert not (tmp_path / "x.mp4").exists()


def test_checkpoint_truncated_or_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = a_checkpoint(tmp_path, capsys)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, "--ckpt_path", cut)
    assert code == 2 and "not a readable checkpoint" in err
    code, err = cli(capsys, "sample", "--ckpt", tmp_path / "none.ckpt", "--frames", 4, "--out", tmp_path / "x.mp4")
    assert code == 2 and "no such checkpoint" in err
    assert weights(good)["global_step"] == 2  # the good one untouched


def test_checkpoint_without_its_recipe(tmp_path, capsys):
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    code, err = cli(capsys, "sample", "--ckpt", bare, "--frames", 4, "--out", tmp_path / "x.mp4")
    assert code == 2 and "no recipe inside" in err


def test_checkpoint_whose_weights_do_not_fit(tmp_path, capsys):
    """Weights a component's current layers cannot take (the component changed since the
    checkpoint was written): refused with the checkpoint and the tensor named."""
    old = torch.load(ROOT / "tests" / "data" / "pre_house" / "last.ckpt", weights_only=True)
    key = next(k for k, v in old["state_dict"].items() if v.dim() == 2)
    old["state_dict"][key] = torch.zeros(old["state_dict"][key].shape[0] + 1, old["state_dict"][key].shape[1])
    changed = tmp_path / "changed.ckpt"
    torch.save(old, changed)
    code, err = cli(capsys, "sample", "--ckpt", changed, "--frames", 4, "--out", tmp_path / "x.mp4")
    assert code == 2 and "do not fit the model its recipe builds" in err and key.split(".")[-1] in err, err[-2000:]
    assert "Traceback" not in err


# ----- numbers ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_loss_stops_naming_term_and_step_and_keeps_last_checkpoint(tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith(("--trainer.max_steps", "--trainer.val_check_interval",
                                                 "--data.epoch_batches"))]
    proc = run_tcplug("fit", "--config", BASE, *tiny, "--trainer.max_steps=10",
                      "--data.epoch_batches=10", "--trainer.val_check_interval=10",
                      "--model.losses+=tests.helpers.NanAfter", "--model.losses.init_args.step=5",
                      "--checkpoint.every_n_train_steps=2", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "loss term 'nan_after' is nan at step 5" in proc.stderr
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    state = weights(ckpt)
    assert state["global_step"] == 4  # the last good checkpoint, written before the fault
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


# ----- signals ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_keeps_the_last_checkpoint_and_resumes(tmp_path, tiny):
    recipe = RECIPES / "baseline.yaml"
    proc = run_tcplug("fit", "--config", recipe, *run_args(tiny, "c", steps=8), "--trainer.callbacks+=tests.helpers.KillAt",
                      "--trainer.callbacks.init_args.step=5", "--trainer.callbacks.init_args.signal=SIGINT",
                      cwd=tmp_path, env=ENV)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    ckpt = tmp_path / "runs" / "c" / "version_0" / "checkpoints" / "last.ckpt"
    assert weights(ckpt)["global_step"] == 4
    assert re.search(r"interrupted at step 5; the last checkpoint: .*last\.ckpt \(step 4\)\. Resume with --ckpt_path "
                     r"last", proc.stderr), proc.stderr[-2000:]  # says where it is and how to go on
    proc = run_tcplug("fit", "--config", recipe, *run_args(tiny, "c", steps=8), "--ckpt_path", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert weights(ckpt)["global_step"] == 8


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path, tiny):
    """full.yaml (every source of randomness: noise, timesteps, caption dropout, lock choice)
    killed with SIGKILL mid-epoch, resumed with --ckpt_path last, ends with exactly the weights
    of an uninterrupted run; the data order is part of the checkpoint."""
    full = RECIPES / "full.yaml"
    proc = run_tcplug("fit", "--config", full, *run_args(tiny, "straight"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = run_tcplug("fit", "--config", full, *run_args(tiny, "killed"), "--trainer.callbacks+=tests.helpers.KillAt",
                        "--trainer.callbacks.init_args.step=7", cwd=tmp_path, env=ENV)
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    run = tmp_path / "runs" / "killed" / "version_0"
    before = weights(run / "checkpoints" / "last.ckpt")
    assert before["global_step"] == 6 and before["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}]  # mid-epoch: epoch 1, 2 of its 4 batches served
    resumed = run_tcplug("fit", "--config", full, *run_args(tiny, "killed"), "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "killed").iterdir()) == ["version_0"]  # one run folder
    a = weights(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    b = weights(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        for ka in sa["state"]:
            for name, value in sa["state"][ka].items():
                assert torch.equal(value, sb["state"][ka][name]), (ka, name)


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_resumes_exactly(tmp_path, tiny):
    """SIGTERM (a preemption notice) stops at the end of the step, writes last.ckpt, exits 143;
    the resumed run ends with the weights of an uninterrupted one."""
    recipe = RECIPES / "motion_lock.yaml"
    proc = run_tcplug("fit", "--config", recipe, *run_args(tiny, "straight", steps=8), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = run_tcplug("fit", "--config", recipe, *run_args(tiny, "stopped", steps=8),
                         "--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.init_args.step=0",
                         "--trainer.callbacks.init_args.signal=SIGTERM", cwd=tmp_path, env=ENV)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM at step 1: saved" in stopped.stderr
    ckpt = tmp_path / "runs" / "stopped" / "version_0" / "checkpoints" / "last.ckpt"
    assert weights(ckpt)["global_step"] == 1  # the step in flight finished; every_n_train_steps=2 had saved none
    resumed = run_tcplug("fit", "--config", recipe, *run_args(tiny, "stopped", steps=8), "--ckpt_path", "last",
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = weights(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    b = weights(ckpt)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # ModelCheckpoint's saves went into it


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_last_ckpt_readable(tmp_path, tiny):
    overlay = tmp_path / "kill.yaml"
    overlay.write_text("trainer:\n  plugins:\n    - class_path: tests.helpers.KillMidWrite\n"
                       "      init_args:\n        kill_at: 2\n")
    recipe = RECIPES / "baseline.yaml"
    proc = run_tcplug("fit", "--config", recipe, "--config", overlay, *run_args(tiny, "b", steps=6), cwd=tmp_path,
                      env=ENV, process=True)
    assert proc.returncode == -9
    ckdir = tmp_path / "runs" / "b" / "version_0" / "checkpoints"
    stale = list(ckdir.glob(".last.ckpt.*.tmp"))
    assert stale  # the half-written file ...
    assert weights(ckdir / "last.ckpt")["global_step"] == 2  # ... never replaced the good one
    proc = run_tcplug("fit", "--config", recipe, *run_args(tiny, "b", steps=6), "--ckpt_path", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(ckdir / "last.ckpt")["global_step"] == 6
    assert not list(ckdir.glob("*.tmp"))  # cleaned up by the next save
    straight = run_tcplug("fit", "--config", recipe, *run_args(tiny, "s", steps=6), cwd=tmp_path)
    assert straight.returncode == 0
    a = weights(tmp_path / "runs" / "s" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    b = weights(ckdir / "last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resume after the kill was exact


@pytest.mark.slow
def test_ckpt_path_last_without_a_previous_run_starts_fresh(tmp_path, tiny):
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--ckpt_path", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting fresh" in proc.stderr


# ----- sampling, export, resume, precomputed inputs ---------------------------------------------------
@pytest.fixture
def full_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "fit", "--config", FULL, *TINY)
    assert code == 0, err[-2000:]
    return next((tmp_path / "runs").rglob("last.ckpt"))


def test_sample_conditioned_without_conditions_names_the_flags(full_checkpoint, tmp_path, capsys):
    code, err = cli(capsys, "sample", "--ckpt", full_checkpoint, "--frames", "4", "--out", tmp_path / "a.mp4")
    assert code == 2 and "Traceback" not in err
    assert "physics_state needs --state state.json" in err and "caption needs --caption TEXT" in err
    assert "--clip N takes every condition" in err
    code, err = cli(capsys, "sample", "--ckpt", full_checkpoint, "--frames", "4", "--out", tmp_path / "a.mp4",
                    "--caption", "a red square")  # the caption alone: still names the state
    assert code == 2 and "physics_state needs --state" in err and "caption needs" not in err


def test_sample_out_without_or_with_a_wrong_extension(full_checkpoint, tmp_path, capsys):
    code, err = cli(capsys, "sample", "--ckpt", full_checkpoint, "--frames", "4", "--out", tmp_path / "clip.gif",
                    "--clip", "0")
    assert code == 2 and "writes .mp4 files" in err
    code, err = cli(capsys, "sample", "--ckpt", full_checkpoint, "--frames", "4", "--out", tmp_path / "clip",
                    "--clip", "0", "--steps", "2")
    assert code == 0, err[-2000:]
    assert (tmp_path / "clip.mp4").exists()


def test_checkpoint_that_is_a_text_file(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    code, err = cli(capsys, "sample", "--ckpt", bad, "--frames", "4", "--out", tmp_path / "a.mp4")
    assert code == 2 and "not a readable checkpoint (not a complete PyTorch archive" in err
    assert "weights_only" not in err and "pickled" not in err


def test_resuming_a_finished_run_keeps_its_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "fit", "--config", BASE, *TINY)
    assert code == 0, err[-2000:]
    metrics = next((tmp_path / "runs").rglob("metrics.json"))
    before = json.loads(metrics.read_text())["metrics"]
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, "--ckpt_path", "last")
    assert code == 0 and "had already reached step 2" in err and "nothing was trained" in err
    assert json.loads(metrics.read_text())["metrics"] == before != {}


def test_export_of_a_checkpoint_without_lora(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = a_checkpoint(tmp_path, capsys)
    code, err = cli(capsys, "export", ckpt, "--lora", tmp_path / "out")
    assert code == 2 and "trained no LoRA adapters (model.lora is not set)" in err
    assert not (tmp_path / "out").exists()


def test_precomputed_shards_from_another_vae(tmp_path, capsys, monkeypatch):
    """Shards whose latents have another channel count (another VAE) or frame count: one line
    saying so, before a weight moves."""
    from tcplug.data import make_clip
    from tcplug.data.shards import encode_sample, write_shards

    monkeypatch.chdir(tmp_path)
    clips = []
    for i in range(4):
        clip = make_clip(0, i, 5, 32)
        clip["latents"] = torch.zeros(2, 4, 4, 4).numpy()  # 4 channels: not Wan's 16
        clips.append(encode_sample(f"c{i}", clip))
    write_shards(tmp_path / "enc", clips, maxcount=2)
    code, err = cli(capsys, "fit", "--config", WAN_TINY, *TINY_WAN, f"--data.shards={tmp_path / 'enc'}")
    assert code == 2 and "precomputed latents of shape (2, 2, 4, 4, 4) do not fit" in err
    assert "Re-run `tcplug data encode`" in err


def test_encode_with_a_missing_recipe(tmp_path, capsys):
    code, err = cli(capsys, "data", "encode", "--config", tmp_path / "nope.yaml", "--shards", tmp_path,
                    "--out", tmp_path / "out")
    assert code == 2 and "nope.yaml does not exist" in err


def test_a_component_replaced_on_the_command_line_starts_from_its_defaults(tmp_path):
    """full.yaml's cross_frame has window: 2; replacing it by temporal on the command line resets
    window to temporal's default (and says so) instead of silently keeping 2; a value given after
    it still wins."""
    proc = run_tcplug("fit", "--config", FULL, "--model.backbone.init_args.attention=temporal", "--print_config",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "window=2 from the recipe is reset to Temporal's default None" in proc.stderr
    block = proc.stdout[proc.stdout.index("class_path: tcplug_attention.Temporal"):][:200]
    assert "window: null" in block
    proc = run_tcplug("fit", "--config", FULL, "--model.backbone.init_args.attention=temporal",
                      "--model.backbone.init_args.attention.init_args.window=3", "--print_config", cwd=tmp_path)
    block = proc.stdout[proc.stdout.index("class_path: tcplug_attention.Temporal"):][:200]
    assert "window: 3" in block


def test_score_of_a_one_frame_video_names_the_file(tmp_path, capsys):
    from tcplug.video import write_video

    path = write_video(torch.zeros(1, 16, 16, 3, dtype=torch.uint8).numpy(), tmp_path / "one.mp4", fps=8)
    code, err = cli(capsys, "score", path)
    assert code in (1, 2) and "one.mp4" in err and "at least 2 frames" in err


# ----- the catalogue in the docs ------------------------------------------------------------------
OTHER_CASES = ["plugin-hook-raises", "plugin-duplicate-name", "data-corrupt-sample", "data-missing-ground-truth",
               "data-no-shards", "data-too-few-shards", "checkpoint-pickled-payload", "checkpoint-truncated-or-missing",
               "checkpoint-without-recipe", "checkpoint-weights-do-not-fit", "nan-loss", "sigkill-mid-epoch", "sigterm", "kill-during-checkpoint-write",
               "resume-without-checkpoint", "ctrl-c", "sample-conditioned-without-conditions", "sample-out-extension",
               "checkpoint-is-a-text-file", "resume-finished-run", "export-without-lora",
               "precomputed-shards-from-another-vae", "encode-missing-recipe", "component-replaced-on-cli",
               "score-one-frame"]


def test_reliability_page_lists_every_case():
    from tests.test_safety import SAFETY_CASES

    text = (ROOT / "docs" / "reliability.md").read_text()
    cases = [c[0] for c in CONFIG_CASES] + OTHER_CASES + SAFETY_CASES
    assert len(cases) == len(set(cases)), "a case id is listed twice"
    missing = [c for c in cases if f"`{c}`" not in text]
    assert not missing, f"add to docs/reliability.md: {missing}"
    assert f"**{len(cases)} cases**" in text
