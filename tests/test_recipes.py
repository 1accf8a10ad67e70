"""Recipe files: `full`, its presets and the model-family recipes resolve to what they resolved to
before they became overlays (tests/data/resolved_recipes.json, printed by main d77ea62); the
baseline and every technique recipe are base + that technique configured as in `full` (matched
recipes); `base:` chains; recipe errors answered in one line that names the file."""

import contextlib
import io
import json

import pytest
import yaml

from tcplug.cli import main
from tcplug.errors import TcplugError
from tcplug.recipe import load, merge_config_args
from tests.conftest import ROOT, run_tcplug

RESOLVED = json.loads((ROOT / "tests" / "data" / "resolved_recipes.json").read_text())
#: (section, key, default) of every setting added since the golden file was printed
ADDED_SINCE = [("model", "max_loss", 1.0e4), ("model", "frame_timesteps", "clip"), ("model", "context_noise", 0.0),
               ("model", "stream_mode", "same_step"), ("model", "rollout_prob", 0.0), ("model", "rollout_frames", 0),
               ("model", "rollout_steps", 4), ("data", "shots", 1), ("data", "frame_stride", 1)]
#: (class path, init argument, default) of every component argument added since then
ARGS_ADDED_SINCE = [("tcplug_attention.CrossFrame", "sink", 0), ("tcplug_wan.WanBackbone", "storage_dtype", None),
                    ("tcplug_ltx.LTXBackbone", "storage_dtype", None), ("tcplug_wan.WanBackbone", "offload", None),
                    ("tcplug_wan.WanBackbone", "offload_dir", None), ("tcplug_ltx.LTXBackbone", "offload", None),
                    ("tcplug_ltx.LTXBackbone", "offload_dir", None), ("tcplug_conditioners.Caption", "per_shot", False),
                    ("tcplug_attention.CrossFrame", "sink_positions", "absolute"), ("tcplug_wan.WanText", "per_shot", False),
                    ("tcplug_ltx.LTXText", "per_shot", False), ("tcplug_conditioners.PhysicsState", "correction", "additive"),
                    ("tcplug_attention.CrossFrame", "history", 0), ("tcplug_attention.CrossFrame", "pool", 2)]


def drop_added_args(node):
    """Component arguments added since the golden file, at their defaults, taken out of ``node``."""
    if isinstance(node, dict):
        for path, key, default in ARGS_ADDED_SINCE:
            if node.get("class_path") == path and isinstance(node.get("init_args"), dict):
                assert node["init_args"].pop(key) == default, (path, key)
        for value in node.values():
            drop_added_args(value)
    elif isinstance(node, list):
        for value in node:
            drop_added_args(value)


def print_config(*configs) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *[x for c in configs for x in ("--config", str(c))], "--print_config"])
    return yaml.safe_load(out.getvalue())


#: recipes made base + one technique (matched) after the golden file was printed: checked below instead
MATCHED = ("baseline", "cross_frame", "flow_warp", "perceptual_temporal", "adversarial", "experts", "world_model",
           "captions", "motion_lock", "two_tier", "video_ldm", "world_model_pixels")


@pytest.mark.parametrize("combo", sorted(c for c in RESOLVED if c.split(" + ")[0] not in
                                         {f"recipes/{m}.yaml" for m in MATCHED}))
def test_every_recipe_resolves_as_before_the_move(combo, monkeypatch):
    monkeypatch.setenv("WAN_MODEL_DIR", "/models/wan")
    monkeypatch.setenv("LTX_MODEL_DIR", "/models/ltx")
    for unset in ("WAN_SHARDS", "LTX_SHARDS"):  # as when the golden file was printed
        monkeypatch.delenv(unset, raising=False)
    monkeypatch.chdir(ROOT)
    now = print_config(*combo.split(" + "))
    for section, key, default in ADDED_SINCE:  # settings added after the move, at their defaults
        assert now[section].pop(key) == default, (section, key)
    drop_added_args(now)
    assert now == yaml.safe_load(RESOLVED[combo])


def test_technique_recipes_are_short_overlays_of_the_base():
    for name in MATCHED + ("full",):
        text = (ROOT / "recipes" / f"{name}.yaml").read_text()
        assert "base: base.yaml" in text and "epoch_batches" not in text and "EMAWeightAveraging" not in text
        assert "max_steps" not in text and "sampler:" not in text and "conv_channels" not in text, name
        assert len(text.splitlines()) <= (90 if name == "full" else 30), name


@pytest.fixture(scope="module")
def resolved():
    from benchmarks import _recipes

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return {name: _recipes.flatten(print_config(ROOT / "recipes" / f"{name}.yaml"))
                for name in MATCHED + ("full",)}


def test_each_recipe_differs_from_base_only_in_its_technique_configured_as_in_full(resolved):
    from benchmarks._recipes import IN_FULL, TECHNIQUES, compose, differs, flatten, owned, unflatten

    base, full = resolved["baseline"], resolved["full"]
    # disc_lr and lock_prob: full names their defaults
    assert differs(base, full) == owned(IN_FULL) - {"model.disc_lr", "model.lock_prob"}
    for name in MATCHED[1:]:
        assert differs(base, resolved[name]) <= set(TECHNIQUES[name]), name
        if name in IN_FULL:  # the technique's own settings are full's (couplings aside, see compose)
            want = flatten(compose(unflatten(base), unflatten(full), [name]))
            assert differs(resolved[name], want) == set(), name


def test_leave_one_out_handles_the_couplings(resolved, tmp_path):
    from benchmarks._recipes import IN_FULL, compose, flatten, unflatten, write

    base, full = unflatten(resolved["baseline"]), unflatten(resolved["full"])
    no_world = [t for t in IN_FULL if t != "world_model"]
    cfg = compose(base, full, no_world)  # the lock read the world model's rollout: now the first pass
    assert cfg["model"]["motion_lock"]["init_args"]["source"] == "first_pass"
    assert [c["class_path"].rsplit(".", 1)[-1] for c in cfg["model"]["conditioner"]] == ["Caption"]
    no_adv = flatten(compose(base, full, [t for t in IN_FULL if t != "adversarial"]))
    assert "model.losses[adversarial]" not in no_adv and no_adv["model.discriminator"]  # perceptual reads it
    no_both = flatten(compose(base, full, [t for t in IN_FULL if t not in ("adversarial", "perceptual_temporal")]))
    assert no_both["model.discriminator"] is None
    path = write(cfg, tmp_path / "full-minus-world_model.yaml", "full-minus-world_model")
    again = flatten(print_config(path))
    assert again["model.motion_lock"]["init_args"]["source"] == "first_pass"


def test_base_chains_merge_in_order_and_replace_a_changed_component(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  lr: 1.0\n  latent:\n    class_path: pixel\n    init_args:\n"
                                     "      channels: 3\n      scale: 2.0\ndata:\n  frames: 8\n  size: ${data.frames}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel:\n  latent:\n    init_args:\n      scale: 5.0\n"
                                             "data:\n  frames: 4\n")
    (tmp_path / "c.yaml").write_text("base: [sub/b.yaml]\nmodel:\n  latent:\n    class_path: vae\n")
    b = load([tmp_path / "sub" / "b.yaml"])
    assert b["model"]["latent"] == {"class_path": "pixel", "init_args": {"channels": 3, "scale": 5.0}}
    assert b["data"] == {"frames": 4, "size": 4}  # interpolation resolved over the merged recipe
    c = load([tmp_path / "c.yaml"])
    assert c["model"]["latent"] == {"class_path": "vae"} and c["model"]["lr"] == 1.0  # replaced, not merged
    args = merge_config_args(["--config", str(tmp_path / "c.yaml"), "--model.lr=2", f"--config={tmp_path / 'a.yaml'}"])
    assert len(args) == 2 and args[0].startswith("--config=") and args[1] == "--model.lr=2"


@pytest.mark.parametrize("text, message", [
    ("base: nope.yaml\n", "does not exist"),
    ("base: loop.yaml\n", "comes back to itself"),
    ("model:\n  lr: [1,\n", "not valid YAML at line 3"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("data:\n  frames: ${data.nope}\n", "cannot resolve an interpolation"),
    ("model:\n  scheduler: ${oc.env:TCPLUG_TEST_UNSET_VARIABLE}\n", "TCPLUG_TEST_UNSET_VARIABLE"),
])
def test_recipe_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(TcplugError, match=message) as err:
        load([path])
    assert "loop.yaml" in str(err.value)


def test_a_recipe_error_is_one_line_on_the_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../missing.yaml\n")
    proc = run_tcplug("fit", "--config", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing.yaml does not exist" in proc.stderr


def test_shot_recipes_are_base_on_the_multi_shot_world_and_differ_in_their_technique():
    """recipes/shots: base.yaml on 32-frame clips of 4 shots; shot_attention changes plain's
    attention only, world_model adds the world model to shot_attention only."""
    from benchmarks._recipes import flatten

    got = {n: flatten(print_config(ROOT / "recipes" / "shots" / f"{n}.yaml"))
           for n in ("plain", "shot_attention", "world_model")}
    assert got["plain"]["data.shots"] == 4 and got["plain"]["data.frames"] == 32
    assert got["shot_attention"]["model.backbone.init_args.attention"]["class_path"].endswith("ShotAttention")

    def differs(a, b):
        keys = set(got[a]) | set(got[b])
        return {k for k in keys if got[a].get(k) != got[b].get(k)} - {"trainer.logger.init_args.name"}

    assert differs("plain", "shot_attention") == {"model.backbone.init_args.attention"}
    assert {k.split("[")[0] for k in differs("shot_attention", "world_model")} == {"model.conditioner"}
