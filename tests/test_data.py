"""The synthetic world, shards, ingest, inspect, bad data, and DDP splitting."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tcplug
from tcplug.data import VideoDataModule, make_clip
from tcplug.data.shards import (
    DataSkipWarning,
    SampleDecoder,
    TarSamples,
    encode_sample,
    inspect_shards,
    write_shards,
)
from tcplug.metrics import warp
from tests.conftest import RECIPES, ROOT, run_tcplug

VIDEOS = sorted((ROOT.parent / "shared" / "data" / "video").glob("*.mp4"))


def warp_error(clip):
    fr = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).float() / 255
    fl = torch.from_numpy(clip["flow"]).permute(0, 3, 1, 2)
    warped, _ = warp(fr[1:], fl)
    valid = 1 - torch.from_numpy(clip["occ"]).float()[:, None]
    return float(((warped - fr[:-1]).abs() * valid).sum() / (valid.sum() * 3)), float(valid.mean())


@pytest.mark.parametrize("world", ["textured", "simple"])
@pytest.mark.parametrize("seed,gravity,size", [(0, 0, 32), (1, 1, 48), (2, 0, 64), (3, 1, 24)])
def test_flow_is_exact(seed, gravity, size, world):
    for index in range(4):
        clip = make_clip(seed, index, frames=12, size=size, num_shapes=3, gravity=gravity, max_speed=3, world=world)
        err, valid = warp_error(clip)
        assert err < 1 / 255 and valid > 0.5, (index, err, valid)


def test_flow_exact_through_bounces():
    # a fast object in a small frame must bounce; flow stays exact
    clip = make_clip(5, 0, frames=20, size=24, num_shapes=1, max_speed=4)
    vel = np.array(clip["state"]["velocity"])[:, 0]
    assert (np.diff(np.sign(vel), axis=0) != 0).any()  # at least one bounce
    assert warp_error(clip)[0] < 1 / 255


@pytest.mark.parametrize("gravity", [0, 1])
def test_flow_stays_exact_at_a_frame_stride(gravity):
    """Keyframe clips (`stride=3`): the flow of a pair spans three steps, bounces included."""
    for index in range(3):
        clip = make_clip(4, index, frames=6, size=32, num_shapes=3, gravity=gravity, max_speed=3, stride=3)
        err, valid = warp_error(clip)
        assert err < 1 / 255 and valid > 0.3, (index, err, valid)


def test_ground_truth_contents_and_reproducibility():
    a, b = make_clip(7, 3, 8, 32, 2), make_clip(7, 3, 8, 32, 2)
    assert all(np.array_equal(a[k], b[k]) for k in ("frames", "flow", "occ", "depth", "skeleton", "static"))
    assert not np.array_equal(a["frames"], make_clip(7, 4, 8, 32, 2)["frames"])
    assert a["frames"].shape == (8, 32, 32, 3) and a["frames"].dtype == np.uint8
    assert a["flow"].shape == a["flow_bwd"].shape == (7, 32, 32, 2)
    assert a["depth"].shape == (8, 32, 32) and a["skeleton"].shape == (8, 2, 32, 32)
    st = a["state"]
    assert len(st["position"]) == 8 and len(st["objects"]) == 2
    assert {"class", "colour", "size", "depth"} <= set(st["objects"][0])
    assert a["txt"].endswith("over a textured background")
    # static pixels never change; background depth is 1
    s = a["static"].astype(bool)
    assert (a["frames"][:, s] == a["frames"][0, s]).all() and (a["depth"][:, s] == 1).all()
    # keypoint heatmaps peak at object centres
    cx, cy = st["position"][0][0]
    assert a["skeleton"][0, 0, cy, cx] == pytest.approx(1.0)


def test_simple_world_is_smooth_and_its_shapes_flat():
    simple, textured = make_clip(0, 0, 8, 32, world="simple"), make_clip(0, 0, 8, 32, world="textured")

    def background_roughness(clip):
        f = clip["frames"][0].astype(float)
        return float(np.abs(np.diff(f, axis=1))[clip["static"][:, 1:] > 0].mean())

    assert background_roughness(simple) < 0.5 * background_roughness(textured)
    ids = (simple["depth"][0] < 1)  # object pixels of frame 0: flat colours, few distinct values
    assert len(np.unique(simple["frames"][0][ids].reshape(-1, 3), axis=0)) <= 2
    assert simple["txt"].endswith("over a striped background")
    with pytest.raises(ValueError, match="world"):
        make_clip(0, 0, world="hard")


def test_gravity_accelerates_downwards():
    clip = make_clip(0, 0, frames=6, size=64, num_shapes=1, gravity=1)
    vy = np.array(clip["state"]["velocity"])[:, 0, 1]
    assert (np.diff(vy)[:2] == 1).all() or (np.diff(vy) < 0).any()  # +1 per frame until a bounce


def test_synth_inspect_roundtrip(tmp_path):
    out = tmp_path / "s"
    proc = run_tcplug("data", "synth", "--out", out, "--clips", 6, "--frames", 4, "--size", 16, "--seed", 3,
                      "--shard-size", 4)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.tar"))) == 2
    proc = run_tcplug("data", "inspect", out, "--json")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 0 and rep["clips"] == 6 and rep["bad"] == []
    assert rep["shapes"]["video"] == [4, 3, 16, 16] and rep["shapes"]["flow"] == [3, 2, 16, 16]
    for key in ("frames.npy", "flow.npy", "occ.npy", "depth.npy", "skeleton.npy", "static.npy", "state.json", "txt"):
        assert rep["keys"][key] == 6
    # decoded values equal the generator's
    decoder = SampleDecoder(["flow"], 4, 16)
    first = next(decoder(TarSamples(decoder)([{"url": str(sorted(out.glob("*.tar"))[0])}])))
    ref = make_clip(3, 0, 4, 16, 2, world="simple")  # the CLI writes the simple world by default
    assert torch.equal(first["flow"], torch.from_numpy(ref["flow"]).permute(0, 3, 1, 2))


def test_mp4_frames_roundtrip(tmp_path):
    out = tmp_path / "m"
    assert run_tcplug("data", "synth", "--out", out, "--clips", 2, "--frames", 4, "--size", 32,
                      "--format", "mp4").returncode == 0
    rep = inspect_shards(out)
    assert rep["clips"] == 2 and "frames.mp4" in rep["keys"]


def make_bad_shards(folder: Path) -> int:
    """Shards with one bad sample of each kind; returns the number of bad samples."""
    good = [encode_sample(f"good{i}", make_clip(0, i, 4, 16, 2)) for i in range(4)]
    bad = []
    s = encode_sample("corruptnpy", make_clip(0, 10, 4, 16, 2))
    s["flow.npy"] = s["flow.npy"][:50]
    bad.append(s)
    s = encode_sample("badvideo", make_clip(0, 11, 4, 16, 2))
    del s["frames.npy"]
    s["frames.mp4"] = b"\x00\x00\x00\x18ftypmp42 definitely not a video"
    bad.append(s)
    s = encode_sample("wrongshape", make_clip(0, 12, 4, 24, 2))  # 24x24, expected 16x16
    bad.append(s)
    s = encode_sample("missingkey", make_clip(0, 13, 4, 16, 2))
    del s["occ.npy"]
    bad.append(s)
    s = encode_sample("shortclip", make_clip(0, 14, 2, 16, 2))  # 2 frames, 4 needed
    bad.append(s)
    write_shards(folder, good[:2] + bad + good[2:], prefix="ok", maxcount=100)
    # a truncated shard: its good first sample is read, then the tar breaks
    write_shards(folder / "tmp", [encode_sample("beforecut", make_clip(0, 20, 4, 16, 2)),
                                  encode_sample("cut", make_clip(0, 21, 4, 16, 2))], prefix="trunc")
    data = (folder / "tmp" / "trunc-000000.tar").read_bytes()
    (folder / "trunc-000000.tar").write_bytes(data[: int(len(data) * 0.6)])  # cut inside the 2nd sample
    return len(bad) + 1


def test_bad_samples_are_skipped_and_counted(tmp_path):
    n_bad = make_bad_shards(tmp_path)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    decoder = SampleDecoder(["flow", "occ"], 4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = list(decoder(TarSamples(decoder)([{"url": u} for u in shards])))
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataSkipWarning)]
    assert decoder.skipped == n_bad == len(msgs)
    assert sorted(c["__key__"] for c in clips) == ["beforecut", "good0", "good1", "good2", "good3"]
    for key in ("corruptnpy", "badvideo", "wrongshape", "missingkey", "shortclip"):
        line = next(m for m in msgs if f"'{key}'" in m)
        assert "ok-000000.tar" in line and "\n" not in line
    assert any("trunc-000000.tar" in m and "unreadable shard" in m for m in msgs)
    assert "missing key occ.npy" in next(m for m in msgs if "'missingkey'" in m)
    assert "expected 16x16" in next(m for m in msgs if "'wrongshape'" in m)


def test_inspect_lists_every_bad_sample(tmp_path):
    n_bad = make_bad_shards(tmp_path)
    proc = run_tcplug("data", "inspect", tmp_path, "--json")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 1
    # inspect does not ask for a frame count, so the short clip is fine there
    assert len(rep["bad"]) == n_bad - 1 and rep["clips"] == 6
    assert {b["key"] for b in rep["bad"]} == {"corruptnpy", "badvideo", "wrongshape", "missingkey", None}


@pytest.mark.slow
def test_training_goes_on_over_bad_data(tmp_path, tiny):
    make_bad_shards(tmp_path / "shards")
    tiny = [a for a in tiny if not a.startswith(("--data.size", "--data.frames", "--trainer.max_steps"))]
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--data.size=16", "--data.frames=4",
                      f"--data.shards={tmp_path / 'shards'}", "--data.keys=[flow,occ]", "--trainer.max_steps=6",
                      "--trainer.log_every_n_steps=1", "--data.epoch_batches=6", cwd=tmp_path,
                      process=True)  # the skip warnings as the console shows them
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping sample" in proc.stderr and "Traceback" not in proc.stderr
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert metrics["global_step"] == 6 and metrics["metrics"]["data/skipped"] >= 1


def test_synthetic_cache_is_keyed_and_reused(tmp_path):
    dm = VideoDataModule(frames=4, size=16, train_clips=8, val_clips=2, cache_dir=str(tmp_path))
    dm.prepare_data()
    folder = dm.synthetic_dir()
    stamp = (folder / "params.json").stat().st_mtime_ns
    VideoDataModule(frames=4, size=16, train_clips=8, val_clips=2, cache_dir=str(tmp_path)).prepare_data()
    assert (folder / "params.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    other = VideoDataModule(frames=4, size=16, train_clips=8, val_clips=2, seed=1, cache_dir=str(tmp_path))
    assert other.synthetic_dir() != folder


def test_loader_is_deterministic_and_epoch_length_fixed(tmp_path):
    def keys(seed):
        dm = VideoDataModule(frames=4, size=16, batch_size=2, epoch_batches=5, train_clips=32, shard_size=4,
                             seed=seed, cache_dir=str(tmp_path))
        dm.prepare_data()
        dm.setup()
        batches = list(dm.train_dataset(0, 1))
        assert len(batches) == 5
        return [k for b in batches for k in b["__key__"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


def test_ranks_get_disjoint_shards_in_process(tmp_path):
    dm = VideoDataModule(frames=4, size=16, batch_size=2, epoch_batches=4, train_clips=32, shard_size=4,
                         cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    seen = [{u for b in dm.train_dataset(r, 2) for u in b["__url__"]} for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(Exception, match="every process needs its own"):
        dm.train_dataset(0, 9)


@pytest.mark.slow
def test_two_ddp_ranks_read_disjoint_shards(tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith(("--data.train_clips", "--trainer.max_steps", "--data.epoch_batches"))]
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--data.train_clips=16",
                      "--data.shard_size=2", "--data.epoch_batches=3", "--trainer.max_steps=3",
                      "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      "--trainer.callbacks+=tests.helpers.RecordBatches",
                      f"--trainer.callbacks.init_args.out_dir={tmp_path}",
                      cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 3
    assert ranks[0]["urls"] and ranks[1]["urls"] and not set(ranks[0]["urls"]) & set(ranks[1]["urls"])


@pytest.mark.slow
@pytest.mark.skipif(len(VIDEOS) < 2, reason="the two sample camera videos are not beside the checkout")
def test_ingest_real_videos_and_train(tmp_path, tiny):
    out = tmp_path / "real"
    proc = run_tcplug("data", "ingest", *VIDEOS, tmp_path / "missing.mp4", "--out", out, "--frames", 4,
                      "--size", 32, "--stride", 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "missing.mp4" in proc.stderr  # reported, the others still ingested
    rep = inspect_shards(out)
    assert rep["clips"] > 2 and rep["bad"] == []
    assert {"flow.npy", "flow_bwd.npy", "occ.npy", "frames.npy"} <= set(rep["keys"])
    tiny = [a for a in tiny if not a.startswith("--data.size")]
    # real footage has no object state, caption or static mask: drop the world-model and caption
    # conditioners and lock by the (estimated) flow instead
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, f"--data.shards={out}", "--data.size=32",
                      "--model.conditioner=null", "--model.motion_lock=auto", "--model.motion_lock.source=flow",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())["metrics"]
    assert metrics["val/tvs_data"] > 0  # real footage: estimated flow, a real data floor


def test_ingest_exits_nonzero_when_nothing_read(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"nope")
    proc = run_tcplug("data", "ingest", tmp_path / "bad.mp4", tmp_path / "gone.mp4", "--out", tmp_path / "o")
    assert proc.returncode == 1 and proc.stderr.count("error:") == 2 and "Traceback" not in proc.stderr


def decode_marker(raw, frames, height, width):
    """A third-party key: ``marker.npy`` (T,) per-frame floats (module level: picklable)."""
    import io

    arr = np.load(io.BytesIO(raw), allow_pickle=False)[:frames]
    if arr.shape != (frames,):
        raise ValueError(f"shape {arr.shape}, expected ({frames},)")
    return torch.from_numpy(arr).float()


class MarkerReader(tcplug.WorldConditioner):
    """Declares the shard key it reads; the engine has never heard of it."""

    data_keys = (tcplug.DataKey("marker", "marker.npy", decode_marker, "per-frame marker (T,)"),)

    def forward(self, batch, latent_shape):
        return {}


class _MarkerPlugin:
    @tcplug.hookimpl
    def tcplug_register_components(self, register):
        register(MarkerReader, name="marker_reader")


def test_a_component_reads_a_shard_key_of_its_own(tmp_path):
    """The schema is the union of declarations: a key a registered component declares is
    detected in the shards, decoded into every batch and listed by inspect; without the
    declaration it is ignored, and asking for it is an error listing the known keys."""
    from tcplug.data.shards import encode_sample

    def samples():
        for i in range(4):
            s = encode_sample(f"c{i}", make_clip(0, i, 4, 16))
            s["marker.npy"] = _npy(np.arange(4, dtype=np.float32) + i)
            yield s

    write_shards(tmp_path, samples(), maxcount=2)
    kwargs = dict(shards=str(tmp_path), frames=4, size=16, batch_size=2, epoch_batches=1, val_clips=2)
    plain = VideoDataModule(**kwargs)
    plain.setup("fit")
    assert "marker" not in plain.keys and "flow" in plain.keys
    with pytest.raises(tcplug.TcplugError, match="unknown data.keys \\['marker'\\]"):
        VideoDataModule(**kwargs, keys=["marker"])
    name = tcplug.register_plugin(_MarkerPlugin(), name="marker-keys")
    try:
        dm = VideoDataModule(**kwargs)
        dm.setup("fit")
        assert "marker" in dm.keys
        batch = next(iter(dm.train_dataloader()))
        assert batch["marker"].shape == (2, 4)
        assert inspect_shards(tmp_path)["shapes"]["marker"] == [4]  # decoded, not only counted
    finally:
        tcplug.unregister_plugin(name)


def _npy(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
