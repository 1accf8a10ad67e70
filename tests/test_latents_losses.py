"""Latent designs, temporal loss terms, the 3D discriminator and adversarial training."""

import pytest
import torch

import tcplug
from tcplug import LossContext
from tcplug.data import make_clip
from tcplug.diffusion.sampling import NoiseSchedule
from tcplug.module import TCPlugModule


def comp(kind, name, **kw):
    return tcplug.get_component(kind, name)(**kw)


def clip_batch(seed=0, size=32, frames=6):
    c = make_clip(seed, 1, frames=frames, size=size, num_shapes=3, max_speed=2)
    video = torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    return {"video": video, "flow": torch.from_numpy(c["flow"]).permute(0, 3, 1, 2)[None],
            "occ": torch.from_numpy(c["occ"]).float()[:, None][None]}


def ctx_for(video, batch, latent=None, t=0):
    """A LossContext whose predicted clean clip is exactly `video` (x0 parameterization)."""
    latent = latent or comp("latent", "pixel")
    s = NoiseSchedule("ddpm", "sample")
    x0 = latent.encode(video)
    tt = torch.full((video.shape[0],), t)
    return LossContext(batch=batch, x0=x0, noise=torch.zeros_like(x0), xt=x0, timesteps=tt, pred=x0, target=x0,
                       schedule=s, latent=latent)


def test_flow_warp_zero_on_exact_flow_and_grows_with_flicker():
    batch = clip_batch()
    term = comp("loss", "flow_warp", weighting="none")
    assert float(term(ctx_for(batch["video"], batch))) < 1e-10
    values = []
    for a in (0.05, 0.1, 0.2):
        flick = batch["video"].clone()
        flick[:, 1::2] += a
        values.append(float(term(ctx_for(flick, batch))))
    assert values[0] > 1e-4 and values[0] < values[1] < values[2]
    assert values[1] == pytest.approx(0.01, rel=0.05)  # squared offset a^2 on every pair


def test_flow_warp_ignores_occluded_pixels():
    batch = clip_batch()
    term = comp("loss", "flow_warp", weighting="none")
    bad = batch["video"].clone()
    bad[:, 1:, :, 4:12, 4:12] = 1.0  # garbage appears in frame 1 ...
    # ... and every frame-0 pixel whose flow lands near it is marked occluded
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    tx, ty = xs + batch["flow"][0, 0, 0], ys + batch["flow"][0, 0, 1]
    hit = (tx > 2) & (tx < 13) & (ty > 2) & (ty < 13)
    occ = batch["occ"].clone()
    occ[0, 0, 0][hit] = 1
    masked = float(term(ctx_for(bad[:, :2], {**batch, "flow": batch["flow"][:, :1], "occ": occ[:, :1]})))
    unmasked = float(term(ctx_for(bad[:, :2], {**batch, "flow": batch["flow"][:, :1], "occ": batch["occ"][:, :1]})))
    assert masked < 1e-8 < unmasked


def test_flow_warp_in_latent_space_resizes_flow():
    batch = clip_batch(size=32)
    latent = comp("latent", "vae", block_out_channels=[16, 16], norm_num_groups=8)
    term = comp("loss", "flow_warp", space="latent", weighting="none")
    static = batch["video"][:, :1].repeat(1, 6, 1, 1, 1)
    zero_flow = dict(batch, flow=torch.zeros_like(batch["flow"]), occ=torch.zeros_like(batch["occ"]))
    assert float(term(ctx_for(static, zero_flow, latent))) < 1e-8


def test_flow_warp_needs_flow():
    batch = {"video": torch.zeros(1, 3, 3, 8, 8)}
    with pytest.raises(tcplug.TcplugError, match="needs forward flow"):
        comp("loss", "flow_warp")(ctx_for(batch["video"], batch))


def test_perceptual_temporal_feature_sources(tmp_path):
    batch = clip_batch()
    for kw, disc in ((dict(features="latent_encoder"), None),
                     (dict(features="discriminator"), comp("discriminator", "conv3d", channels=8)),
                     (dict(features="random_trunk"), None)):
        term = comp("loss", "perceptual_temporal", weighting="none", **kw)
        c = ctx_for(batch["video"], batch)
        c.discriminator = disc
        exact = float(term(c))
        flick = batch["video"].clone()
        flick[:, 1::2] += 0.2
        c2 = ctx_for(flick, batch)
        c2.discriminator = disc
        assert float(term(c2)) > exact
    trunk = comp("loss", "perceptual_temporal", features="random_trunk")
    assert not any(p.requires_grad for p in trunk.parameters())  # fixed random features, named as such
    again = comp("loss", "perceptual_temporal", features="random_trunk")
    assert all(torch.equal(a, b) for a, b in zip(trunk.parameters(), again.parameters()))  # seeded
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2)))
    path = tmp_path / "feat.pt"
    torch.jit.save(net, str(path))
    term = comp("loss", "perceptual_temporal", features="path", network_path=str(path), weighting="none")
    assert float(term(ctx_for(batch["video"], batch))) < 1e-2
    with pytest.raises(tcplug.TcplugError, match="cannot load"):
        comp("loss", "perceptual_temporal", features="path", network_path=str(tmp_path / "missing.pt"))


def dit(channels=3, depth=1):
    return comp("backbone", "dit", in_channels=channels, patch_size=2, dim=32, depth=depth, heads=2)


@pytest.mark.parametrize("terms", [["flow_warp"], ["perceptual_temporal"], ["adversarial"]])
def test_gradients_reach_the_backbone_through_every_term(terms):
    torch.manual_seed(0)
    kw = {"weight": 1.0} if terms != ["adversarial"] else {"weight": 1.0, "clip_frames": 3}
    losses = [comp("loss", terms[0], **kw)]
    disc = comp("discriminator", "conv3d", channels=8) if terms == ["adversarial"] else None
    m = TCPlugModule(backbone=dit(), losses=losses, discriminator=disc, prediction_type="sample")
    for p in m.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = clip_batch(size=16, frames=4)
    total, parts = m.training_losses(batch)
    grads = torch.autograd.grad(parts[terms[0]], [p for p in m.backbone.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_two_tier_shares_one_global_code():
    torch.manual_seed(0)
    lat = comp("latent", "two_tier", global_channels=2, frame_channels=3)
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    z = lat.encode(video)
    assert z.shape == (2, 5, 5, 8, 8)
    assert torch.allclose(z[:, :, :2], z[:, :1, :2].expand(-1, 5, -1, -1, -1))  # global: same in every frame
    out = lat.decode(z)
    z2 = z.clone()
    z2[:, 3, 2:] += 1.0  # change frame 3's per-frame code
    out2 = lat.decode(z2)
    others = [0, 1, 2, 4]
    assert torch.allclose(out[:, others], out2[:, others], atol=1e-6) and not torch.allclose(out[:, 3], out2[:, 3])
    z3 = z.clone()
    z3[:, 1, :2] += 1.0  # a different global code in one frame is averaged: every frame changes alike
    assert not torch.allclose(lat.decode(z3)[:, 0], out[:, 0])
    # codes standardised: unit variance per frame whatever the encoder's scale
    assert float(z[:, :, 2:].std()) == pytest.approx(1.0, abs=0.05)
    raw = comp("latent", "two_tier", global_channels=2, frame_channels=3, normalize=False).encode(video * 0.1)
    assert abs(float(raw[:, :, 2:].std()) - 1) > 0.3


def test_pixel_latent_scale_round_trips():
    lat = comp("latent", "pixel", scale=3.0, shift=-0.2)
    video = torch.rand(1, 2, 3, 8, 8) * 2 - 1
    assert torch.allclose(lat.encode(video), (video + 0.2) * 3) and torch.allclose(lat.decode(lat.encode(video)), video)


def test_video_ldm_encoder_is_per_frame_and_decoder_temporal():
    torch.manual_seed(0)
    lat = comp("latent", "video_ldm", block_out_channels=[32, 64])
    video = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    z = lat.encode(video)
    alone = torch.cat([lat.encode(video[:, i: i + 1]) for i in range(4)], dim=1)
    assert torch.allclose(z, alone, atol=1e-5)
    assert lat.decode(z).shape == video.shape
    assert not any(p.requires_grad for p in lat.vae.encoder.parameters())
    trainable = comp("latent", "video_ldm", block_out_channels=[32, 64], train_decoder=True)
    assert any(p.requires_grad for p in trainable.vae.decoder.parameters())
    assert not any(p.requires_grad for p in trainable.vae.encoder.parameters())


def test_video_ldm_decoder_mixes_neighbouring_frames():
    """The temporal layers of the decoder: a frame's decoded pixels depend on its neighbours'
    latents (a per-frame decoder would leave them untouched)."""
    torch.manual_seed(0)
    lat = comp("latent", "video_ldm", block_out_channels=[32, 64], scaling_factor=1.0)
    z = torch.randn(1, 5, lat.latent_channels, 8, 8)
    out = lat.decode(z)
    z2 = z.clone()
    z2[:, 2] += 1.0
    out2 = lat.decode(z2)
    assert not torch.allclose(out[:, 1], out2[:, 1], atol=1e-6) and not torch.allclose(out[:, 3], out2[:, 3], atol=1e-6)


def test_video_ldm_scale_from_data_gives_unit_latents():
    torch.manual_seed(0)
    lat = comp("latent", "video_ldm", block_out_channels=[32, 64], scaling_factor="data")
    video = torch.rand(4, 4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw_std = float(lat.vae.encode(video.flatten(0, 1)).latent_dist.mode().std())
        z = lat.encode(video)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3) and abs(raw_std - 1) > 0.2
    assert "data_scale" in lat.state_dict() and float(lat.data_scale) > 0  # kept in the checkpoint
    again = lat.encode(video[:2] * 0.1)  # measured once, then fixed
    assert float(lat.data_scale) == pytest.approx(1 / raw_std, rel=1e-3) and again.shape[0] == 2


def test_discriminator_judges_frame_order():
    """The 3D kernels see motion: the same frames in another order get other logits (a
    per-frame discriminator would give the same logits, permuted, and the same mean)."""
    torch.manual_seed(0)
    d = comp("discriminator", "conv3d", channels=8)
    video = torch.rand(2, 6, 3, 16, 16) * 2 - 1
    shuffled = video[:, torch.tensor([3, 0, 5, 1, 4, 2])]
    assert abs(float(d(video).mean() - d(shuffled).mean())) > 1e-4


def test_vae_from_a_local_folder_only(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[16, 32], latent_channels=4, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2
                  ).save_pretrained(tmp_path / "vae")
    lat = comp("latent", "vae", pretrained=str(tmp_path / "vae"))
    assert lat.latent_channels == 4 and lat.downsample == 2
    with pytest.raises(tcplug.TcplugError, match="not a local folder"):
        comp("latent", "vae", pretrained="some-org/some-hub-model")


def test_discriminator_and_generator_alternate_with_own_optimizers(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    disc = comp("discriminator", "conv3d", channels=8)
    m = TCPlugModule(backbone=dit(), discriminator=disc, disc_lr=1e-3, num_val_samples=0,
                     losses=[comp("loss", "denoise"), comp("loss", "adversarial", clip_frames=3, start_step=2)])
    assert not m.automatic_optimization
    batches = [clip_batch(seed=i, size=16, frames=4) for i in range(6)]
    batches = [{k: v[0] for k, v in b.items()} for b in batches]
    g0 = [p.detach().clone() for p in m.backbone.parameters()]
    d0 = [p.detach().clone() for p in disc.parameters()]
    seen, steps = [], []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            seen.append([p.detach().clone() for p in disc.parameters()])
            steps.append(trainer.global_step)

    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Spy()], default_root_dir=tmp_path)
    trainer.fit(m, DataLoader(batches, batch_size=1))
    opt_g, opt_d = m.optimizers()
    assert opt_g.optimizer.param_groups[0]["lr"] == m.lr and opt_d.optimizer.param_groups[0]["lr"] == 1e-3
    assert not any(id(p) in {id(q) for q in disc.parameters()} for p in opt_g.optimizer.param_groups[0]["params"])
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.backbone.parameters()))
    # warm-up: the discriminator does not move before start_step, then it does
    assert all(torch.equal(a, b) for a, b in zip(d0, seen[0]))
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], seen[-1]))
    assert "train/loss_discriminator" in trainer.callback_metrics and "train/loss_adversarial" in trainer.callback_metrics
    # global_step counts generator steps (one per batch), also once the discriminator trains:
    # max_steps=4 buys 4 generator steps, as in a recipe without a discriminator
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_pretrained_vae_by_path_in_a_recipe(tmp_path, tiny):
    """A VAE saved with save_pretrained loads by path in a recipe; the hub is never asked."""
    from diffusers import AutoencoderKL

    from tests.conftest import RECIPES, run_tcplug

    AutoencoderKL(block_out_channels=[16, 32], latent_channels=4, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2
                  ).save_pretrained(tmp_path / "my-vae")
    proc = run_tcplug("fit", "--config", RECIPES / "baseline.yaml", *tiny, "--model.latent=vae",
                      f"--model.latent.init_args.pretrained={tmp_path / 'my-vae'}",
                      "--model.backbone.init_args.in_channels=4", "--model.backbone.init_args.patch_size=2",
                      cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "tcplug_latents.VAE" in cfg and "my-vae" in cfg


def test_two_tier_global_code_is_carried_across_streamed_chunks():
    torch.manual_seed(0)
    lat = comp("latent", "two_tier", global_channels=2, frame_channels=2)
    a, b = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 4, 8, 8)
    state = {}
    first = lat.decode_stream(a, state)
    second = lat.decode_stream(b, state)
    assert torch.allclose(first, lat.decode(a))
    b_with_a_code = b.clone()
    b_with_a_code[:, :, :2] = a[:, :, :2].mean(1, keepdim=True)
    assert torch.allclose(second, lat.decode(b_with_a_code), atol=1e-6)  # chunk 2 decoded with chunk 1's code
    assert not torch.allclose(second, lat.decode(b))
    # and the module's streaming path uses it
    m = TCPlugModule(backbone=dit(channels=4), latent=lat, sample_steps=2).eval()
    chunks = list(m.stream(8, 16, 16, 4, seed=0))
    assert len(chunks) == 2 and chunks[1].shape == (1, 4, 3, 16, 16)
