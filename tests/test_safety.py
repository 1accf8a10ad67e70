"""The catalogue, continued: nothing lost, nothing silent. Writers that never destroy data,
checkpoints that tell the truth, resumes that are exact wherever the stop lands, damaged inputs
refused, divergence stopped, plugins that cannot take the tool down, one error boundary, and runs
that say only what their user needs. Every case id is listed in docs/reliability.md (counted
there with tests/test_faults.py's)."""

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tcplug
from tcplug import hookimpl
from tests.conftest import RECIPES, ROOT, TINY, run_tcplug
from tests.test_faults import BASE, ENV, FULL, WAN_TINY, _yaml, cli, run_args, weights

FLOW = str(RECIPES / "flow_warp.yaml")


def synth(capsys, out, *extra, clips=3):
    return cli(capsys, "data", "synth", "--out", out, "--clips", clips, "--frames", 4, "--size", 16,
               "--shard-size", 2, *extra)


def cli_out(capsys, *args) -> tuple[int, str, str]:
    """The command line in-process: (exit code, stdout, stderr)."""
    from tcplug.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tars(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.tar"))}


# ----- recipes and the command line (one line, no traceback, nothing started) ---------------------
RECIPE_CASES = [
    ("recipe-base-missing", lambda t: ["fit", "--config", _yaml(t, "base: nope.yaml\n")], r"its base nope\.yaml does not exist"),
    ("recipe-base-circle", lambda t: ["fit", "--config", _yaml(t, "base: bad.yaml\n")], r"comes back to itself"),
    ("yaml-error-in-second-config", lambda t: ["fit", "--config", BASE, "--config", _yaml(t, "model:\n  lr: [1,\n")],
     r"recipe .*bad\.yaml: not valid YAML at line 3"),
    ("interpolation-to-a-missing-key", lambda t: ["fit", "--config", BASE, "--config",
                                                 _yaml(t, "data:\n  frames: ${data.nope}\n")],
     r"cannot resolve an interpolation.*nope"),
    ("recipe-env-variable-unset", lambda t: ["fit", "--config", str(RECIPES / "wan" / "t2v-lora.yaml")],
     r"WAN_MODEL_DIR"),
    ("recipe-not-a-mapping", lambda t: ["fit", "--config", _yaml(t, "- a\n- b\n")], r"a recipe is a mapping"),
    ("fit-without-a-recipe", lambda t: ["fit"], r"tcplug fit needs a recipe: tcplug fit --config recipes/full\.yaml"),
    ("recipe-without-a-model", lambda t: ["fit", "--config", _yaml(t, "trainer:\n  max_steps: 1\n")],
     r"names no model\.backbone: is it a base"),
    ("misspelt-subcommand", lambda t: ["sampel", "--ckpt", "x"], r"unknown command 'sampel'\. Did you mean 'sample'\?.*score"),
    ("misspelt-option-in-a-recipe", lambda t: ["fit", "--config", BASE, "--config", _yaml(t, "model:\n  lrr: 1\n")],
     r"lrr"),
    ("ingest-stride-zero", lambda t: ["data", "ingest", str(t / "a.mp4"), "--out", str(t / "o"), "--stride", "0"],
     r"--stride >= 1"),
    ("ingest-frames-zero", lambda t: ["data", "ingest", str(t / "a.mp4"), "--out", str(t / "o"), "--frames", "0"],
     r"--frames >= 2"),
    ("synth-shard-size-zero", lambda t: ["data", "synth", "--out", str(t / "o"), "--shard-size", "0"],
     r"--shard-size >= 1"),
    ("data-out-is-a-file", lambda t: ["data", "synth", "--out", str(_yaml(t, "x: 1\n")), "--clips", "1"],
     r"is a file, not a folder"),
    ("model-folder-moved", lambda t: ["fit", "--config", WAN_TINY, "--model.backbone.init_args.config=null",
                                      f"--model.backbone.init_args.pretrained={t / 'gone'}"],
     r"the model folder .*gone does not exist \(moved or deleted\?"),
    ("score-folder-without-videos", lambda t: ["score", str(t)], r"a folder without video files"),
    ("score-split-zero", lambda t: ["score", str(t / "a.mp4"), "--split", "0"], r"--split must be >= 1"),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_and_command_line_faults(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WAN_MODEL_DIR", raising=False)
    name, make, pattern = case
    code, err = cli(capsys, *make(tmp_path))
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


# ----- writers never destroy data ---------------------------------------------------------------
def test_writer_refuses_a_folder_with_shards_and_appends_or_overwrites_when_asked(tmp_path, capsys):
    out = tmp_path / "data"
    assert synth(capsys, out)[0] == 0
    before = tars(out)
    code, err = synth(capsys, out, clips=1)
    assert code == 2 and "already holds 2 shard(s): give --append" in err and tars(out) == before
    assert synth(capsys, out, "--append", "--seed", "1")[0] == 0
    after = tars(out)
    assert {k: after[k] for k in before} == before and sorted(after) == ["clips-000000.tar", "clips-000001.tar",
                                                                         "clips-000002.tar", "clips-000003.tar"]
    assert synth(capsys, out, "--overwrite", clips=1)[0] == 0
    assert sorted(tars(out)) == ["clips-000000.tar"]  # replaced: no old shard left beside the new one
    assert not list(out.glob(".writing-*"))


def test_ingest_of_a_bad_video_into_a_dataset_leaves_it_as_it_was(tmp_path, capsys):
    out = tmp_path / "data"
    assert synth(capsys, out)[0] == 0
    before = tars(out)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    code, err = cli(capsys, "data", "ingest", bad, "--out", out)
    assert code == 2 and "already holds 2 shard(s)" in err and tars(out) == before
    code, err = cli(capsys, "data", "ingest", bad, "--out", out, "--append")
    assert code == 1 and "bad.mp4" in err and tars(out) == before  # nothing written over or beside the data
    empty = tmp_path / "empty"
    assert cli(capsys, "data", "ingest", bad, "--out", empty)[0] == 1 and not list(empty.glob("*.tar"))


def test_export_never_writes_over_a_file_or_a_folder_with_content(tmp_path, capsys):
    afile = tmp_path / "adapters.safetensors"
    afile.write_bytes(b"keep me")
    code, err = cli(capsys, "export", tmp_path / "any.ckpt", "--lora", afile)
    assert code == 2 and "is a file: give a folder" in err and afile.read_bytes() == b"keep me"
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "old.safetensors").write_bytes(b"old")
    code, err = cli(capsys, "export", tmp_path / "any.ckpt", "--lora", folder)
    assert code == 2 and "is not empty" in err and "--overwrite" in err


def test_runs_started_at_once_get_folders_of_their_own(tmp_path):
    """Eight processes reserve a run folder in the same place at the same moment: eight folders."""
    code = ("import sys\nfrom tcplug.cli.resume import reserve_run_folder\n"
            "cfg = {'trainer': {'logger': {'init_args': {'save_dir': sys.argv[1], 'name': 'same', 'version': None}}}}\n"
            "print(reserve_run_folder(cfg).name)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")})
             for _ in range(8)]
    names = [p.communicate()[0].strip() for p in procs]
    assert sorted(names) == sorted({f"version_{i}" for i in range(8)})


def test_a_run_folder_is_not_shared_and_a_failed_run_leaves_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "fit", "--config", BASE, *TINY)[0] == 0
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, "--model.losses+=tests.helpers.NanAfter",
                    "--model.losses.init_args.step=0")
    assert code == 2 and "is nan at step 0" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "baseline").iterdir()) == ["version_0"]


# ----- checkpoints tell the truth ---------------------------------------------------------------
@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "fit", "--config", BASE, *run_args(TINY, "five", steps=5))
    assert code == 0, err[-2000:]
    ckpt = tmp_path / "runs" / "five" / "version_0" / "checkpoints" / "last.ckpt"
    assert weights(ckpt)["global_step"] == 5  # every_n_train_steps=2 alone would have left step 4
    assert f"checkpoint  {ckpt.relative_to(tmp_path)} (step 5)" in err


@pytest.mark.slow
def test_resume_applies_changed_settings_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "fit", "--config", BASE, *run_args(TINY, "r", steps=4))[0] == 0
    code, err = cli(capsys, "fit", "--config", BASE, *run_args(TINY, "r", steps=6), "--model.lr=1e-5",
                    "--model.sample_steps=3", "--ckpt_path", "last")
    assert code == 0, err[-2000:]
    assert re.search(r"resuming .* with model\.lr=1e-05 \(the checkpoint's: 0\.0005\), model\.sample_steps=3", err)
    ckpt = weights(tmp_path / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["lr"] == 1e-5 and ckpt["hyper_parameters"]["sample_steps"] == 3
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 1e-5 and group["lr"] < 1e-5 * 1.0001  # the optimizer trained at the new rate


@pytest.mark.slow
@pytest.mark.parametrize("change", ["--model.backbone.init_args.dim=64", f"--config={RECIPES / 'cross_frame.yaml'}"],
                         ids=["resume-with-another-width", "resume-under-another-recipe"])
def test_resume_refuses_another_model_before_anything_is_written(change, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "fit", "--config", BASE, *run_args(TINY, "r", steps=2))[0] == 0
    run = tmp_path / "runs" / "r" / "version_0"
    config = (run / "config.yaml").read_text()
    args = ["fit", "--config", BASE, change, *run_args(TINY, "r", steps=4), "--ckpt_path", "last"]
    code, err = cli(capsys, *args)
    assert code == 2 and "cannot resume" in err and "trained with another model" in err, err[-2000:]
    assert "Traceback" not in err and (run / "config.yaml").read_text() == config  # nothing overwritten
    assert weights(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_validate_with_weights_that_do_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = Path(tmp_path / "other.ckpt")
    assert cli(capsys, "fit", "--config", BASE, *TINY)[0] == 0
    good = next((tmp_path / "runs").rglob("last.ckpt"))
    state = weights(good)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "blocks.0" not in k}
    state["state_dict"]["diffusion.extra.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    code, err = cli(capsys, "validate", "--config", BASE, *TINY, "--ckpt_path", ckpt)
    assert code == 2 and "the checkpoint's weights do not fit this model" in err and "missing" in err, err[-1500:]
    assert "Traceback" not in err


def test_a_damaged_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "fit", "--config", BASE, *TINY)[0] == 0
    good = next((tmp_path / "runs").rglob("last.ckpt"))
    with zipfile.ZipFile(good) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(good.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + info.file_size // 2] ^= 0xFF  # one flipped byte inside a weight tensor: torch.load would not notice
    bad = tmp_path / "damaged.ckpt"
    bad.write_bytes(bytes(data))
    code, err = cli(capsys, "sample", "--ckpt", bad, "--frames", 4, "--out", tmp_path / "x.mp4")
    assert code == 2 and "damaged" in err and "checksum" in err and not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_good_checkpoint_and_no_temporary_file(tmp_path):
    overlay = tmp_path / "disk.yaml"
    overlay.write_text("trainer:\n  plugins:\n    - class_path: tests.helpers.FullDisk\n      init_args:\n"
                       "        fail_at: 2\n")
    proc = run_tcplug("fit", "--config", BASE, "--config", overlay, *run_args(TINY, "d", steps=6), cwd=tmp_path, env=ENV, process=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write the checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    ckdir = tmp_path / "runs" / "d" / "version_0" / "checkpoints"
    assert weights(ckdir / "last.ckpt")["global_step"] == 2 and not list(ckdir.glob(".*.tmp"))


def _exact(tmp_path, name, *kill, every=2, saved=None):
    """Run baseline for 6 steps (epochs of 4, validation every 2, a checkpoint every ``every``),
    stopped as ``kill`` says (its last.ckpt then holds step ``saved``) and resumed; compare with an
    uninterrupted run: every weight equal."""
    args = [*run_args(TINY, name, steps=6), "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
            f"--checkpoint.every_n_train_steps={every}"]
    straight = tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt"
    if not straight.is_file():
        straight_args = [a.replace(f"name={name}", "name=straight") for a in args]
        assert run_tcplug("fit", "--config", BASE, *straight_args, cwd=tmp_path).returncode == 0
    stopped = run_tcplug("fit", "--config", BASE, *args, "--trainer.callbacks+=tests.helpers.KillAt", *kill,
                         cwd=tmp_path, env=ENV)
    assert stopped.returncode != 0
    last = tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
    assert saved is None or weights(last)["global_step"] == saved, stopped.stderr[-2000:]
    resumed = run_tcplug("fit", "--config", BASE, *args, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(straight), weights(last)
    assert a["global_step"] == b["global_step"] == 6
    for part in ("state_dict", "current_model_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    return stopped


@pytest.mark.slow
def test_resume_is_exact_wherever_the_stop_lands(tmp_path):
    """SIGTERM on an epoch's last step, which is no checkpoint step: saved at the end of that step,
    before the validation and the epoch's end that follow (Lightning stops only after them; a
    scheduler's grace period may end first: here a SIGKILL when that validation begins); and
    SIGTERM during validation. Each resumed run ends with the weights of the uninterrupted one (a
    kill mid-epoch and during a checkpoint save: tests/test_faults.py)."""
    _exact(tmp_path, "epoch_end", "--trainer.callbacks.init_args.step=3", "--trainer.callbacks.init_args.signal=SIGTERM",
           "--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.init_args.step=4",
           "--trainer.callbacks.init_args.during=validation", every=5, saved=4)  # the last step of the first epoch
    stopped = _exact(tmp_path, "in_validation", "--trainer.callbacks.init_args.step=2",
                     "--trainer.callbacks.init_args.signal=SIGTERM", "--trainer.callbacks.init_args.during=validation",
                     saved=2)
    assert "SIGTERM at step 2" in stopped.stderr  # during the validation at step 2: saved before step 3


# ----- damaged or unreadable data ---------------------------------------------------------------
@pytest.mark.slow
def test_shards_of_garbage_stop_the_run_instead_of_hanging(tmp_path, capsys):
    """Read by a data-loader worker process: the run stops with the worker's message as one line."""
    good, data = tmp_path / "good", tmp_path / "garbage"
    assert synth(capsys, good, clips=2)[0] == 0
    data.mkdir()
    for i in range(3):
        (data / f"g-{i:06d}.tar").write_bytes(os.urandom(3000))
    proc = run_tcplug("fit", "--config", BASE, *TINY, f"--data.shards={data}", f"--data.val_shards={good}",
                      "--data.num_workers=1", cwd=tmp_path, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "tcplug: error: none of the 3 training shard(s) holds a readable sample" in proc.stderr


def test_all_training_shards_unreadable_stops_naming_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert synth(capsys, good, clips=2)[0] == 0
    bad.mkdir()
    for i in range(2):
        (bad / f"g-{i:06d}.tar").write_bytes(os.urandom(2000))
    code, err = cli(capsys, "fit", "--config", BASE, *TINY, f"--data.shards={bad}", f"--data.val_shards={good}")
    assert code == 2 and "none of the 2 training shard(s) holds a readable sample" in err and "Traceback" not in err


def test_an_empty_first_shard_does_not_hide_the_others_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    assert synth(capsys, data, clips=4)[0] == 0
    with tarfile.open(data / "clips-000000.tar", "w"):
        pass  # the first shard is now empty
    from tcplug.data import VideoDataModule

    dm = VideoDataModule(shards=str(data), frames=4, size=16, batch_size=2, epoch_batches=1, val_clips=2)
    dm.setup("fit")
    assert "flow" in dm.keys
    assert cli(capsys, "fit", "--config", FLOW, *TINY, f"--data.shards={data}")[0] == 0


def test_a_damaged_sample_is_refused_not_used(tmp_path, capsys):
    from tcplug.data.shards import SampleDecoder, TarSamples

    data = tmp_path / "data"
    assert synth(capsys, data, clips=2)[0] == 0
    shard = data / "clips-000000.tar"
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("frames.npy"))
    raw[member.offset_data + member.size - 10] ^= 0xFF  # a pixel's byte: np.load would read it without a word
    shard.write_bytes(bytes(raw))
    decoder = SampleDecoder([], 4, 16)
    with pytest.warns(UserWarning, match="damaged"):
        clips = list(decoder(TarSamples(decoder)([{"url": str(shard)}])))
    assert len(clips) == 1 and decoder.skipped == 1


# ----- numbers ----------------------------------------------------------------------------------
def test_a_diverged_run_stops_with_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "fit", "--config", BASE, *run_args(TINY, "div", steps=10), "--model.lr=1e6",
                    "--model.warmup_steps=0")
    assert code == 2 and re.search(r"diverged: .* > model\.max_loss=10000", err), err[-2000:]
    ckpt = next((tmp_path / "runs" / "div").rglob("last.ckpt"), None)
    if ckpt is not None:
        assert all(torch.isfinite(v).all() for v in weights(ckpt)["state_dict"].values() if v.is_floating_point())


# ----- plugins cannot take the tool down or silence it --------------------------------------------
PLUGIN_MODULES = {
    "plugin-exits-at-import": "import sys\nsys.exit(3)\n",
    "plugin-parses-argv-at-import": ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--mine', "
                                     "required=True)\np.parse_args()\n"),
    "plugin-parses-an-empty-argv": ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--mine', "
                                    "default=1)\np.parse_args()\n"),  # would exit on tcplug's own arguments
}


@pytest.mark.parametrize("case", sorted(PLUGIN_MODULES))
def test_a_plugin_that_exits_or_parses_argv_at_import(case, tmp_path):
    site = tmp_path / "site"
    (site / "rude_plugin").mkdir(parents=True)
    (site / "rude_plugin" / "__init__.py").write_text(PLUGIN_MODULES[case])
    dist = site / "rude_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rude-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tcplug]\nrude = rude_plugin\n")
    proc = run_tcplug("plugins", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0 and "dit" in proc.stdout, proc.stderr[-2000:]
    status = "ok" if case == "plugin-parses-an-empty-argv" else "failed"  # it sees no command line of tcplug's
    assert re.search(rf"rude .* {status}", proc.stdout) and "usage:" not in proc.stderr, proc.stdout


class _ExitingHook:
    @hookimpl
    def tcplug_register_components(self, register):
        raise SystemExit(4)


class _Commands:
    @hookimpl
    def tcplug_register_commands(self, register):
        register("oops", _raises_value_error, help="a command with a bug")
        register("refuse", _raises_tcplug_error, help="a command that refuses its input")


def _raises_value_error(argv):
    raise ValueError("a bug in a plugin's command")


def _raises_tcplug_error(argv):
    raise tcplug.TcplugError("this input is wrong")


def test_a_plugin_hook_that_exits_is_isolated():
    name = tcplug.register_plugin(_ExitingHook(), name="exiting-hook")
    try:
        with pytest.warns(UserWarning, match="exiting-hook"):
            assert "dit" in tcplug.list_components("backbone")
        assert {i.name: i for i in tcplug.plugin_infos()}["exiting-hook"].status == "failed"
    finally:
        tcplug.unregister_plugin(name)


def test_one_error_boundary_for_every_command(capsys, monkeypatch):
    """A plugin command's TcplugError is one line (status 2); an unexpected exception is one line
    too (status 1) saying TCPLUG_DEBUG=1 shows where it happened, which it does."""
    name = tcplug.register_plugin(_Commands(), name="commands-boundary")
    try:
        code, err = cli(capsys, "refuse")
        assert code == 2 and err.strip() == "tcplug: error: this input is wrong"
        code, err = cli(capsys, "oops")
        assert code == 1 and err.strip().startswith("tcplug: error: ValueError: a bug in a plugin's command")
        assert "TCPLUG_DEBUG=1" in err and len(err.strip().splitlines()) == 1
        monkeypatch.setenv("TCPLUG_DEBUG", "1")
        with pytest.raises(ValueError, match="a bug"):
            cli(capsys, "oops")
    finally:
        tcplug.unregister_plugin(name)


# ----- model folders ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tcplug_wan.tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("wan") / "tiny")


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_a_model_folder_whose_config_does_not_match_its_weights(wan_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _copy(wan_folder, tmp_path / "bad")
    config = json.loads((bad / "transformer" / "config.json").read_text())
    config["num_layers"] += 1
    (bad / "transformer" / "config.json").write_text(json.dumps(config))
    code, err = cli(capsys, "fit", "--config", WAN_TINY, "--model.backbone.init_args.config=null",
                    f"--model.backbone.init_args.pretrained={bad}")
    assert code == 2 and "do not match its config.json" in err and "meta tensor" not in err, err[-2000:]


def test_a_model_folder_with_pickled_weights(wan_folder, tmp_path):
    """A .bin whose pickle carries more than tensors is refused naming the risk (never torch's
    advice to load with weights_only=False); a plain-tensor .bin loads without diffusers'
    "defaulting to unsafe serialization" (the load never unpickles code)."""
    import logging

    from safetensors.torch import load_file
    from tcplug_wan import WanBackbone

    from tests.test_faults import Evil

    plain = _copy(wan_folder, tmp_path / "plain")
    tensors = load_file(plain / "transformer" / "diffusion_pytorch_model.safetensors")
    (plain / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tensors, plain / "transformer" / "diffusion_pytorch_model.bin")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        WanBackbone(pretrained=str(plain))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "unsafe serialization" in r.getMessage() or "error occurred" in r.getMessage()]
    evil = _copy(plain, tmp_path / "evil")
    torch.save({**tensors, "payload": Evil()}, evil / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(tcplug.TcplugError, match="pickled objects beyond tensors, which could run code") as exc:
        WanBackbone(pretrained=str(evil))
    assert "weights_only=False" not in str(exc.value)


# ----- what a run says, and where it writes ------------------------------------------------------
def test_a_run_says_only_what_its_user_needs(tmp_path):
    proc = run_tcplug("fit", "--config", FULL, *TINY, "--checkpoint.every_n_train_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("💡 Tip", "GPU available", "TPU available", "logging interval", "Seed set to", "`Trainer.fit` stopped",
                  "in eval mode", "Using ModelCheckpoint with manual optimization"):
        assert noise not in proc.stderr, noise
    assert re.search(r"metrics .*\(last validation: 1 sampled clip\(s\) vs 1 reference clip\(s\)\)", proc.stderr)
    assert re.search(r"checkpoint  .*last\.ckpt \(step 2\)", proc.stderr)


def test_inspect_shows_frames_as_stored(tmp_path, capsys):
    assert synth(capsys, tmp_path / "d", clips=2)[0] == 0
    code, out, _ = cli_out(capsys, "data", "inspect", tmp_path / "d")
    assert code == 0 and "frames.npy" in out and "(4, 16, 16, 3) uint8 -> batch['video'] [4, 3, 16, 16]" in out


def test_following_the_tutorials_leaves_nothing_untracked_and_unignored():
    for path in ("tiny-wan/", "tiny-ltx/", "my-lora/", "long.mp4", "shards/mine/", "runs/full/"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} is written by a tutorial and not ignored by git"


# ----- scoring ----------------------------------------------------------------------------------
def _video(path, frames):
    from tcplug.video import write_video

    return write_video(frames, path, fps=8)


def test_score_a_folder_and_clips_side_by_side(tmp_path, capsys):
    from tcplug.data import make_clip

    videos = tmp_path / "videos"
    videos.mkdir()
    a, b = make_clip(0, 0, 6, 32)["frames"], make_clip(0, 1, 6, 32)["frames"]
    _video(videos / "a.mp4", a)
    _video(videos / "b.mp4", b)
    wide = _video(tmp_path / "wide.mp4", np.concatenate([a, b], axis=2))  # two clips side by side
    code, out, _ = cli_out(capsys, "score", videos, "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [Path(x["path"]).name for x in lines] == ["a.mp4", "b.mp4"]
    code, err = cli(capsys, "score", wide, "--reference", videos / "a.mp4")
    assert code == 1 and "frames are 32x64, the reference's 32x32" in err and "--split 2" in err
    code, out, _ = cli_out(capsys, "score", wide, "--split", "2", "--reference", videos / "a.mp4", "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [x["path"].rsplit("[", 1)[1] for x in lines] == ["0]", "1]"]


SAFETY_CASES = [c[0] for c in RECIPE_CASES] + sorted(PLUGIN_MODULES) + [
    "writer-refuses-non-empty-folder", "writer-append", "writer-overwrite", "ingest-bad-video-into-dataset",
    "ingest-nothing-readable-writes-nothing", "export-over-a-file", "export-over-a-folder-with-content",
    "concurrent-runs", "failed-run-leaves-no-folder", "last-checkpoint-is-final-step", "resume-applies-changed-settings",
    "resume-with-another-width", "resume-under-another-recipe", "weights-do-not-fit", "damaged-checkpoint",
    "full-disk", "resume-exact-sigterm-at-epoch-end", "resume-exact-sigterm-in-validation", "garbage-shards-no-hang",
    "all-training-shards-unreadable", "empty-first-shard", "damaged-sample", "diverged-run", "plugin-hook-exits",
    "plugin-command-refuses", "plugin-command-crashes", "debug-shows-traceback", "model-config-mismatch",
    "model-folder-pickled-weights", "model-folder-bin-weights", "run-output-noise", "run-summary-counts-and-step",
    "inspect-frames-as-stored", "tutorial-files-ignored", "score-folder", "score-side-by-side",
    "score-split",
]
