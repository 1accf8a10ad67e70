"""Recipe files: every shipped recipe resolves to what it resolved to before it became an overlay
(tests/data/resolved_recipes.json, printed by main d77ea62), `base:` chains, and recipe errors
answered in one line that names the file."""

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
ADDED_SINCE = [("model", "max_loss", 1.0e4)]


def print_config(*configs) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *[x for c in configs for x in ("--config", str(c))], "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("combo", sorted(RESOLVED))
def test_every_recipe_resolves_as_before_the_move(combo, monkeypatch):
    monkeypatch.setenv("WAN_MODEL_DIR", "/models/wan")
    monkeypatch.setenv("LTX_MODEL_DIR", "/models/ltx")
    for unset in ("WAN_SHARDS", "LTX_SHARDS"):  # as when the golden file was printed
        monkeypatch.delenv(unset, raising=False)
    monkeypatch.chdir(ROOT)
    now = print_config(*combo.split(" + "))
    for section, key, default in ADDED_SINCE:  # settings added after the move, at their defaults
        assert now[section].pop(key) == default, (section, key)
    assert now == yaml.safe_load(RESOLVED[combo])


def test_technique_recipes_are_short_overlays_of_the_baseline():
    for name in ("cross_frame", "flow_warp", "perceptual_temporal", "adversarial", "two_tier", "video_ldm",
                 "experts", "world_model", "captions", "motion_lock", "full"):
        text = (ROOT / "recipes" / f"{name}.yaml").read_text()
        assert "base: baseline.yaml" in text and "epoch_batches" not in text and "EMAWeightAveraging" not in text
        assert len(text.splitlines()) <= (90 if name == "full" else 30), name
    baseline = yaml.safe_load((ROOT / "recipes" / "baseline.yaml").read_text())
    assert baseline["base"] == "base.yaml" and "data" not in baseline


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
