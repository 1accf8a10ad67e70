"""Noise-level experts (routers), world-model conditioners, captions + guidance, motion locking."""

import copy
import functools

import pytest
import torch
from torch.utils.data import DataLoader

import tcplug
from tcplug import get_component
from tcplug.metrics import TemporalVarianceScore
from tcplug.module import TCPlugModule
from tests.helpers import synthetic_batch


def comp(kind, name, **kw):
    return get_component(kind, name)(**kw)


def dit(**kw):
    """A tiny dit whose adaLN-zero/output layers are woken up (a fresh one outputs exactly 0,
    which would make every comparison below trivially true)."""
    bb = comp("backbone", "dit", **{"dim": 32, "depth": 2, "heads": 2, **kw})
    return wake(bb)


def wake(module):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(n=2, frames=4, size=16, seed=0)


def noisy(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch["video"].shape, generator=g)
    return x, torch.tensor([700, 300])


# ----- captions and classifier-free guidance -----------------------------------------------------
def test_caption_changes_output_and_guidance_scale_one_is_conditional(batch):
    torch.manual_seed(0)
    m = TCPlugModule(dit(), conditioner=comp("conditioner", "caption", width=32, dropout=0.5)).eval()
    wake(m.backbone)  # the cross-attention's zero-initialized output too
    x, t = noisy(batch)
    shape = tuple(x.shape)
    ctx = m.diffusion.context(batch, shape)
    other = m.diffusion.context({**batch, "txt": ["a blue square falls"] * 2}, shape)
    cond = m.diffusion.denoise(x, t, ctx)
    assert not torch.allclose(cond, m.diffusion.denoise(x, t, other), atol=1e-4)  # the caption matters
    null = m.diffusion.null_context(ctx)
    uncond = m.diffusion.denoise(x, t, null)
    assert not torch.allclose(cond, uncond, atol=1e-4)
    assert torch.equal(m.diffusion.guided(x, t, ctx, null, 1.0), cond)  # scale 1: the conditional prediction
    torch.testing.assert_close(m.diffusion.guided(x, t, ctx, null, 3.0), uncond + 3.0 * (cond - uncond))
    # caption dropout only in training
    cap = m.diffusion.conditioners[0]
    cap.train()
    torch.manual_seed(1)
    dropped = [bool((cap(batch, shape)["text_mask"].sum(1) == 1).all()) for _ in range(40)]
    assert 5 < sum(dropped) < 35
    cap.eval()
    assert not (cap(batch, shape)["text_mask"].sum(1) == 1).any()


def test_pretrained_text_encoder_from_a_local_path(tmp_path, batch):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "move", "over"]
    vocab.write_text("\n".join(words))
    tok = transformers.BertTokenizer(str(vocab))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    cap = comp("conditioner", "caption", pretrained=str(tmp_path / "enc"))
    m = TCPlugModule(dit(), conditioner=cap).eval()
    ctx = m.diffusion.context(batch, tuple(batch["video"].shape))
    assert ctx["text"].shape[-1] == 32 and ctx["text_mask"].dtype == torch.bool
    assert not any(p.requires_grad for p in cap.encoder.parameters())
    with pytest.raises(Exception, match="not a local directory"):
        comp("conditioner", "caption", pretrained=str(tmp_path / "missing"))


# ----- routers ------------------------------------------------------------------------------
class Recorder:
    """Forward pre-hooks recording which expert got which timesteps."""

    def __init__(self, module):
        self.seen = {i: [] for i in range(len(module.diffusion.experts))}
        for i, e in enumerate(module.diffusion.experts):
            e.register_forward_pre_hook(self.hook(i))

    def hook(self, i):
        def fn(mod, args):
            self.seen[i] += [float(v) for v in args[1].flatten(1).amax(1) if args[1].dim() > 1] if args[1].dim() > 1 \
                else [float(v) for v in args[1]]
        return fn


@pytest.mark.parametrize("noise,shift", [("ddpm", 1.0), ("flow_matching", 1.0), ("flow_matching", 3.0)])
def test_noise_boundary_routes_identically_in_training_and_sampling(noise, shift, batch):
    torch.manual_seed(0)
    m = TCPlugModule(dit(), router=comp("router", "noise_boundary"), noise=noise, shift=shift,
                     prediction_type="flow" if noise == "flow_matching" else "epsilon").eval()
    rec = Recorder(m)
    m.generate(1, 4, 16, 16, steps=10)
    sampled = {i: list(v) for i, v in rec.seen.items()}
    boundary = 0.875 * 1000
    assert sampled[0] and sampled[1]
    assert all(t >= boundary for t in sampled[0]) and all(t < boundary for t in sampled[1])
    # the training step with exactly the sampler's timesteps sends each to the same expert
    for e, ts in sampled.items():
        for t in ts:
            rec.seen = {i: [] for i in rec.seen}
            m.diffusion.schedule.sample_timesteps = lambda b, device, generator=None, t=t: torch.full((b,), t)
            if noise == "ddpm":
                m.diffusion.schedule.sample_timesteps = lambda b, device, generator=None, t=t: torch.full((b,), int(t))
            m.training_losses(batch)
            assert rec.seen[e] and not rec.seen[1 - e], (t, e, rec.seen)
    if noise == "flow_matching" and shift > 1:
        # the shift moves more sampler steps onto the high-noise expert: routing is in timestep
        # space (what the model sees), not in step-index space
        assert len(sampled[0]) > 10 * (1 - 0.875) + 1


def test_noise_boundary_snr_space_and_several_experts():
    from tcplug.diffusion.sampling import NoiseSchedule

    s = NoiseSchedule("ddpm")
    r = comp("router", "noise_boundary", num_experts=3, boundaries=[0.05, 2.0], space="snr")
    t = torch.tensor([999, 500, 10])
    assert r(t, s).argmax(1).tolist() == [0, 1, 2]
    r = comp("router", "noise_boundary", num_experts=3)
    assert r(torch.tensor([999, 500, 10]), s).argmax(1).tolist() == [0, 1, 2]
    with pytest.raises(Exception, match="decreasing"):
        comp("router", "noise_boundary", num_experts=3, boundaries=[200, 800])


def test_learned_router_balance_loss_is_logged_and_has_gradients(tmp_path, batch):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    router = comp("router", "learned", num_experts=2, top_k=1, experts="ffn")
    m = TCPlugModule(dit(), router=router, num_val_samples=0)
    total, terms = m.training_losses(batch)
    assert "router_balance" in terms
    grads = torch.autograd.grad(terms["router_balance"], list(router.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # straight-through top-1: the task loss also reaches the gate
    grads = torch.autograd.grad(terms["denoise"], list(router.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, DataLoader([batch, batch], batch_size=None))
    assert "train/loss_router_balance" in trainer.callback_metrics


def test_whole_backbone_experts_are_separate_copies(batch):
    m = TCPlugModule(dit(), router=comp("router", "noise_boundary", num_experts=2))
    assert len(m.diffusion.experts) == 2 and m.diffusion.experts[0] is not m.diffusion.experts[1]
    m2 = TCPlugModule(dit(), router=comp("router", "noise_boundary", num_experts=3, experts="ffn"))
    assert len(m2.diffusion.experts) == 1 and len(m2.backbone.blocks[0].ffn_experts) == 3


# ----- structural conditioners -------------------------------------------------------------
@pytest.mark.parametrize("name", ["depth", "skeleton", "physics_state", "caption"])
def test_zero_initialized_adapters_leave_outputs_unchanged(name, batch):
    torch.manual_seed(0)
    bb = dit()
    plain = TCPlugModule(copy.deepcopy(bb)).eval()
    kw = {"width": 32} if name == "caption" else {}
    cond = TCPlugModule(bb, conditioner=comp("conditioner", name, **kw)).eval()
    x, t = noisy(batch)
    ctx = cond.diffusion.context(batch, tuple(x.shape))
    assert ctx  # it does produce conditioning
    out = cond.diffusion.denoise(x, t, ctx)
    assert out.abs().mean() > 0.01
    torch.testing.assert_close(out, plain.diffusion.denoise(x, t, None), rtol=0, atol=0)
    wake(cond)  # once the adapter is no longer zero (as after training), the conditioning matters
    assert not torch.allclose(cond.diffusion.denoise(x, t, cond.diffusion.context(batch, tuple(x.shape))), out, atol=1e-4)


def test_conditioners_stack_and_missing_inputs_are_clear(batch):
    m = TCPlugModule(dit(), conditioner=[comp("conditioner", "depth"), comp("conditioner", "skeleton")])
    ctx = m.diffusion.context(batch, tuple(batch["video"].shape))
    assert len(ctx["residuals"]) == 2 and ctx["maps"].shape[2] == 3
    with pytest.raises(Exception, match="needs 'depth'"):
        m.diffusion.context({"video": batch["video"]}, tuple(batch["video"].shape))


@pytest.mark.parametrize("conv_channels", [0, 8])
def test_input_maps_reach_the_output_pixel_exactly(conv_channels, batch):
    """``input_maps=True``: the maps also enter the dit's input at latent resolution. Zero at
    initialisation; once trained, a change of the maps at one pixel changes the output there,
    through the input path alone (every adapter residual zeroed)."""
    torch.manual_seed(0)
    bb = dit(conv_channels=conv_channels, patch_size=4)
    plain = TCPlugModule(copy.deepcopy(bb)).eval()
    m = TCPlugModule(bb, conditioner=[comp("conditioner", "depth", input_maps=True),
                                      comp("conditioner", "skeleton", input_maps=True)]).eval()
    assert m.backbone.map_in.in_channels == 3  # 1 depth + 2 skeleton channels, in conditioner order
    x, t = noisy(batch)
    ctx = m.diffusion.context(batch, tuple(x.shape))
    assert ctx["input_maps"].shape == (2, 4, 3, 16, 16)
    torch.testing.assert_close(m.diffusion.denoise(x, t, ctx), plain.diffusion.denoise(x, t, None), rtol=0, atol=0)
    wake(m.backbone.map_in)
    zero = {**ctx, "residuals": [torch.zeros_like(r) for r in ctx["residuals"]]}
    base = m.diffusion.denoise(x, t, zero)
    moved = ctx["input_maps"].clone()
    moved[:, 2, 0, 9, 9] += 1.0
    diff = (m.diffusion.denoise(x, t, {**zero, "input_maps": moved}) - base).abs().amax(dim=2)  # (B, T, H, W)
    assert diff[:, 2, 9, 9].min() > 1e-5        # the pixel itself
    assert diff[:, [0, 1, 3]].max() == 0        # frames never mix outside the attention
    with pytest.raises(Exception, match="input_maps"):
        m.diffusion.denoise(x, t, {**ctx, "input_maps": moved[:, :, :2]})


def test_input_maps_need_a_backbone_that_takes_them():
    class NoMaps(torch.nn.Module):
        token_dim, num_blocks, patch_size = 8, 1, 1

    with pytest.raises(Exception, match="add_map_input"):
        comp("conditioner", "depth", input_maps=True).setup(NoMaps())


def test_physics_state_shapes_draw_the_worlds_silhouettes():
    """``shapes=True`` renders each object as its class's silhouette: its occupancy matches
    the pixels the synthetic world covers far better than a disc of the object's size."""
    from tcplug.data.synthetic import make_clip

    def iou(shapes):
        ps = comp("conditioner", "physics_state", shapes=shapes)
        scores = []
        for i in range(12):
            clip = make_clip(3, i, frames=4, size=32, world="simple")
            st = ps.parse([clip["state"]])
            occ = ps.render(st["pos"], st, 32, 32)[0, :, 0] > 0  # (T, H, W)
            covered = torch.from_numpy(clip["depth"].astype("float32") < 1)
            scores.append(float((occ & covered).sum() / (occ | covered).sum()))
        return sum(scores) / len(scores)

    silhouettes, discs = iou(True), iou(False)
    assert silhouettes > 0.9 and silhouettes > discs + 0.05, (silhouettes, discs)
    with pytest.raises(Exception, match="not one of"):
        comp("conditioner", "physics_state").parse([{"objects": [{"class": "blob", "size": 3}], "position": [[[1, 1]]]}])


def test_physics_state_dynamics_beat_constant_position():
    """After a short training on the synthetic world (bounces and gravity), the learned
    dynamics predict the next positions better than 'nothing moves'."""
    torch.manual_seed(0)
    world = comp("conditioner", "physics_state", hidden=64)
    world.setup(dit())
    train = [synthetic_batch(n=8, frames=8, size=32, seed=s, shapes=2, gravity=1)["state"] for s in range(4)]
    opt = torch.optim.Adam(world.dynamics.parameters(), lr=3e-3)
    for it in range(300):
        loss = world.auxiliary_loss({"state": train[it % 4]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    st = world.parse(synthetic_batch(n=8, frames=8, size=32, seed=99, shapes=2, gravity=1)["state"])
    with torch.no_grad():
        b, t, k, _ = st["pos"].shape
        rep = {key: v.repeat_interleave(t - 1, 0) for key, v in st.items() if key not in ("pos", "vel")}
        pos, _ = world.step(st["pos"][:, :-1].flatten(0, 1), st["vel"][:, :-1].flatten(0, 1), rep)
    true_next = st["pos"][:, 1:].flatten(0, 1)
    learned = (pos - true_next).norm(dim=-1).mean()
    constant = (st["pos"][:, :-1].flatten(0, 1) - true_next).norm(dim=-1).mean()
    assert learned < 0.5 * constant, (float(learned), float(constant))
    # rendered maps from a rollout: one frame of state is enough to condition a whole clip
    maps = world.maps({"state": [s for s in train[0][:2]], "frame_size": (16, 16)}, (2, 6, 3, 16, 16))
    assert maps.shape == (2, 6, 5, 16, 16) and maps[:, :, 0].max() > 0.5


@functools.lru_cache(maxsize=1)
def _world_states() -> tuple[list, list]:
    """States of 512 training and 64 unseen clips of the synthetic world (8 frames, 32 px)."""
    from tcplug.data.synthetic import make_clip

    return ([make_clip(0, i, 8, 32, 2, 0.0, world="simple")["state"] for i in range(512)],
            [make_clip(5, i, 8, 32, 2, 0.0, world="simple")["state"] for i in range(64)])


def _rollout_error(**kw):
    """Mean rollout error (pixels, frames 1..7) of a physics_state trained as the module trains it
    (its dynamics at lr * lr_scale) on the synthetic world, on clips it never saw."""
    torch.manual_seed(0)
    world = comp("conditioner", "physics_state", **kw)
    states, unseen = _world_states()
    opt = torch.optim.AdamW(world.dynamics.parameters(), lr=5e-4 * world.lr_scale)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(states), (8,), generator=g)
        loss = world.auxiliary_loss({"state": [states[i] for i in idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    st = world.parse(unseen)
    with torch.no_grad():
        pos, _ = world.rollout(st, 8)
    return float((pos - st["pos"]).norm(dim=-1)[:, 1:].mean())


def test_physics_state_rollout_stays_on_the_true_trajectory():
    """The maps are rendered from the rollout, so its error is what the denoiser is conditioned
    on. Free flight as the prior, the rollout loss and the dynamics' own learning rate each
    keep it near the truth; without any one of them it drifts further."""
    default = _rollout_error()
    assert default < 1.25, default
    for ablated in ({"prior": False}, {"rollout_loss": False}, {"lr_scale": 1.0}):
        worse = _rollout_error(**ablated)
        assert worse > 1.3 * default, (ablated, worse, default)


def test_lr_scale_puts_a_submodule_in_its_own_parameter_group(batch):
    world = comp("conditioner", "physics_state", lr_scale=4.0)
    m = TCPlugModule(dit(), conditioner=world, lr=1e-3)
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    dyn = {id(p) for p in world.dynamics.parameters()}
    groups = [(g.get("initial_lr", g["lr"]), {id(p) for p in g["params"]}) for g in opt.param_groups]  # before warm-up
    assert [lr for lr, ids in groups if ids == dyn] == [4e-3]
    assert all(not (ids & dyn) for lr, ids in groups if lr == 1e-3)
    assert sum(len(ids) for _, ids in groups) == len([p for p in m.parameters() if p.requires_grad])


# ----- motion locking ----------------------------------------------------------------------
def test_mask_locking_keeps_static_regions_still_and_lets_dynamic_ones_move(batch):
    torch.manual_seed(0)
    m = TCPlugModule(dit(), motion_lock=comp("motion_lock", "mask", source="static"), lock_prob=1.0,
                     num_val_samples=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(5):  # the per-token-timestep training path runs and trains
        loss, terms = m.training_losses(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    video = m.generate(2, 4, 16, 16, steps=5, batch=batch)
    lock = m.diffusion.lock_mask(batch, None, tuple(batch["video"].shape))[:, 0]  # (B, 1, 16, 16), token-aligned
    assert lock.mean() > 0.3
    unit = (video + 1) / 2
    zeros = torch.zeros(2, 3, 2, 16, 16)
    tvs = TemporalVarianceScore(region="static")
    tvs.update(unit, (zeros, zeros), {"static": lock})
    assert float(tvs.compute()) < 0.1  # percent
    dynamic = 1 - batch["static"]
    moving = ((unit[:, 1:] - unit[:, :-1]).abs().mean(2, keepdim=True) * dynamic[:, None]).sum() / (dynamic.sum() * 3)
    assert moving > 0.01
    unlocked = (m.generate(2, 4, 16, 16, steps=5, batch=batch, lock=False) + 1) / 2
    tvs = TemporalVarianceScore(region="static")
    tvs.update(unlocked, (zeros, zeros), {"static": lock})
    assert float(tvs.compute()) > 1.0  # without the lock the same region flickers


def test_locked_tokens_get_the_lock_timestep_in_the_sampler_and_are_not_copied_by_default():
    """The per-token timesteps themselves: after the first step the model sees lock_timestep on
    locked positions and the step's timestep elsewhere; without copy_anchor the locked
    positions are what the loop made of them, not a copy of frame 0."""
    from tcplug.diffusion.lock import LockedSampling
    from tcplug.diffusion.sampling import NoiseSchedule, sample_loop

    schedule = NoiseSchedule("ddpm", "epsilon", 1000, "squaredcos_cap_v2", "ddim", 1.0)
    lock = torch.zeros(1, 1, 1, 8, 8)
    lock[..., :4] = 1  # left half locked
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x) + 0.01 * x.mean(1, keepdim=True)

    noise = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_loop(model, noise, schedule, 5, lock=LockedSampling(lock, timestep=7))
    assert seen[0].dim() == 1  # step 0: one timestep per clip
    for t in seen[1:]:
        assert t.shape == (1, 3, 1, 8, 8)
        assert (t[:, 1:, ..., :4] == 7).all() and (t[:, 0] > 7).all() and (t[:, 1:, ..., 4:] > 7).all()
    copied = sample_loop(model, noise, schedule, 5, lock=LockedSampling(lock, timestep=7, copy_anchor=True))
    assert torch.equal(copied[:, 1:, ..., :4], copied[:, :1, ..., :4].expand(-1, 2, -1, -1, -1))
    assert not torch.equal(out[:, 1:, ..., :4], out[:, :1, ..., :4].expand(-1, 2, -1, -1, -1))


def test_first_frame_mask_sees_no_later_frame(batch):
    locker = comp("motion_lock", "mask")  # default source: first_frame
    assert not locker.oracle and comp("motion_lock", "mask", source="static").oracle
    mask = locker(batch)
    later = dict(batch, depth=batch["depth"].clone())
    later["depth"][:, 1:] = 0.5  # change every later frame: the mask must not notice
    assert torch.equal(locker(later), mask)
    objects0 = batch["depth"][:, 0] < 0.999
    assert (mask[objects0] == 0).all() and mask.mean() > 0.2


def test_auto_lockers_estimate_static_regions(batch):
    shape = tuple(batch["video"].shape)
    world = comp("conditioner", "physics_state")
    m = TCPlugModule(dit(), conditioner=world, motion_lock=comp("motion_lock", "auto", source="conditioning"))
    ctx = m.diffusion.context(batch, shape)
    mask = m.diffusion.motion_lock(batch, ctx)
    assert mask.shape == (2, 1, 16, 16) and 0.2 < mask.mean() < 1
    flow_lock = comp("motion_lock", "auto", source="flow", threshold=0.5, dilate=0)(batch)
    # every pixel the data calls static is locked by the flow estimate too (moving ones may be too)
    assert bool((flow_lock[batch["static"].bool()] == 1).all())
    first = TCPlugModule(dit(), motion_lock=comp("motion_lock", "auto", source="first_pass")).eval()
    calls = []

    def preview():
        calls.append(1)
        return torch.zeros(2, 4, 3, 16, 16)

    assert first.diffusion.motion_lock({}, None, preview).min() == 1 and calls  # nothing moves: everything locked
    assert first.generate(2, 4, 16, 16, steps=2).shape == (2, 4, 3, 16, 16)
    assert comp("motion_lock", "none")(batch) is None


def test_mask_locker_from_a_user_image(tmp_path, batch):
    import numpy as np
    from PIL import Image

    img = np.zeros((32, 32), np.uint8)
    img[:, :16] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    mask = comp("motion_lock", "mask", image=str(tmp_path / "m.png"))(batch)
    assert mask.shape == (2, 1, 16, 16) and mask[..., :8].min() == 1 and mask[..., 8:].max() == 0
    with pytest.raises(Exception, match="does not exist"):
        comp("motion_lock", "mask", image=str(tmp_path / "nope.png"))


# ----- the full recipe: sampling with its conditions -----------------------------------------
@pytest.mark.slow
def test_sample_command_with_conditions(tmp_path, tiny):
    """full.yaml (experts, world model, caption, motion lock) samples from a data clip's
    conditions, or from a caption + a state file + a static-mask image, with guidance."""
    import json

    import numpy as np
    from PIL import Image

    from tcplug.video import read_video
    from tests.conftest import RECIPES, run_tcplug

    # full.yaml locks from the world model's rollout; a static-mask image needs the `mask` locker
    (tmp_path / "lock.yaml").write_text("model:\n  motion_lock:\n    class_path: mask\n    init_args:\n"
                                        "      source: static\n")
    proc = run_tcplug("fit", "--config", RECIPES / "full.yaml", "--config", tmp_path / "lock.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", 6, "--out", tmp_path / "a.mp4", "--clip", 1,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_video(tmp_path / "a.mp4").shape == (6, 16, 16, 3)
    (tmp_path / "state.json").write_text(json.dumps(synthetic_batch(1, 4, 16, seed=3)["state"][0]))
    img = np.zeros((16, 16), np.uint8)
    img[:, :8] = 255
    Image.fromarray(img).save(tmp_path / "static.png")
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", 5, "--out", tmp_path / "b.mp4", "--caption",
                      "a red circle moves", "--state", tmp_path / "state.json", "--static-mask",
                      tmp_path / "static.png", "--guidance", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    video = read_video(tmp_path / "b.mp4").astype(np.float32)
    assert video.shape == (5, 16, 16, 3)
    # the locked left half stays put (up to mp4 compression), the right half moves
    left = np.abs(np.diff(video[:, :, :8], axis=0)).mean()
    right = np.abs(np.diff(video[:, :, 8:], axis=0)).mean()
    assert left < 0.25 * right, (left, right)
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", 5, "--out", tmp_path / "c.mp4", cwd=tmp_path)
    assert proc.returncode == 2 and "physics_state needs --state state.json" in proc.stderr


# ----- the world model without privilege: the state estimated from the first frame -----------------
def _pixel_clips(seed, n, frames=2):
    from tcplug.data.synthetic import make_clip

    cs = [make_clip(seed, i, frames, 32, 2, 0.0, world="simple") for i in range(n)]
    video = torch.stack([torch.from_numpy(c["frames"]).permute(0, 3, 1, 2) for c in cs]).float() / 127.5 - 1
    return {"video": video, "state": [c["state"] for c in cs]}


def _train_estimator(world, clips, steps, batch=16, lr=3e-3):
    """``steps`` Adam steps of ``world``'s estimation loss on random batches of ``clips``."""
    opt = torch.optim.Adam(world.estimator.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, clips["video"].shape[0], (batch,), generator=g).tolist()
        loss = world.estimation_loss({"video": clips["video"][idx], "state": [clips["state"][i] for i in idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_pixel_state_estimates_the_state_from_pixels_and_never_reads_it():
    torch.manual_seed(0)
    world = comp("conditioner", "pixel_state", slots=2, estimator_channels=16, shapes=True)
    world.setup(dit())
    train, unseen = _pixel_clips(0, 96), _pixel_clips(5, 32)
    before, report_before = world.estimate_error(unseen), world.estimate_report(unseen)
    _train_estimator(world, train, 100)
    after, report = world.estimate_error(unseen), world.estimate_report(unseen)
    # pixels, on clips it never saw (at a run's budget, 1200 steps, it falls much further)
    assert after < 0.8 * before, (before, after)
    assert abs(report["position_px"] - after) < 1e-4 and report["colour"] < report_before["colour"], \
        (report_before, report)
    assert set(report) == {"presence_accuracy", "position_px", "velocity_px", "size_px", "depth", "colour",
                           "class_accuracy", "bounced", "velocity_px_straight"} and 0 <= report["class_accuracy"] <= 1
    # a bounce: the first step's displacement is not the velocity (the simulator's state says which)
    bounced = [any(s["position"][1][j][d] - s["position"][0][j][d] != s["velocity"][0][j][d] for d in range(2))
               for s in unseen["state"] for j in range(2)]  # every object has a slot here (2 of 2)
    assert report["bounced"] == pytest.approx(sum(bounced) / len(bounced)) and 0 < sum(bounced) < len(bounced) / 2
    assert "bounced" not in world.estimate_report({"video": unseen["video"], "state": [
        {**s, "position": s["position"][:1], "velocity": s["velocity"][:1]} for s in unseen["state"]]})
    # sampling reads the first frame only: the true state changes nothing, and none is needed
    first = {"first_frames": unseen["video"][:4, :1], "frame_size": (32, 32), "num_frames": 6}
    maps = world.maps(first, (4, 6, 3, 32, 32))
    lying = [{**s, "position": [[[0, 0], [0, 0]]] * 2} for s in unseen["state"][:4]]
    assert torch.equal(maps, world.maps({**first, "state": lying}, (4, 6, 3, 32, 32)))
    assert maps.shape == (4, 6, 5, 32, 32) and maps[:, :, 0].max() > 0.5
    with pytest.raises(tcplug.TcplugError, match="first frame"):
        world.maps({"frame_size": (32, 32)}, (4, 6, 3, 32, 32))


def test_pixel_state_slots_are_distinct_peaks_each_located_at_its_own():
    """The detector's slots are the heat map's strongest peaks, each ``peak_px + 1`` away from the
    stronger ones, and a slot's position is the softmax near its own peak: two objects on one heat
    map give two slots, one on each (a softmax over the whole frame would put both halfway)."""
    from tcplug_conditioners.pixel_state import StateEncoder
    from torch import nn

    class Fixed(nn.Module):  # the heat layer: this map, whatever the frame
        def forward(self, feat):
            return heat.expand(feat.shape[0], -1, -1, -1)

    heat = torch.full((1, 1, 16, 16), -20.0)
    heat[0, 0, 4, 3] = heat[0, 0, 4, 4] = 8.0          # object A: centre between x = 3 and 4, at y = 4
    heat[0, 0, 11, 12] = 7.5                           # object B, a little weaker
    enc = StateEncoder(frames_seen=1, slots=2, classes=4, channels=4, peak_px=3)
    enc.heat = Fixed()
    found = enc.locate(torch.zeros(1, 1, 3, 16, 16))
    pos = found["pos"][0]
    assert torch.allclose(pos[0], torch.tensor([3.5, 4.0]), atol=1e-3), pos
    assert torch.allclose(pos[1], torch.tensor([12.0, 11.0]), atol=1e-3), pos
    assert found["present_logit"][0, 0] > found["present_logit"][0, 1] > 0


def test_pixel_state_measures_the_velocity_from_two_frames():
    """``frames_seen: 2``: the detector finds frame 1's objects too (on the clip played
    backwards), and each slot's velocity is its frame-1 position minus its frame-0 one. After the
    same short training, the objects' velocity is recovered from two frames (median error well
    under half their speed) where one frame can only guess it (about their speed)."""
    train, unseen = _pixel_clips(0, 768, frames=3), _pixel_clips(5, 32, frames=3)
    speed = float(torch.tensor([v for s in unseen["state"] for v in s["velocity"][0]]).float().norm(dim=-1).mean())
    errors = {}
    for seen in (1, 2):
        torch.manual_seed(0)
        world = comp("conditioner", "pixel_state", slots=2, estimator_channels=16, shapes=True, frames_seen=seen)
        world.setup(dit())
        _train_estimator(world, train, 400)
        with torch.no_grad():
            e, st, assign = world._matched(unseen)
            errors[seen] = torch.stack([(e["vel"][i, int(assign[i, j])] - st["vel"][i, 0, j]).norm()
                                        for i, j in (assign >= 0).nonzero().tolist()]).median().item()
        if seen == 2:
            assert torch.allclose(e["vel"], e["pos1"] - e["pos"])
    assert errors[2] < 0.4 * speed < errors[1], (errors, speed)
    with pytest.raises(tcplug.TcplugError, match="needs 2 first frames, got 1 .*--first-frame VIDEO"):
        world.maps({"first_frames": unseen["video"][:2, :1], "frame_size": (32, 32)}, (2, 4, 3, 32, 32))


def test_pixel_state_teacher_forcing_renders_the_true_state_in_training_only():
    """``teacher_prob: 1``: in training every batch's maps are the true state's (as
    ``physics_state`` renders it with the same dynamics); at sampling (eval) the estimate's, whatever
    the batch's state says; ``teacher_prob: 0`` renders the estimate in training too."""
    torch.manual_seed(0)
    world = comp("conditioner", "pixel_state", slots=2, estimator_channels=16, shapes=True, teacher_prob=1.0)
    world.setup(dit())
    batch = _pixel_clips(3, 4, frames=6)
    shape = (4, 6, 3, 32, 32)
    truth = comp("conditioner", "physics_state", shapes=True)
    truth.setup(dit())
    truth.dynamics.load_state_dict(world.dynamics.state_dict())
    with torch.no_grad():
        true_maps = truth.maps(batch, shape)
        world.train()
        assert torch.equal(world.maps(batch, shape), true_maps)
        world.eval()
        sampled = world.maps(batch, shape)
        assert not torch.allclose(sampled, true_maps, atol=1e-2)
        lying = [{**st, "position": [[[0, 0], [0, 0]]] * 2} for st in batch["state"]]
        assert torch.equal(world.maps({**batch, "state": lying}, shape), sampled)
        world.train()
        world.teacher_prob = 0.0
        assert torch.equal(world.maps(batch, shape), sampled)
    with pytest.raises(tcplug.TcplugError, match="teacher_prob"):
        comp("conditioner", "pixel_state", teacher_prob=1.5)


def test_reflecting_dynamics_keep_the_objects_speed_over_a_long_rollout():
    """``physics_state`` ``correction: reflect``: a bounce is a velocity flip (a gate per axis, 0 or
    1 when sampling), so a rollout 16x the 8-frame training trajectories keeps every object's speed
    exactly (it was rounded off at every bounce by the additive correction) and, having learned the
    walls, stays nearer the truth than free flight."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from world_rollout import states, train

    from tcplug.errors import TcplugError

    world = train("reflect", 0, 200, states(0, 128, 8))
    st = world.parse(states(4242, 4, 128))
    with torch.no_grad():
        pos, vel = world.rollout(st, 128)
        free = get_component("conditioner", "physics_state")(shapes=True).rollout(st, 128)[0]
    present = st["present"].bool()
    assert torch.allclose(vel.norm(dim=-1)[:, :, present[0]], st["vel"].norm(dim=-1)[:, :, present[0]])
    err = lambda p: (p - st["pos"]).norm(dim=-1)[:, 64:][:, :, present[0]].mean()  # noqa: E731
    assert err(pos) < 0.5 * err(free), (err(pos), err(free))
    with pytest.raises(TcplugError, match="correction"):
        get_component("conditioner", "physics_state")(correction="reflect", prior=False)
