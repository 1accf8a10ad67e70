"""The fidelity gate fails every control with its reason and passes held-out data.

Controls are built from data clips of the synthetic world by :mod:`tcplug.metrics.controls` and
judged by :func:`tcplug.metrics.gate.evaluate` against held-out clips (the data floor) and a
reference set of another seed, with training clips for memorisation.
"""

import json

import numpy as np
import pytest
import torch

from tcplug.data.synthetic import make_clip
from tcplug.metrics import controls
from tcplug.metrics.gate import BANDS, ClipSet, clip_dynamics, evaluate, judge
from tests.conftest import run_tcplug

N = 32


def clips(seed, n):
    cs = [make_clip(seed, i, 8, 32, world="simple") for i in range(n)]
    video = torch.from_numpy(np.stack([c["frames"] for c in cs])).permute(0, 1, 4, 2, 3).float() / 255
    return video, [c["state"] for c in cs]


@pytest.fixture(scope="module")
def world():
    held, held_states = clips(1_000_003, N)
    ref, _ = clips(777, 64)
    train, train_states = clips(0, 128)
    data, states = clips(5, N)  # held-out data the generator never saw: must pass
    floor = ClipSet(held, held_states)
    reference = ClipSet(ref)

    def judged(video, st=states):
        return evaluate(ClipSet(video, st), floor, reference, train=train)

    return {"judged": judged, "data": data, "train": train[:N], "train_states": train_states[:N],
            "speed": float(floor.speed.mean())}


def reasons(report):
    return {r.split(" (")[0] for r in report["gate"]["reasons"]}


def test_held_out_data_passes(world):
    report = world["judged"](world["data"])
    assert report["gate"] == {"pass": True, "reasons": []}, report
    assert report["floor"]["dynamics_distance"] > 0 and report["intervals"]["dynamics_distance"][0] > 0


def test_frozen_fails_on_motion(world):
    assert "motion" in reasons(world["judged"](controls.frozen(world["data"])))


def test_a_clip_that_freezes_late_fails_on_motion_and_dynamics(world):
    found = reasons(world["judged"](controls.freezes_late(world["data"])))
    assert "dynamics" in found and "motion" in found, found


def test_gray_fails_on_appearance_and_sharpness(world):
    assert {"appearance", "sharpness"} <= reasons(world["judged"](controls.gray(world["data"])))


def test_blurred_fails_on_sharpness(world):
    assert "sharpness" in reasons(world["judged"](controls.blurred(world["data"])))


def test_shuffled_frames_fail_on_dynamics(world):
    assert "dynamics" in reasons(world["judged"](controls.shuffled(world["data"])))


def test_independent_frames_fail_on_dynamics(world):
    assert "dynamics" in reasons(world["judged"](controls.independent(world["data"])))


def test_a_still_frame_under_a_pan_as_fast_as_the_data_fails_on_dynamics_alone(world):
    # the pan's mean flow matches the data's: motion ratio passes, only the dynamics see it
    report = world["judged"](controls.still_pan(world["data"], speed=world["speed"]))
    assert "motion" not in reasons(report) and "dynamics" in reasons(report), report["gate"]
    slow = world["judged"](controls.still_pan(world["data"], speed=0.3))  # the slow, sub-pixel pan
    assert "dynamics" in reasons(slow)


def test_a_jittering_still_frame_fails_on_dynamics(world):
    assert "dynamics" in reasons(world["judged"](controls.jitter(world["data"])))


def test_replayed_training_clips_fail_on_memorisation_alone(world):
    report = world["judged"](world["train"], world["train_states"])
    assert reasons(report) == {"memorisation"}, report["gate"]
    assert report["figures"]["memorised"] == 1.0 and report["floor"]["memorised"] < 0.25


def test_a_pan_and_moving_objects_have_opposite_dynamics(world):
    data = world["data"][:4]
    pan = controls.still_pan(data, speed=1.0)
    from tcplug.metrics import estimate_flows

    d = clip_dynamics(data, estimate_flows(data)[0])
    p = clip_dynamics(pan, estimate_flows(pan)[0])
    share, conc = 7, 8  # global_share, concentration
    assert (p[:, share] > 0.5).all() and (d[:, share] < 0.5).all()
    assert p[:, conc].mean() < d[:, conc].mean()


def test_judge_uses_the_floor_not_one():
    floor = {"motion_ratio": 0.5, "sharpness_ratio": 1.0, "frame_distance": 0.1, "dynamics_distance": 1.0}
    assert judge({**floor, "motion_ratio": 0.55}, floor)["pass"]  # 1.1x the data's own ratio
    out = judge({**floor, "motion_ratio": 1.0}, floor)  # 1.0 would pass a band around 1, not around the floor
    assert not out["pass"] and out["reasons"][0].startswith("motion")
    assert not judge({**floor, "dynamics_distance": 2.5}, floor)["pass"]
    assert set(BANDS) == {"motion_ratio", "sharpness_ratio", "frame_distance", "dynamics_distance"}
    assert not judge({**floor, "trajectory_error": 5.0}, {**floor, "trajectory_error": 1.0})["pass"]
    assert judge({**floor, "trajectory_error": 2.5}, {**floor, "trajectory_error": 1.0})["pass"]


def test_score_prints_the_set_line_with_the_gate(tmp_path):
    for folder, seed, n in (("ref", 777, 16), ("train", 0, 12)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            np.save(tmp_path / folder / f"{i}.npy", make_clip(seed, i, 8, 32, world="simple")["frames"])
    proc = run_tcplug("score", "train", "--reference", "ref", "--train", "train", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 13 and all("tvs" in x for x in lines[:12])
    last = lines[-1]
    assert last["set"] and last["clips"] == 12 and last["heldout_clips"] == 8
    assert not last["gate"]["pass"] and "memorisation" in reasons(last), last["gate"]
    proc = run_tcplug("score", "train/0.npy", "--train", "train", cwd=tmp_path)
    assert proc.returncode == 2 and "--train needs --reference" in proc.stderr
