"""Motion and fidelity companions of TVS: degenerate clips are caught, real clips read near 1.

Controls are built from the synthetic world (scored with DIS flow, like generated clips):
a frozen clip, a uniform gray clip, a blurred clip, frames drawn from different clips.
"""

import json

import cv2
import numpy as np
import pytest
import torch

import tcplug
from tcplug import TcplugError, get_component, list_components
from tcplug.data.synthetic import make_clip
from tcplug.metrics import MetricSuite, TemporalVarianceScore, build_metrics, pair_errors
from tests.conftest import run_tcplug


def clips(seed, n, world="simple", frames=8, size=32):
    """``(n, T, 3, S, S)`` in [0, 1]."""
    return torch.stack([torch.from_numpy(make_clip(seed, i, frames, size, world=world)["frames"]).permute(0, 3, 1, 2)
                        for i in range(n)]).float() / 255


def blur(video, k=9):
    arr = video.permute(0, 1, 3, 4, 2).numpy()
    out = np.stack([[cv2.GaussianBlur(f, (k, k), 0) for f in clip] for clip in arr])
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3)


@pytest.fixture(scope="module")
def scored():
    ref, data = clips(1, 16), clips(2, 16)

    def score(video):
        suite = MetricSuite(build_metrics())
        suite.update_reference(ref)
        suite.update(video)
        return suite.compute()

    shuffled = torch.stack([data[(i + torch.arange(8)) % 16, torch.arange(8)] for i in range(16)])
    return {
        "data": score(data),
        "frozen": score(data[:, :1].expand_as(data).contiguous()),
        "gray": score(torch.full_like(data, 0.5)),
        "blurred": score(blur(data)),
        "shuffled": score(shuffled),
    }


def test_real_clips_read_near_one(scored):
    d = scored["data"]
    assert 0.75 < d["motion_ratio"] < 1.33, d
    assert 0.8 < d["sharpness_ratio"] < 1.25, d


def test_frozen_clip_has_no_motion_although_its_tvs_is_perfect(scored):
    assert scored["frozen"]["tvs"] < 0.01  # TVS alone calls it perfect ...
    assert scored["frozen"]["motion_ratio"] < 0.05  # ... motion_ratio does not


def test_blurred_clip_is_not_sharp(scored):
    assert scored["blurred"]["sharpness_ratio"] < 0.3 * scored["data"]["sharpness_ratio"]


def test_gray_clip_is_far_from_the_data(scored):
    assert scored["gray"]["tvs"] < 0.01
    assert scored["gray"]["frame_distance"] > 5 * scored["data"]["frame_distance"]
    assert scored["gray"]["sharpness_ratio"] < 0.01 and scored["gray"]["motion_ratio"] < 0.05


def test_frames_from_different_clips_are_incoherent_and_poorly_covered(scored):
    assert scored["shuffled"]["tvs"] > 10 * scored["data"]["tvs"]
    assert scored["shuffled"]["coverage"] < 0.5 * scored["data"]["coverage"]


def test_a_pair_with_no_valid_pixel_is_left_out_and_counted_never_scored_zero():
    video = torch.rand(1, 3, 3, 16, 16)
    fwd = torch.zeros(1, 2, 2, 16, 16)
    bwd = torch.zeros(1, 2, 2, 16, 16)
    fwd[:, 0] = 40.0  # pair 0: every pixel's flow points outside the frame -> nothing valid
    l1, _, coverage = pair_errors(video, fwd, bwd)
    assert torch.isnan(l1[0, 0]) and coverage[0, 0] == 0 and not torch.isnan(l1[0, 1])
    m = TemporalVarianceScore()
    m.update(video, (fwd, bwd))
    assert int(m.empty_pairs) == 1 and int(m.pairs) == 1
    assert float(m.compute()) == pytest.approx(100 * float(l1[0, 1]), rel=1e-5)
    only_empty = TemporalVarianceScore()
    only_empty.update(video[:, :2], (fwd[:, :1], bwd[:, :1]))
    assert torch.isnan(only_empty.compute())  # nothing measured: no number, not 0


def test_trajectory_error_finds_objects_at_their_true_positions():
    clip = make_clip(3, 0, 8, 32, world="simple")
    video = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2)[None].float() / 255
    m = get_component("metric", "trajectory_error")()
    m.update(video, batch={"state": [clip["state"]]})
    on_data = float(m.compute())
    assert on_data < 2.0  # pixels; occlusion moves a centroid a little
    still = video[:, :1].expand_as(video).contiguous()  # objects stay where they started
    m2 = get_component("metric", "trajectory_error")()
    m2.update(still, batch={"state": [clip["state"]]})
    assert float(m2.compute()) > on_data + 1.0


def test_metrics_are_components():
    names = set(list_components("metric"))
    assert {"tvs", "warp_error", "flicker", "bg_flicker", "coverage", "motion_ratio", "sharpness_ratio",
            "frame_distance", "trajectory_error"} <= names


def test_score_with_reference_flags_frozen_blurred_and_gray(tmp_path):
    # one scene filmed for 24 frames: the clip scored is its first 8, the reference the rest
    scene = make_clip(2, 0, 24, 32, world="simple")["frames"]
    (tmp_path / "ref").mkdir()
    np.save(tmp_path / "ref" / "later_a.npy", scene[8:16])
    np.save(tmp_path / "ref" / "later_b.npy", scene[16:])
    real = scene[:8]
    np.save(tmp_path / "real.npy", real)
    np.save(tmp_path / "frozen.npy", np.repeat(real[:1], 8, axis=0))
    np.save(tmp_path / "blurred.npy", np.stack([cv2.GaussianBlur(f, (9, 9), 0) for f in real]))
    np.save(tmp_path / "gray.npy", np.full_like(real, 128))
    proc = run_tcplug("score", "real.npy", "frozen.npy", "blurred.npy", "gray.npy", "--reference", "ref",
                      "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    keys = {"path", "frames", "tvs", "warp_error", "flicker", "motion_ratio", "sharpness_ratio",
            "frame_distance", "dynamics_distance", "coverage"}
    assert all(set(r) == keys for r in rows.values()), rows
    real_r = rows["real.npy"]
    assert 0.5 < real_r["motion_ratio"] < 2 and 0.7 < real_r["sharpness_ratio"] < 1.4
    assert rows["frozen.npy"]["motion_ratio"] < 0.05
    assert rows["blurred.npy"]["sharpness_ratio"] < 0.4
    assert rows["gray.npy"]["frame_distance"] > 5 * real_r["frame_distance"]
    text = run_tcplug("score", "real.npy", "--reference", "ref/later_a.npy", "--metrics", "tvs,motion_ratio",
                      cwd=tmp_path)
    assert text.returncode == 0 and "motion_ratio=" in text.stdout and "sharpness" not in text.stdout


def test_score_reference_errors_are_one_line(tmp_path):
    np.save(tmp_path / "real.npy", make_clip(2, 0, 8, 32, world="simple")["frames"])
    proc = run_tcplug("score", "real.npy", "--reference", "nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and "reference nowhere: no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_tcplug("score", "real.npy", "--metrics", "motion_ratio", cwd=tmp_path)
    assert proc.returncode == 1 and "give --reference" in proc.stderr
    proc = run_tcplug("score", "real.npy", "--metrics", "tvss", cwd=tmp_path)
    assert proc.returncode == 1 and "tvs" in proc.stderr and "Traceback" not in proc.stderr


def test_score_reads_shards_as_reference(tmp_path):
    proc = run_tcplug("data", "synth", "--out", "shards", "--clips", "8", "--shard-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.save(tmp_path / "real.npy", make_clip(2, 0, 8, 32)["frames"])
    proc = run_tcplug("score", "real.npy", "--reference", "shards", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row, whole = map(json.loads, proc.stdout.splitlines())
    assert 0.3 < row["motion_ratio"] < 3
    assert whole["set"] and whole["heldout_clips"] == 4 and "pass" in whole["gate"]  # 8 shard clips: 4 held out


def test_unknown_metric_name_in_suite():
    with pytest.raises(TcplugError):
        build_metrics(["no_such_metric"])


class MeanBrightness(tcplug.VideoMetric):
    """A third party's metric: the clips' mean brightness."""

    higher_is_better = None

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, video, flows=None, batch=None):
        self.total += video.float().mean() * video.shape[0]
        self.n += video.shape[0]

    def compute(self):
        return self.total / self.n


class _MetricPlugin:
    @tcplug.hookimpl
    def tcplug_register_components(self, register):
        register(MeanBrightness, name="mean_brightness")


def test_third_party_metric_by_name_in_validation_and_score(tmp_path):
    """A registered metric is picked by name in model.metrics and in the score core, and reads
    the same on the same clip in both."""
    from tcplug.module import TCPlugModule
    from tcplug.scoring import reference_suite, score_frames

    name = tcplug.register_plugin(_MetricPlugin(), name="metric-test")
    try:
        clip = make_clip(2, 0, 4, 16, world="simple")["frames"]
        row = score_frames(clip, suite=reference_suite(["mean_brightness", "tvs"], None))
        expected = float(torch.from_numpy(clip).float().mean() / 255)
        assert row["mean_brightness"] == pytest.approx(expected, rel=1e-5) and "tvs" in row
        backbone = get_component("backbone", "dit")(in_channels=3, patch_size=2, dim=16, depth=1, heads=2)
        module = TCPlugModule(backbone, metrics=[MeanBrightness()])
        assert list(module.validation.generated.metrics) == ["mean_brightness"]
        video = torch.from_numpy(clip).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
        batch = {"video": torch.cat([video, video])}
        module.validation.update(video, {"video": video}, batch)
        assert module.validation.generated.compute()["mean_brightness"] == pytest.approx(expected, rel=1e-5)
    finally:
        tcplug.unregister_plugin(name)
