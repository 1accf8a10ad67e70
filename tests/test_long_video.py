"""Long video: every model whose attention streams is sampled chunk by chunk, conditioners, experts,
guidance, the ancestral sampler and the motion lock included."""

import pytest
import torch

from tcplug import WorldConditioner, get_component
from tcplug.errors import TcplugError
from tcplug.module import TCPlugModule
from tests.test_world import comp, wake

STATE = {"size": 16, "gravity": 0.2,
         "objects": [{"class": "square", "size": 2.5, "colour": [220, 40, 40], "depth": 0.3},
                     {"class": "circle", "size": 2.0, "colour": [40, 200, 60], "depth": 0.6}],
         "position": [[[4.0, 5.0], [11.0, 9.0]]], "velocity": [[[0.9, 0.3], [-0.6, 0.5]]]}
BATCH = {"state": [STATE], "txt": ["a red square and a green circle"]}


def full_stack(**kw):
    """The main job's stack at toy size: cross-frame attention with an anchor, the world model with
    input maps, captions with guidance, feed-forward experts, the ancestral sampler."""
    torch.manual_seed(0)
    bb = get_component("backbone", "dit")(dim=32, depth=2, heads=2, patch_size=2, conv_channels=8,
                                          attention=comp("attention", "cross_frame", window=2, anchor=True))
    m = TCPlugModule(bb, conditioner=[comp("conditioner", "physics_state", shapes=True, input_maps=True),
                                      comp("conditioner", "caption", width=32)],
                     router=comp("router", "noise_boundary", num_experts=2, experts="ffn"),
                     prediction_type="v_prediction", sampler="ddpm", guidance_scale=2.0, sample_steps=4, **kw)
    return wake(m).eval()


def test_the_full_stack_streams_and_equals_all_at_once():
    m = full_stack()
    assert m.can_stream
    whole = m.generate(1, 10, 16, 16, batch=BATCH, seed=1)
    experts = list(m.diffusion.sampler_expert_steps)
    streamed = torch.cat(list(m.stream(10, 16, 16, 4, batch=BATCH, seed=1)), dim=1)
    assert streamed.shape == whole.shape == (1, 10, 3, 16, 16)
    assert torch.allclose(streamed, whole, atol=1e-4), (streamed - whole).abs().max()
    assert experts[0] and experts[1]  # both experts took steps
    # the conditions matter: another caption or another state gives another video
    other = {**BATCH, "state": [{**STATE, "velocity": [[[-0.9, 0.0], [0.6, -0.5]]]}]}
    assert (torch.cat(list(m.stream(10, 16, 16, 4, batch=other, seed=1)), 1) - whole).abs().max() > 1e-2


def test_the_world_model_rolls_its_state_forward_chunk_by_chunk():
    world = comp("conditioner", "physics_state", shapes=True)
    batch = {"state": [STATE], "frame_size": (16, 16)}
    whole = world.maps({**batch, "num_frames": 40}, (1, 40, 3, 16, 16))
    state: dict = {}
    chunks = [world.stream_maps(batch, range(s, min(s + 6, 40)), (1, 6, 3, 16, 16), state) for s in range(0, 40, 6)]
    assert torch.equal(torch.cat(chunks, 1), whole)
    assert set(state) == {"st", "size", "pos", "vel", "frame", "traj", "world"} and state["pos"].shape == (1, 2, 2)
    assert list(state["traj"]) == [39]  # no history: only the world time the next chunk starts from
    with pytest.raises(TcplugError, match="follow each other"):
        world.stream_maps(batch, range(3, 9), (1, 6, 3, 16, 16), state)


def test_a_streamed_motion_lock_stays_anchored_to_frame_0():
    """Auto lock from the world model's rollout, copy_anchor: in every chunk, positions that have been
    static since frame 0 hold frame 0's latents; the streamed lock (the masks of the chunks so far,
    multiplied) is the all-at-once lock of the whole video, and moving objects still move."""
    torch.manual_seed(0)
    bb = get_component("backbone", "dit")(dim=32, depth=2, heads=2, patch_size=2,
                                          attention=comp("attention", "cross_frame", window=2, anchor=True))
    m = wake(TCPlugModule(bb, conditioner=comp("conditioner", "physics_state"), sample_steps=3,
                          motion_lock=comp("motion_lock", "auto", source="conditioning", dilate=1),
                          lock_copy_anchor=True)).eval()
    batch = {"state": [STATE]}
    video = torch.cat(list(m.stream(12, 16, 16, 4, batch=batch, seed=0)), dim=1)
    d = m.diffusion
    cond = {**batch, "frame_size": (16, 16), "num_clips": 1, "num_frames": 12}
    lock = d.lock_mask(cond, d.context(cond, (1, 12, 3, 16, 16)), (1, 12, 3, 16, 16))[0, 0, 0].bool()
    assert 0.2 < lock.float().mean() < 0.95
    assert torch.equal(video[0, :, :, lock], video[0, :1, :, lock].expand(12, -1, -1))
    assert (video[0, 1:, :, ~lock] - video[0, :-1, :, ~lock]).abs().max() > 0.05


def test_a_condition_that_cannot_roll_forward_stops_with_a_clear_error():
    torch.manual_seed(0)
    bb = get_component("backbone", "dit")(dim=32, depth=2, heads=2, patch_size=2,
                                          attention=comp("attention", "cross_frame", window=1))
    m = TCPlugModule(bb, conditioner=comp("conditioner", "depth"), sample_steps=2).eval()
    depth = torch.rand(1, 4, 1, 8, 8)
    assert len(list(m.stream(4, 8, 8, 2, batch={"depth": depth}))) == 2  # within the clip given
    with pytest.raises(TcplugError, match="covers 4 frames"):
        list(m.stream(8, 8, 8, 4, batch={"depth": depth}))

    # the kind's default stream_context, on a conditioner with per-frame context: refused past chunk 0
    world = comp("conditioner", "physics_state")
    world.setup(bb)
    chunk = {"state": [STATE], "frame_size": (8, 8), "frames": range(4, 8), "num_frames": 4}
    assert "residuals" in WorldConditioner.stream_context(world, {**chunk, "frames": range(4)}, (1, 4, 3, 8, 8), 0, {})
    with pytest.raises(TcplugError, match="defines no stream_context"):
        WorldConditioner.stream_context(world, chunk, (1, 4, 3, 8, 8), 4, {})


# ----- drift ----------------------------------------------------------------------------------------
def _long_world(n=3, frames=64):
    from tcplug.data.synthetic import make_clip

    return [make_clip(0, i, frames=frames, size=32) for i in range(n)]


def test_drift_sees_what_adjacent_frame_metrics_miss():
    """A video that fades slowly or freezes half-way keeps an adjacent-frame TVS like the data's; the
    per-chunk figures against the first chunk and the data's motion see both. The simulated world
    itself (its truth as long as the video) is flat."""
    import numpy as np

    from tcplug.data.synthetic import make_clip
    from tcplug.metrics import drift

    world = _long_world()
    data = [c["frames"] for c in world]
    states = [c["state"] for c in world]
    reference = [make_clip(1, i, frames=8, size=32)["frames"] for i in range(8)]
    fade = np.linspace(1.0, 0.6, 64)[:, None, None, None]
    faded = [(v * fade).astype(np.uint8) for v in data]
    frozen = [np.concatenate([v[:32], np.repeat(v[31:32], 32, 0)]) for v in data]
    reports = {name: drift.chunk_figures(videos, 8, reference, states)
               for name, videos in (("data", data), ("faded", faded), ("frozen", frozen))}
    s = {name: drift.summary(r) for name, r in reports.items()}
    assert np.all(np.abs(s["data"]["background_colour"]) < 1) and np.all(s["data"]["trajectory_error"] < 2)
    assert np.all(np.abs(np.log(s["data"]["motion_ratio"])) < np.log(1.6))
    # the fade: TVS per chunk within the data's range, the background's colour 20+ levels off
    tvs = {k: np.nanmean(r["figures"]["tvs"]) for k, r in reports.items()}
    assert tvs["faded"] < 2 * tvs["data"]
    assert np.all(s["faded"]["background_colour"] > 20)
    # frozen half-way: no motion at the end (TVS reads it as perfectly coherent)
    assert np.all(s["frozen"]["motion_ratio"] < 0.05) and np.nanmean(reports["frozen"]["figures"]["tvs"][:, -2:]) < 0.1
    assert np.all(s["frozen"]["trajectory_error"] > 3 * s["data"]["trajectory_error"])


def test_score_per_chunk_writes_figures_and_a_plot(tmp_path):
    import json

    from tcplug.video import write_video
    from tests.conftest import tcplug_in_process

    world = _long_world(n=1, frames=32)
    write_video(world[0]["frames"], tmp_path / "long.mp4", fps=8)
    code, out, err = tcplug_in_process("score", tmp_path / "long.mp4", "--per-chunk", 8, "--json", cwd=tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["starts"] == [0, 8, 16, 24] and len(report["figures"]["tvs"][0]) == 4
    assert report["summary"]["background_colour"][0] < 5
    assert (tmp_path / "long.drift.png").stat().st_size > 10_000
    code, _, err = tcplug_in_process("score", tmp_path / "long.mp4", "--per-chunk", 64, cwd=tmp_path)
    assert code == 1 and "fewer than one chunk" in err


# ----- clean-context autoregression and diffusion forcing ----------------------------------------
def test_clean_context_conditions_each_chunk_on_the_finished_frames():
    """With the clean K/V cache, chunk 2 is exactly diffusion-forcing sampling of frames 4..7 next to
    the finished frames 0..3 held at the context timestep (per-frame timesteps in one pass)."""
    from tcplug.diffusion.sampling import (
        CleanContext,
        NoiseSchedule,
        frame_noise,
        sample_loop,
        stream_sample,
    )

    torch.manual_seed(0)
    bb = wake(get_component("backbone", "dit")(dim=32, depth=2, heads=2, patch_size=2,
                                               attention=comp("attention", "temporal", causal=True, window=8))).eval()
    schedule = NoiseSchedule("flow_matching", "flow")
    shape = (3, 8, 8)
    with torch.no_grad():
        chunks = list(stream_sample(lambda x, t, s: bb(x, t, {"stream": s}), shape, 8, 4, schedule, 3, seed=2,
                                    context="clean"))
        first = chunks[0]

        def with_context(x, t):  # frames 0..3 finished (t = 0), frames 4..7 at the step's t
            tt = torch.cat([torch.zeros(1, 4), t.float().view(1, 1).expand(1, 4)], 1)
            return bb(torch.cat([first, x], 1), tt)[:, 4:]

        expected = sample_loop(with_context, frame_noise(2, 0, range(4, 8), shape)[None], schedule, 3)
        same_step = list(stream_sample(lambda x, t, s: bb(x, t, {"stream": s}), shape, 8, 4, schedule, 3, seed=2))
    assert torch.allclose(chunks[1], expected, atol=1e-4), (chunks[1] - expected).abs().max()
    assert torch.allclose(same_step[0], first, atol=1e-5)  # chunk 1 has no context either way
    assert (same_step[1] - chunks[1]).abs().max() > 1e-3  # the same-step buffer is another context
    cache = CleanContext()
    for s in range(0, 24, 4):  # the cache keeps the window, whatever the length
        cache.frame_start, cache.writing = s, True
        bb(torch.randn(1, 4, *shape), torch.zeros(1), {"stream": cache})
    assert cache.buffered_frames() == 2 * 8


@pytest.mark.parametrize("mode", ["independent", "history"])
def test_diffusion_forcing_draws_noise_levels_per_frame(mode):
    from tests.helpers import synthetic_batch
    from tests.test_world import dit

    m = TCPlugModule(dit(), frame_timesteps=mode, context_noise=50, num_val_samples=0,
                     motion_lock=comp("motion_lock", "mask", source="static"), lock_prob=1.0)
    torch.manual_seed(0)
    t = m.diffusion.frame_noise_levels(256, 6, torch.device("cpu"))
    assert t.shape == (256, 6)
    if mode == "independent":
        assert (t.float().std(1) > 0).float().mean() > 0.95
    else:  # leading context frames at <= context_noise, then one level per clip
        rows = t[:, -1] > 50
        ctx = t[rows] <= 50
        assert bool((ctx | (t[rows] == t[rows, -1:])).all())  # context, or the clip's level
        lead = ctx.long().cumprod(1).sum(1)
        assert bool((lead == ctx.sum(1)).all()) and set(lead.tolist()) == {0, 1, 2, 3, 4, 5}  # leading, any count
    batch = synthetic_batch(n=2, frames=4, size=16, seed=0)
    loss, terms = m.training_losses(batch)  # per-frame timesteps through the lock and the loss
    assert torch.isfinite(loss) and m._last_timesteps.dim() == 5
    loss.backward()


def test_the_full_stack_streams_with_a_clean_noise_augmented_context():
    m = full_stack(stream_mode="clean", context_noise=20)
    seen = []
    hook = m.diffusion.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[1].flatten()[0].item()))
    video = torch.cat(list(m.stream(12, 16, 16, 4, batch=BATCH, seed=1)), dim=1)
    hook.remove()
    # per chunk: 4 steps x 2 passes (guidance), then one commit pass per cache at the context timestep
    assert len(seen) == 3 * (4 * 2 + 2) and seen[8:10] == [20, 20] and seen[-2:] == [20, 20]
    same = torch.cat(list(m.stream(12, 16, 16, 4, batch=BATCH, seed=1, context="same_step")), dim=1)
    assert video.shape == (1, 12, 3, 16, 16) and torch.isfinite(video).all()
    assert torch.allclose(video[:, :4], same[:, :4], atol=1e-4) and (video[:, 4:] - same[:, 4:]).abs().max() > 1e-5
    with pytest.raises(TcplugError, match="stream context"):
        list(m.stream(8, 16, 16, 4, batch=BATCH, context="fifo"))


def test_training_on_its_own_rollout():
    """rollout_prob 1: the first half of every clip is what the model itself sampled from the batch's
    conditions (not the data), held as context at <= context_noise and left out of the loss; the
    later frames are the data's and carry the gradient."""
    from tests.helpers import synthetic_batch

    torch.manual_seed(0)
    m = full_stack(rollout_prob=1.0, context_noise=30, rollout_steps=2, num_val_samples=0).train()
    batch = synthetic_batch(n=2, frames=4, size=16, seed=0)
    made = []
    real = m.diffusion.own_rollout

    def spy(context, shape):
        made.append(real(context, shape))
        return made[-1]

    m.diffusion.own_rollout = spy
    noised = m.diffusion.add_noise(batch)
    data = m.diffusion.encode(batch)
    own = made[0]
    assert own.shape == (2, 2, 3, 16, 16) and not own.requires_grad
    assert torch.equal(noised.x0[:, :2], own) and (own - data[:, :2]).abs().mean() > 0.05
    assert torch.equal(noised.x0[:, 2:], data[:, 2:])
    assert noised.timesteps.shape == (2, 4) and bool((noised.timesteps[:, :2] <= 30).all())
    assert torch.equal(noised.weight_mask.flatten(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    loss, _ = m.training_losses(batch)
    loss.backward()
    assert m.training and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def family_vae(name):
    """The tiny recipe's VAE of a model family (random weights)."""
    import yaml

    from tests.conftest import RECIPES

    cfg = yaml.safe_load((RECIPES / name / "tiny.yaml").read_text())["model"]["latent"]
    torch.manual_seed(0)
    return get_component("latent", cfg["class_path"])(**cfg["init_args"])


def decode_in_chunks(vae, z, chunk=3):
    state = {}
    with torch.no_grad():
        return [vae.decode_stream(z[:, s:s + chunk], state) for s in range(0, z.shape[1], chunk)]


def test_a_streamed_wan_decode_equals_the_whole_videos():
    """Wan's causal decoder carries its convolution cache across chunks: the frames are exact."""
    vae = family_vae("wan").eval()
    z = torch.randn(1, 9, vae.latent_channels, 4, 4)  # 3 chunks of 3 latent frames
    chunks = decode_in_chunks(vae, z)
    c = vae.temporal_compression
    assert [x.shape[1] for x in chunks] == [1 + 2 * c, 3 * c, 3 * c]
    with torch.no_grad():
        whole = vae.decode(z)
    assert torch.allclose(torch.cat(chunks, 1), whole, atol=1e-5), (torch.cat(chunks, 1) - whole).abs().max()


def test_a_streamed_ltx_decode_never_sees_more_latent_frames_than_the_first_chunk(monkeypatch):
    """Later chunks are decoded in groups, each with the previous frames as context, so the
    decoder's memory at any length is the first chunk's."""
    vae = family_vae("ltx").eval()
    z = torch.randn(1, 9, vae.latent_channels, 4, 4)
    calls = []
    decode = vae.vae_decode
    monkeypatch.setattr(vae, "vae_decode", lambda x: calls.append(x.shape[2]) or decode(x))
    chunks = decode_in_chunks(vae, z)
    c = vae.temporal_compression
    assert [x.shape[1] for x in chunks] == [1 + 2 * c, 3 * c, 3 * c]
    assert max(calls) == 3, calls  # the first chunk's latent frames, never the context + a whole chunk
    # each group continues from the frames before it: the last group's context is the video's
    with torch.no_grad():
        tail = vae.decode(z[:, 6:9])[:, 1 + c:]
    assert torch.allclose(chunks[2][:, -c:], tail, atol=1e-5)
