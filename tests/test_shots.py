"""Several shots of one scene: the multi-shot world, and metrics that know cuts (a cut is not
flicker; identity across shots; cut detection and accuracy)."""

from pathlib import Path

import numpy as np
import pytest
import torch

REAL = Path(__file__).parent / "data" / "cuts" / "real_clips.npz"


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(1, T, 3, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()[None] / 255


def test_shots_world_keeps_its_objects_and_exact_flow_within_shots():
    """Every cut changes the camera; the physical state runs on across cuts (world time jumps by
    0 .. jump); within a shot, warping frame n+1 back by the stored flow gives frame n exactly on
    the pixels not marked occluded; a pair across a cut is all occluded."""
    from tcplug.data.shots import make_shots

    c = make_shots(0, 3, shots=4, shot_frames=6, size=32, jump=3)
    shots = c["state"]["shots"]
    assert c["frames"].shape == (24, 32, 32, 3) and c["ids"].shape == (24, 32, 32)
    assert c["cuts"].nonzero()[0].tolist() == [5, 11, 17]
    assert shots[0]["scale"] == 2 and all((a["scale"], a["offset"]) != (b["scale"], b["offset"])
                                          for a, b in zip(shots, shots[1:]))
    assert all(0 <= b["time"] - a["time"] - 6 <= 3 for a, b in zip(shots, shots[1:]))
    frames = c["frames"].astype(int)
    vv, uu = np.mgrid[0:32, 0:32]
    for t in range(23):
        if c["cuts"][t]:
            assert c["occ"][t].all()
            continue
        f = c["flow"][t].astype(int)
        keep = c["occ"][t] == 0
        warped = frames[t + 1][np.clip(vv + f[..., 1], 0, 31), np.clip(uu + f[..., 0], 0, 31)]
        assert keep.any() and (warped[keep] == frames[t][keep]).all(), t
    # the same objects in every shot: each wide shot shows every object, in its colour
    for shot in shots:
        if shot["scale"] == 2:
            ids = c["ids"][shot["start"]]
            for i, obj in enumerate(c["state"]["objects"]):
                visible = ids == i
                assert visible.any()
                assert (np.abs(c["frames"][shot["start"]][visible] - obj["colour"]) <= 1).all()


def test_tvs_of_two_real_clips_joined_by_a_cut_is_the_mean_of_their_own():
    """A hard cut between two real clips (15 pairs each): TVS over the joined video, with the cut
    given and with the cut detected, equals the mean of the two clips' own TVS; the cut pair is
    counted in ``cut_pairs``, not scored. Scored as one shot (cuts=none) the joined video differs."""
    from tcplug.metrics.shots import detect_cuts
    from tcplug.metrics.temporal import TemporalVarianceScore, estimate_flows

    z = np.load(REAL)
    a, b = clip_tensor(z["cockatoo"]), clip_tensor(z["realshort"])
    joined = torch.cat([a, b], dim=1)

    def tvs(video, mode="given", batch=None):
        m = TemporalVarianceScore(cuts=mode)
        m.update(video, estimate_flows(video), batch)
        return float(m.compute()), int(m.cut_pairs)

    own = (tvs(a)[0] + tvs(b)[0]) / 2
    cuts = torch.zeros(1, 31, dtype=torch.bool)
    cuts[0, 15] = True
    assert detect_cuts(joined).nonzero().tolist() == [[0, 15]]
    assert not detect_cuts(a).any() and not detect_cuts(b).any()
    given, detected, one_shot = tvs(joined, batch={"cuts": cuts}), tvs(joined, "detect"), tvs(joined, "none")
    assert given[1] == detected[1] == 1 and one_shot[1] == 0
    assert given[0] == pytest.approx(own, rel=1e-5) and detected[0] == pytest.approx(own, rel=1e-5)
    assert one_shot[0] != pytest.approx(own, rel=1e-3)


def test_cut_detection_finds_the_worlds_cuts_and_not_a_shuffled_clip():
    """On the multi-shot world the detected cuts are the stored ones (balanced accuracy >= 0.95 over
    12 clips); a frame-shuffled one-camera clip (the incoherence a detector must not excuse) has
    none."""
    from tcplug.data.shots import make_shots
    from tcplug.data.synthetic import make_clip
    from tcplug.metrics.shots import CutAccuracy, detect_cuts

    acc = CutAccuracy()
    for i in range(12):
        c = make_shots(1, i, world="simple" if i % 2 else "textured")
        acc.update(clip_tensor(c["frames"]), batch={"cuts": torch.from_numpy(c["cuts"])[None]})
    assert float(acc.compute()) >= 0.95
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        v = clip_tensor(make_clip(0, i, frames=12, size=32, world="simple", num_shapes=3)["frames"])
        assert not detect_cuts(v[:, torch.randperm(12, generator=g)]).any()


def test_identity_drops_when_an_object_changes_colour_after_a_cut():
    """Cross-shot identity with the world's object masks: the data itself scores 1 (its colours are
    flat in the simple world); recolouring object 0 from shot 2 on scores lower, by the shots in
    between too. Without masks (the scene's colour histogram, for real video) the recoloured video
    also scores lower."""
    from tcplug.data.shots import make_shots
    from tcplug.metrics.shots import CrossShotIdentity

    c = make_shots(0, 5, shots=4, shot_frames=6, size=32, world="simple")
    frames = c["frames"].copy()
    later = np.zeros_like(c["ids"], dtype=bool)
    later[6:] = c["ids"][6:] == 0
    frames[later] = (30, 200, 30) if c["state"]["objects"][0]["colour_name"] != "green" else (200, 30, 200)
    batch = {"cuts": torch.from_numpy(c["cuts"])[None], "ids": torch.from_numpy(c["ids"])[None]}
    scores = {}
    for name, video in (("kept", c["frames"]), ("changed", frames)):
        for masks in (True, False):
            m = CrossShotIdentity()
            m.update(clip_tensor(video), batch=batch if masks else {"cuts": batch["cuts"]})
            scores[name, masks] = (float(m.compute()), m.by_distance())
    assert scores["kept", True][0] == pytest.approx(1.0, abs=1e-6)
    assert scores["changed", True][0] < scores["kept", True][0] - 0.1
    assert set(scores["kept", True][1]) == {1, 2, 3}
    assert all(scores["changed", True][1][d] < 0.95 for d in (1, 2, 3))
    assert scores["changed", False][0] < scores["kept", False][0]


def test_flicker_and_warping_error_leave_out_the_cut_pairs():
    """Every pair metric of the temporal module, and the motion ratio, skip the pairs the batch
    marks as cuts."""
    from tcplug.data.shots import make_shots
    from tcplug.metrics.fidelity import MotionRatio
    from tcplug.metrics.temporal import Flicker, WarpingError

    c = make_shots(0, 1, shots=2, shot_frames=5, size=32)
    video = clip_tensor(c["frames"])
    flows = (torch.from_numpy(c["flow"]).permute(0, 3, 1, 2)[None], torch.from_numpy(c["flow_bwd"]).permute(0, 3, 1, 2)[None])
    for cls in (Flicker, WarpingError):
        m = cls()
        m.update(video, flows, {"cuts": torch.from_numpy(c["cuts"])[None]})
        plain = cls(cuts="none")
        plain.update(video, flows, {"cuts": torch.from_numpy(c["cuts"])[None]})
        assert int(m.pairs) == 8 and int(m.cut_pairs) == 1 and int(plain.pairs) + int(plain.empty_pairs) == 9
    assert float(m.compute()) == 0.0  # exact flow within shots: nothing left to warp
    motion = MotionRatio()
    motion.update(video, flows, {"cuts": torch.from_numpy(c["cuts"])[None]})
    assert int(motion.value_n) == 8  # the flow-based companions too


def test_synth_writes_shots_that_read_back_with_their_cuts_and_ids(tmp_path):
    """`tcplug data synth --shots 3`: clips of 3 shots x --frames frames, with `cuts` and `ids` in
    the shards, decoded as the generator made them."""
    from tcplug.data.shards import SampleDecoder, TarSamples
    from tcplug.data.shots import make_shots
    from tests.conftest import run_tcplug

    out = tmp_path / "s"
    proc = run_tcplug("data", "synth", "--out", out, "--clips", 2, "--frames", 4, "--size", 16, "--shots", 3,
                      "--seed", 2)
    assert proc.returncode == 0, proc.stderr
    decoder = SampleDecoder(["cuts", "ids", "flow"], 12, 16)
    first = next(decoder(TarSamples(decoder)([{"url": str(sorted(out.glob("*.tar"))[0])}])))
    ref = make_shots(2, 0, 3, 4, 16, 2, world="simple")
    assert first["video"].shape[0] == 12 and first["cuts"].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    assert torch.equal(first["ids"], torch.from_numpy(ref["ids"]).long())


def test_ingest_marks_the_cut_of_a_real_video_made_of_two_shots(tmp_path):
    """`tcplug data ingest` of an mp4 holding two real shots: the clip's `cuts` mark the join (and
    nothing else), and the pair across it is all occluded."""
    from tcplug.data.ingest import clips_from_video
    from tcplug.video import write_video

    z = np.load(REAL)
    path = write_video(np.concatenate([z["cockatoo"], z["realshort"]]), tmp_path / "two_shots.mp4")
    clips = list(clips_from_video(path, frames=32, size=32))
    assert len(clips) == 1
    assert clips[0]["cuts"].nonzero()[0].tolist() == [15]
    assert clips[0]["occ"][15].all() and not clips[0]["occ"][14].all()


@pytest.mark.parametrize("sampler", ["ddpm", "flow"])
def test_keyframes_first_keeps_its_keyframes_and_fills_between_them(sampler):
    """Keyframes first (stride 4 over 11 frames: keyframes 0, 4, 8, 10), then in-betweens with the
    clean keyframes on both sides: the asked frames come back, the keyframes exactly as the first
    pass made them; the in-betweens see both ends (another last keyframe changes the frames before
    it) and are not what the same noise gives without them."""
    from tcplug.diffusion.keyframes import KnownFrames, keyframes_first
    from tcplug.diffusion.sampling import sample_loop
    from tcplug.module import TCPlugModule
    from tests.test_world import comp, dit, wake

    torch.manual_seed(0)
    kw = {"prediction_type": "v_prediction", "sampler": "ddpm"} if sampler == "ddpm" else \
        {"noise": "flow_matching", "prediction_type": "flow"}
    m = wake(TCPlugModule(dit(patch_size=2, attention=comp("attention", "temporal")), sample_steps=3, **kw)).eval()
    d = m.diffusion
    video, keys_z, keys = keyframes_first(d, 1, 11, 16, 16, stride=4, steps=3, seed=2)
    assert video.shape == (1, 11, 3, 16, 16) and keys == [0, 4, 8, 10]
    assert torch.equal(video[:, keys], d.latent.decode(keys_z).clamp(-1, 1))

    def fill(last):
        values = torch.zeros(1, 5, 3, 16, 16)
        values[:, 0], values[:, -1] = keys_z[:, 1], last
        ends = torch.tensor([True, False, False, False, True])
        noise = torch.randn(1, 5, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            return sample_loop(lambda x, t: d.denoise(x, t, None), noise, d.schedule, 3,
                               generator=torch.Generator().manual_seed(6), lock=KnownFrames(ends, values))
    a, b = fill(keys_z[:, 2]), fill(-keys_z[:, 2])
    assert torch.equal(a[:, 0], keys_z[:, 1]) and torch.equal(a[:, 4], keys_z[:, 2])
    assert (a[:, 1:4] - b[:, 1:4]).abs().max() > 1e-3


def shot_variant(**kw):
    import tcplug

    return tcplug.get_component("attention", "shot")(**kw)


def test_shot_attention_sees_its_shot_and_earlier_shots_keyframes():
    """The rule: dense within a shot, other shots only through their keyframes (first frames, or
    at a stride), earlier shots only unless ``later``; shot lengths may differ."""
    i = torch.arange(8)
    rule = shot_variant(shot_frames=3).allowed(i[:, None], i[None, :])
    assert rule[4, 3:6].all() and not rule[4, 6:].any()  # its shot (frames 3-5), no later shot
    assert rule[4, 0] and not rule[4, 1:3].any()  # shot 0 only through its first frame
    assert rule[7].tolist() == [1, 0, 0, 1, 0, 0, 1, 1]
    both = shot_variant(shot_frames=[2, 4], keyframe_stride=2, later=True).allowed(i[:, None], i[None, :])
    assert both[0].tolist() == [1, 1, 1, 0, 1, 0, 1, 0]  # shots [0,1] [2..5] [6,7]: keyframes 2, 4 and 6
    causal = shot_variant(shot_frames=4, causal=True)
    assert causal.causal and not shot_variant(shot_frames=4, causal=True, later=True).causal
    assert causal.allowed(i[:, None], i[None, :])[5].tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    for bad in (dict(shot_frames=0), dict(shot_frames=[]), dict(keyframe_stride=0)):
        with pytest.raises(Exception, match="shot attention"):
            shot_variant(**bad)


def test_shot_positions_leave_a_shot_alone_and_tell_shots_apart():
    """The shot rotary phase cancels within a shot (one shot: the same output as without it),
    changes attention across shots, and is relative (shifting every frame by whole shots changes
    nothing)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 5, 8, generator=g) for _ in range(3))
    one = dict(shot_frames=6)
    assert torch.allclose(shot_variant(**one)(q, k, v), shot_variant(**one, positions=False)(q, k, v), atol=1e-5)
    two = dict(shot_frames=3)
    with_pos, without = shot_variant(**two)(q, k, v), shot_variant(**two, positions=False)(q, k, v)
    assert torch.allclose(with_pos[:, :3], without[:, :3], atol=1e-5)  # shot 0 sees only itself
    assert not torch.allclose(with_pos[:, 3:], without[:, 3:], atol=1e-3)  # shot 1 sees shot 0's first frame
    a = shot_variant(**two)
    shifted = a.general(q, k, v, torch.arange(6) + 6)  # shots 2 and 3 instead of 0 and 1
    assert torch.allclose(shifted, with_pos, atol=1e-5)


def test_shot_attention_rule_holds_inside_dit():
    """In a ``dit`` block (adaLN gates made non-zero), perturbing frame j changes frame i's output
    exactly when the shot rule lets i see j: attention is the only path between frames."""
    import tcplug

    torch.manual_seed(0)
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=2, dim=32, depth=1, heads=2,
                                                  attention=shot_variant(shot_frames=2, keyframe_stride=None)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 6, 3, 4, 4)
    ts = torch.tensor([300.0])
    idx = torch.arange(6)
    rule = net.blocks[0].attn.allowed(idx[:, None], idx[None, :])
    assert not rule.all() and rule.sum() > 6  # the rule hides frames and shows some of other shots
    with torch.no_grad():
        base = net(x, ts)
        for j in range(6):
            y = x.clone()
            y[:, j] += 1.0
            changed = (net(y, ts) - base).abs().flatten(2).amax(2)[0] > 1e-6
            assert changed.tolist() == [bool(rule[i, j]) or i == j for i in range(6)], j


def test_built_in_data_with_shots_carries_the_cuts_and_ids(tmp_path):
    """`data.shots: 4` makes the built-in world the multi-shot one: 16-frame clips of 4 shots, the
    cuts every 4 frames and the objects' ids in every batch; shots that do not divide the frames
    are refused before anything is generated."""
    from tcplug.data import VideoDataModule
    from tcplug.errors import TcplugError

    dm = VideoDataModule(frames=16, size=16, shots=4, batch_size=2, epoch_batches=1, train_clips=4, val_clips=2,
                         cache_dir=str(tmp_path), shard_size=2)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 16, 3, 16, 16)
    assert batch["cuts"].shape == (2, 15) and batch["cuts"][:, 3::4].all() and int(batch["cuts"].sum()) == 6
    assert batch["ids"].shape == (2, 16, 16, 16)
    with pytest.raises(TcplugError, match="data.shots"):
        VideoDataModule(frames=16, size=16, shots=3, cache_dir=str(tmp_path))


def index_spy():
    """A ``full3d`` attention class that records the ``kv_index`` of every call in ``seen``."""
    import tcplug

    full3d = tcplug.get_component("attention", "full3d")

    class Spy(full3d):
        seen: list = []

        def forward(self, q, k, v, kv_index=None):
            Spy.seen.append(None if kv_index is None else kv_index.tolist())
            return super().forward(q, k, v, kv_index)

    return Spy


def test_keyframes_first_tells_the_attention_each_passs_absolute_frames():
    """Each pass of keyframes first hands the attention variant the latent frames it samples
    (``context["frame_index"]`` -> ``kv_index``): the keyframes 0, 4, 8, 10, then each span; so a
    rule or a position that depends on the frame (``shot``, ``temporal``) sees the real frames."""
    from tcplug.diffusion.keyframes import keyframes_first
    from tcplug.module import TCPlugModule
    from tests.test_world import dit, wake

    Spy = index_spy()
    torch.manual_seed(0)
    m = wake(TCPlugModule(dit(patch_size=2, depth=1, attention=Spy()), sample_steps=2)).eval()
    keyframes_first(m.diffusion, 1, 11, 16, 16, stride=4, steps=2, seed=0)
    passes = [s for i, s in enumerate(Spy.seen) if i == 0 or s != Spy.seen[i - 1]]
    assert passes == [[0, 4, 8, 10], [0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]], passes


def test_drift_figures_leave_out_cuts_and_start_each_shot_afresh():
    """Two one-camera clips of the world joined by a cut, chunks of 8: with the cut given, every
    chunk's figures are those of its own clip's chunk (TVS, motion, and background and object
    colour measured against the first chunk *of its shot*); without it, the second clip's chunks
    are measured against the first clip's (a scene change read as drift). A chunk that holds the
    cut leaves its pair out."""
    from tcplug.data.synthetic import make_clip
    from tcplug.metrics.drift import chunk_figures

    a, b = (make_clip(7, i, 16, 32)["frames"] for i in (0, 1))
    joined = np.concatenate([a, b])
    cut = np.zeros(31, dtype=bool)
    cut[15] = True
    own = [chunk_figures([x], 8)["figures"] for x in (a, b)]
    given = chunk_figures([joined], 8, cuts=[cut])["figures"]
    blind = chunk_figures([joined], 8)["figures"]
    for name in ("tvs", "motion", "background_colour", "object_colour", "object_size"):
        expect = np.concatenate([own[0][name][0], own[1][name][0]])
        assert np.allclose(given[name][0], expect, equal_nan=True), (name, given[name][0], expect)
    assert given["background_colour"][0, 2] == 0 and blind["background_colour"][0, 2] > 5
    odd = chunk_figures([joined[4:28]], 8, cuts=[cut[4:27]])["figures"]  # chunk 8..16 holds the cut (11 | 12)
    blind_odd = chunk_figures([joined[4:28]], 8)["figures"]
    assert odd["tvs"][0, 1] < blind_odd["tvs"][0, 1]


def _no_bounce_clip(shots=4, shot_frames=4, size=64):
    """The first clip of the multi-shot world whose objects keep their velocity (no bounce) and
    whose cuts jump forward in time: free flight is then its exact dynamics."""
    from tcplug.data.shots import make_shots

    for i in range(200):
        c = make_shots(3, i, shots, shot_frames, size, max_speed=1, jump=4)
        vel = np.array(c["state"]["velocity"])
        times = [s["time"] for s in c["state"]["shots"]]
        cams = {s["scale"] for s in c["state"]["shots"]}
        if (vel == vel[:1]).all() and times[-1] > (shots - 1) * shot_frames and cams == {1, 2}:
            return c
    raise AssertionError("no clip without a bounce")


def _iou(maps, ids):
    occ = maps[0, :, 0] > 0  # occupancy channel in [-1, 1]
    truth = torch.from_numpy(ids >= 0)
    return [float((occ[t] & truth[t]).sum() / (occ[t] | truth[t]).sum().clamp(min=1)) for t in range(len(ids))]


def test_world_model_state_carries_across_cuts_into_each_shots_camera():
    """physics_state on the multi-shot world: the state rolls on in world time (a cut may jump
    forward) and renders through each shot's camera (wide: the canvas at half scale; close-up: a
    quarter of it), so its maps cover the clip's objects in every shot (free flight from the first
    frame, no learned correction, on a clip without bounces); streaming chunk by chunk gives the
    same maps; the dynamics loss leaves out the pairs across a cut (not one world step apart)."""
    import tcplug

    clip = _no_bounce_clip()
    world = tcplug.get_component("conditioner", "physics_state")(shapes=True)
    batch = {"state": [clip["state"]], "frame_size": (64, 64), "num_frames": 16}
    maps = world.maps(batch, (1, 16, 3, 64, 64))
    ious = _iou(maps, clip["ids"])
    assert min(ious) > 0.7, [round(x, 2) for x in ious]
    scales = {s["scale"] for s in clip["state"]["shots"]}
    assert scales == {1, 2}  # both cameras are in the clip
    state, parts = {}, []
    for start in range(0, 16, 3):
        parts.append(world.stream_maps(batch, range(start, min(start + 3, 16)), (1, 16, 3, 64, 64), state))
    assert torch.allclose(torch.cat(parts, 1), maps, atol=1e-5)
    # the dynamics loss of free flight is zero here: no pair across a (jumping) cut is counted
    loss = world.auxiliary_loss({"state": [clip["state"]]})
    assert float(loss) < 1e-6, float(loss)


def test_per_shot_captions_reach_their_shots_frames_only():
    """caption with per_shot: the video's caption reaches every frame; each shot's own caption
    (the multi-shot world's state) only the frames of that shot (dit's cross-attention, per-frame
    text mask); the empty caption of guidance has no shot captions; streaming refuses."""
    import copy

    import tcplug
    from tcplug.data.shots import make_shots
    from tests.test_world import dit

    clip = make_shots(1, 0, shots=3, shot_frames=2, size=16)
    torch.manual_seed(0)
    net = dit(in_channels=3, patch_size=4, depth=1)
    cap = tcplug.get_component("conditioner", "caption")(width=32, layers=1, heads=2, per_shot=True).eval()
    cap.setup(net)
    for p in net.blocks[0].cross.out.parameters():  # the zero-initialized cross-attention, woken
        torch.nn.init.normal_(p, std=0.2)
    x, ts, shape = torch.randn(1, 6, 3, 16, 16), torch.tensor([300.0]), (1, 6, 3, 16, 16)

    def out(state, txt=clip["txt"]):
        ctx = cap({"txt": [txt], "state": [state], "num_frames": 6}, shape)
        assert ctx["text_mask"].shape[:2] == (1, 6)
        with torch.no_grad():
            return net(x, ts, ctx)

    base = out(clip["state"])
    other = copy.deepcopy(clip["state"])
    other["shots"][1]["caption"] = "a close-up of the green circle and more words"
    changed = (out(other) - base).abs().flatten(2).amax(2)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, False, False]
    assert ((out(clip["state"], "something else entirely") - base).abs().flatten(2).amax(2)[0] > 1e-6).all()
    null = cap.null_context(cap({"txt": [clip["txt"]], "state": [clip["state"]], "num_frames": 6}, shape))
    assert null["text_mask"].dim() == 2
    with pytest.raises(tcplug.TcplugError, match="per-shot"):
        cap.stream_context({"txt": [clip["txt"]], "state": [clip["state"]]}, shape, 0, {})


def test_keyframe_clips_are_the_same_world_at_a_stride_with_the_flow_of_that_stride():
    """`make_clip(stride=3)` renders every third step of the world `make_clip` simulates: its frames
    are the one-step clip's frames 0, 3, 6, 9, its flow moves an object by its 3-step displacement
    and its occlusion is of the strided pair."""
    from tcplug.data.synthetic import make_clip

    full = make_clip(0, 5, frames=10, size=32, world="simple")
    keys = make_clip(0, 5, frames=4, size=32, world="simple", stride=3)
    np.testing.assert_array_equal(keys["frames"], full["frames"][::3])
    pos = np.array(full["state"]["position"])
    assert keys["state"]["position"] == pos[::3].tolist() and keys["state"]["stride"] == 3
    for t in range(3):
        moved = keys["flow"][t][np.abs(keys["flow"][t]).sum(-1) > 0]
        shifts = {tuple(d) for d in (pos[3 * t + 3] - pos[3 * t]).tolist() if any(d)}
        assert {tuple(v) for v in moved.astype(int).tolist()} <= shifts and shifts, (t, shifts)
    assert "stride" not in full["state"]


def test_built_in_data_at_a_frame_stride_is_a_world_of_its_own(tmp_path):
    """`data.frame_stride: 2` gives keyframe clips (its own cache folder: the one-step world's is
    untouched); with shards or shots it is refused."""
    from tcplug.data import VideoDataModule
    from tcplug.data.synthetic import make_clip
    from tcplug.errors import TcplugError

    kw = dict(frames=4, size=16, batch_size=1, epoch_batches=1, train_clips=2, val_clips=1, cache_dir=str(tmp_path),
              shard_size=2)
    dm = VideoDataModule(frame_stride=2, **kw)
    assert dm.synthetic_dir != VideoDataModule(**kw).synthetic_dir
    dm.prepare_data()
    dm.setup("fit")
    clip = dm._val_set()[0]
    want = make_clip(dm.seed + 1_000_003, 0, 8, 16, world="simple")["frames"][::2]  # the validation split's seed
    got = ((clip["video"].permute(0, 2, 3, 1) + 1) * 127.5).round().numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1
    for bad in ({"frame_stride": 0}, {"frame_stride": 2, "frames": 8, "shots": 2}, {"frame_stride": [2, 2]},
                {"frame_stride": []}, {"frame_stride": [1, 0]}):
        with pytest.raises(TcplugError, match="frame_stride"):
            VideoDataModule(**{**kw, **bad})


def test_keyframes_first_cuts_the_per_frame_context_to_each_passs_frames(monkeypatch):
    """A world model's per-frame context (``input_maps``, ``maps``, each block's ``residuals``) reaches
    each pass cut to the frames it samples — the keyframes, then each span — while a whole-video entry
    (a caption) and a residual that broadcasts over frames pass whole."""
    from tcplug.diffusion.keyframes import context_frames, keyframes_first
    from tcplug.module import TCPlugModule
    from tests.test_world import dit, wake

    m = wake(TCPlugModule(dit(patch_size=2, depth=1), sample_steps=2)).eval()
    d = m.diffusion
    frame = torch.arange(11.0).view(1, 11, 1, 1, 1)
    text = torch.randn(1, 3, 32)
    whole = {"input_maps": frame.expand(1, 11, 2, 8, 8), "maps": frame.expand(1, 11, 1, 16, 16),
             "residuals": [frame.view(1, 11, 1, 1), torch.ones(1, 1, 1, 1)], "text": text}
    seen = []
    orig = d.guided

    def spy(x, t, ctx, nul, scale):
        assert ctx["text"] is text and ctx["residuals"][1].shape == (1, 1, 1, 1)
        got = [ctx["input_maps"][0, :, 0, 0, 0], ctx["maps"][0, :, 0, 0, 0], ctx["residuals"][0][0, :, 0, 0]]
        assert all(torch.equal(g, got[0]) for g in got) and len(got[0]) == x.shape[1]
        seen.append(got[0].long().tolist())
        return orig(x, t, None, None, scale)

    monkeypatch.setattr(d, "context", lambda batch, shape: whole)
    monkeypatch.setattr(d, "guided", spy)
    keyframes_first(d, 1, 11, 16, 16, stride=4, steps=2, seed=0)
    passes = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert passes == [[0, 4, 8, 10], [0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]], passes
    # a causal VAE (4x in time): latent frame j > 0 holds pixel frames 4j-3 .. 4j of `maps`
    pix = context_frames({"maps": torch.arange(9.0).view(1, 9, 1)}, [0, 2], temporal_compression=4)
    assert pix["maps"].flatten().tolist() == [0, 5, 6, 7, 8]


def test_training_on_a_mixture_of_strides_places_each_batchs_frames_its_stride_apart(tmp_path):
    """``data.frame_stride: [1, 4]``: the clips take the strides in turn, every batch (training and
    validation) holds clips of one stride and says it, and the backbone sees ``frame_index``
    0, 4, 8, 12 for a batch of keyframe clips, the frames 0 .. 3 for one-step clips: one model
    learns both passes of keyframes first."""
    from tcplug.data import VideoDataModule
    from tcplug.data.shards import collate
    from tcplug.errors import TcplugError
    from tcplug.module import TCPlugModule
    from tests.test_world import dit, wake

    dm = VideoDataModule(frames=4, size=16, batch_size=2, epoch_batches=6, train_clips=8, val_clips=5, shard_size=4,
                         keys=["state"], frame_stride=[1, 4], cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    Spy = index_spy()
    m = wake(TCPlugModule(dit(patch_size=2, depth=1, attention=Spy())))
    seen = set()
    for batch in dm.train_dataloader():
        k = batch.get("frame_stride", 1)
        assert [s.get("stride", 1) for s in batch["state"]] == [k, k]  # the clips are at the batch's stride
        m.training_losses(dm.on_after_batch_transfer(batch, 0))
        want = [[0, 4, 8, 12]] if k == 4 else [None, [0, 1, 2, 3]]
        assert Spy.seen[-1] in want, (k, Spy.seen[-1])
        seen.add(k)
    assert seen == {1, 4}
    val = list(dm.val_dataloader())
    assert sorted(len(b["video"]) for b in val) == [1, 2, 2]  # 3 one-step clips, 2 keyframe clips
    assert all({s.get("stride", 1) for s in b["state"]} == {b.get("frame_stride", 1)} for b in val)
    clips = dm._val_set().clips
    with pytest.raises(TcplugError, match="mixes clips at frame strides"):
        collate([clips[0], clips[1]])


def test_shards_written_at_a_stride_carry_it_into_their_batches(tmp_path):
    """``tcplug data synth --stride 2`` writes the stride into each clip's metadata; a datamodule
    reading those shards (no ``data.frame_stride``) hands batches that say ``frame_stride`` 2."""
    from tcplug.data import VideoDataModule
    from tests.conftest import run_tcplug

    out = tmp_path / "k"
    proc = run_tcplug("data", "synth", "--out", out, "--clips", 4, "--frames", 3, "--size", 16, "--stride", 2,
                      "--shard-size", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dm = VideoDataModule(shards=str(out), frames=3, size=16, batch_size=2, epoch_batches=2, val_clips=2)
    dm.setup("fit")
    assert [b["frame_stride"] for b in dm.train_dataloader()] == [2, 2]
    assert [b["frame_stride"] for b in dm.val_dataloader()] == [2]


def test_the_main_job_trains_and_validates_on_keyframe_clips(tmp_path, tiny):
    """`tcplug fit --config recipes/full.yaml --data.frame_stride=[1,4] --model.frame_timesteps=independent`
    (the shots tutorial's command): every technique of the main job (its world model reads the strided
    state) trains and samples on a mixture of keyframe and one-step clips."""
    from tests.conftest import RECIPES, run_tcplug

    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", *tiny, "--data.frame_stride=[1,4]",
                      "--model.frame_timesteps=independent",
                      f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_per_shot_captions_reach_each_shots_frames_in_wan_and_ltx(family, tmp_path):
    """``wan_text`` / ``ltx_text`` with ``per_shot: true``: the video's caption and each shot's,
    encoded alike and laid end to end, with a per-frame mask; in the backbone every frame of shot k
    attends to the video's caption and shot k's only: with frames kept apart (``per_frame``
    attention), the frames of each shot come out exactly as a run given just those two captions,
    and not as one given the other shot's."""
    import importlib

    from tcplug import get_component

    folder = importlib.import_module(f"tcplug_{family}.tiny").make_tiny_folder(tmp_path / family)
    text = get_component("conditioner", f"{family}_text")(pretrained=str(folder), max_length=8, dropout=0.0,
                                                          per_shot=True).eval()
    bb = get_component("backbone", family)(pretrained=str(folder),
                                           attention=get_component("attention", "per_frame")()).eval()
    c = bb.in_channels
    side = 4 if family == "wan" else 2
    state = {"shots": [{"start": 0, "frames": 5, "caption": "a wide shot"},
                       {"start": 5, "frames": 4, "caption": "a close-up of the red square"}]}
    ctx = text({"txt": ["two shapes bounce"], "state": [state], "num_frames": 9}, (1, 3, c, side, side))
    seg = ctx["text"].shape[1] // 3
    assert ctx["text"].shape[1] == 3 * seg and ctx["text_mask"].shape == (1, 3, 3 * seg)
    see = ctx["text_mask"][0].view(3, 3, seg).any(-1)  # (latent frame, segment): pixel frames 0, 4, 8
    assert see.tolist() == [[True, True, False], [True, True, False], [True, False, True]]
    x = torch.randn(1, 3, c, side, side, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([500.0])

    def given(k):  # the video's caption and shot k's, as a plain (unmasked) text
        keep = torch.cat([torch.arange(seg), torch.arange((1 + k) * seg, (2 + k) * seg)])
        plain = {"text": ctx["text"][:, keep]}
        if family == "ltx":
            plain["text_mask"] = ctx["text_mask"][:, 2 if k else 0, keep]
        return bb(x, ts, plain)

    with torch.no_grad():
        out, first, second = bb(x, ts, ctx), given(0), given(1)
    assert torch.allclose(out[:, :2], first[:, :2], atol=1e-5), (out[:, :2] - first[:, :2]).abs().max()
    assert torch.allclose(out[:, 2:], second[:, 2:], atol=1e-5), (out[:, 2:] - second[:, 2:]).abs().max()
    assert not torch.allclose(out[:, 2:], first[:, 2:], atol=1e-4)
    null = text.null_context(ctx)  # guidance's branch: the negative prompt for every frame
    assert null["text"].shape[1] == seg and (null.get("text_mask") is None) == (family == "wan")
    assert family == "wan" or null["text_mask"].shape == (1, seg)


def test_wan_trains_and_samples_with_per_shot_captions(tmp_path):
    """`recipes/shots/wan_per_shot.yaml` (a tiny Wan folder, the CPU smoke preset, 3 shots of 3
    frames): the LoRA step reads each shot's caption and validation samples with guidance (the
    negative prompt for every frame)."""
    import json

    from tcplug_wan.tiny import make_tiny_folder

    from tests.conftest import RECIPES, run_tcplug

    folder = make_tiny_folder(tmp_path / "tiny-wan")
    proc = run_tcplug("fit", "--config", RECIPES / "shots" / "wan_per_shot.yaml", "--config",
                      RECIPES / "presets" / "cpu-smoke.yaml", "--data.frames=9", "--data.shots=3",
                      f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, env={"WAN_MODEL_DIR": str(folder)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs").glob("wan-per-shot/version_0"))
    assert "val/tvs" in json.loads((run / "metrics.json").read_text())["metrics"]
