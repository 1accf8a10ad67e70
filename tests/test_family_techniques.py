"""tcplug's techniques inside real model families (tiny random Wan and LTX-Video on CPU):
attention variants as the models' processors (visibility rule, full3d == the model, streaming ==
all at once), per-token motion locking, conditioner adapters that start as no-ops, temporal losses
through each video VAE, Wan 2.2's two experts routed alike in training and sampling (and the
noise-boundary experts on LTX)."""

import pytest
import torch

import tcplug
from tcplug.diffusion.sampling import NoiseSchedule, frame_noise, sample_loop, stream_sample
from tests.test_attention import ALL, CAUSAL, ident

ONE_BLOCK = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=64, ffn_dim=64, num_layers=1, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
LTX_ONE_BLOCK = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                     cross_attention_dim=16, num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=32)
#: per family: backbone name and config, latent channels, latent side (N = 4 tokens per frame),
#: VAE name and config (LTX's: the tiny folder's, 4x in space and time)
FAMILIES = {
    "wan": dict(backbone="wan", config=ONE_BLOCK, channels=16, side=4, vae="wan_vae", vae_config=WAN_VAE),
    "ltx": dict(backbone="ltx", config=LTX_ONE_BLOCK, channels=8, side=2, vae="ltx_vae", vae_config=None),
}
family_param = pytest.mark.parametrize("family", list(FAMILIES))


def backbone(family="wan", attention=None, layers=1, seed=0):
    f = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = {**f["config"], "num_layers": layers}
    if attention is not None:
        name, kw = attention
        attention = tcplug.get_component("attention", name)(**kw)
    return tcplug.get_component("backbone", f["backbone"])(config=cfg, attention=attention).eval()


def wan(attention=None, layers=1, seed=0):
    return backbone("wan", attention, layers, seed)


def vae(family):
    f = FAMILIES[family]
    if f["vae_config"] is None:
        from tcplug_ltx.tiny import VAE

        return tcplug.get_component("latent", f["vae"])(config=dict(VAE))
    return tcplug.get_component("latent", f["vae"])(config=f["vae_config"])


def latents(t=5, seed=1, family="wan"):
    f = FAMILIES[family]
    return torch.randn(1, t, f["channels"], f["side"], f["side"], generator=torch.Generator().manual_seed(seed))


def per_token(diff, bb):
    """``(B, T, C, h, w)`` -> the largest absolute value per backbone token ``(B, T, N)``."""
    b, t, c, h, w = diff.shape
    p = bb.patch_size
    return diff.abs().view(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, t, -1, c * p * p) \
        .amax(-1)


@family_param
@pytest.mark.parametrize("spec", ALL, ids=[ident(a) for a in ALL])
def test_visibility_rule_holds_inside_the_model(spec, family):
    """One block of the real model with the variant installed: perturbing key frame j changes
    query frame i's output exactly when the variant's rule lets i see j (patch embedding,
    feed-forward and cross-attention are per token, so attention is the only path between
    frames; a frame's own tokens always reach its output through the residual connection)."""
    bb = backbone(family, spec)
    x = latents(family=family)
    t = x.shape[1]
    ts = torch.tensor([400.0])
    with torch.no_grad():
        base = bb(x, ts)
        rule = bb.variants[0].allowed(torch.arange(t)[:, None], torch.arange(t)[None, :])
        for j in range(t):
            y = x.clone()
            y[:, j] += 1.0
            changed = (bb(y, ts) - base).abs().flatten(2).amax(2)[0] > 1e-6  # (T,) query frames
            for i in range(t):
                assert bool(changed[i]) == (bool(rule[i, j]) or i == j), (spec, i, j)


@family_param
def test_full3d_equals_the_unmodified_model(family):
    plain, framed = backbone(family, layers=2), backbone(family, ("full3d", {}), layers=2)
    framed.model.load_state_dict(plain.model.state_dict())
    x, text = latents(family=family), torch.randn(1, 7, 32)
    with torch.no_grad():
        a = plain(x, torch.tensor([700.0]), {"text": text})
        b = framed(x, torch.tensor([700.0]), {"text": text})
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@family_param
def test_a_third_party_variant_works_in_the_model_unchanged(family):
    """Any AttentionVariant (here one defined in the test, not registered by a built-in) runs in
    the model: the processor hands it (B, T', heads, N, D) after the model's projections, norms
    and rotary embedding."""
    from tcplug import AttentionVariant

    class Scaled(AttentionVariant):
        seen = []

        def forward(self, q, k, v, kv_index=None):
            Scaled.seen.append(tuple(q.shape))
            return torch.nn.functional.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1),
                                                                    v.flatten(0, 1)).view_as(q)

    f = FAMILIES[family]
    torch.manual_seed(0)
    bb = tcplug.get_component("backbone", f["backbone"])(config=f["config"], attention=Scaled()).eval()
    x = latents(t=3, family=family)
    with torch.no_grad():
        out = bb(x, torch.tensor([10.0]))
    head_dim = bb.token_dim // 2
    assert out.shape == x.shape and Scaled.seen == [(1, 3, 2, 4, head_dim)]


STREAMING = [s for s in CAUSAL if s != ("temporal", {"causal": True})]  # an unbounded window cannot stream


@family_param
@pytest.mark.parametrize("spec", STREAMING, ids=[ident(a) for a in STREAMING])
def test_streaming_equals_all_at_once_in_the_model(spec, family):
    """Causal variants: sampling 7 latent frames in chunks of 3 with the K/V frame buffer (and
    the chunk's absolute rotary positions) equals sampling them all at once."""
    bb = backbone(family, spec, layers=2)
    assert bb.supports_streaming
    schedule = NoiseSchedule("flow_matching", "flow", shift=3.0)
    f = FAMILIES[family]
    frames, shape = 7, (f["channels"], f["side"], f["side"])
    noise = frame_noise(5, 0, range(frames), shape)[None]
    with torch.no_grad():
        whole = sample_loop(lambda x, t: bb(x, t), noise, schedule, 3)
        streamed = torch.cat(list(stream_sample(lambda x, t, s: bb(x, t, {"stream": s}), shape, frames, 3, schedule,
                                                3, seed=5)), dim=1)
    assert torch.allclose(whole, streamed, atol=1e-4), (whole - streamed).abs().max()


@family_param
@pytest.mark.parametrize("context", ["same_step", "clean"])
def test_a_rolling_sink_keeps_its_distance_to_the_window(family, context):
    """``cross_frame`` window 1 + sink 1 streamed one latent frame a chunk, the same latents every
    chunk: with ``sink_positions: rolling`` the sink's keys sit just before the window, so once the
    buffer is full every chunk's output is the same (rotary positions are relative); with
    ``absolute`` the sink moves ever farther and the output changes from chunk to chunk. While the
    sink is still next to the window the two are one. Both buffers (the clean cache here records
    every pass, as its commit pass does)."""
    from tcplug.diffusion.sampling import make_stream

    x, ts = latents(t=1, family=family), torch.tensor([500.0])
    outs = {}
    for mode in ("rolling", "absolute"):
        bb = backbone(family, ("cross_frame", {"window": 1, "sink": 1, "sink_positions": mode}), layers=2)
        stream, outs[mode] = make_stream(context), []
        stream.writing = True
        with torch.no_grad():
            for f in range(12):
                stream.frame_start = f
                outs[mode].append(bb(x, ts, {"stream": stream}))
    roll, fixed = outs["rolling"], outs["absolute"]
    moved = max(float((roll[f] - roll[3]).abs().max()) for f in range(4, 12))  # float noise of the rotations
    away = float((fixed[11] - fixed[3]).abs().max())  # LTX's rotary turns slowly in time: small, but 60x
    assert moved < 1e-4 and away > 20 * max(moved, 1e-5), (moved, away)
    assert all(torch.allclose(roll[f], fixed[f], atol=1e-6) for f in range(3))


@family_param
def test_gradient_checkpointing_recomputes_with_the_forwards_frame_positions_and_text_mask(family):
    """A checkpointed block recomputes its forward in backward, after the backbone's forward has
    returned: the frame positions (``frame_index``, keyframe training) and a per-frame text mask
    (per-shot captions) must still be the forward's then. Gradients with checkpointing equal those
    without (they raised, or could silently differ, when the processors forgot them)."""
    f = FAMILIES[family]
    text_dim = f["config"].get("text_dim") or f["config"]["caption_channels"]
    g = torch.Generator().manual_seed(3)
    see = torch.tensor([[True] * 3 + [False] * 3, [True] * 3 + [False] * 3, [True] * 6])
    ctx = {"frame_index": [0, 4, 8], "text": torch.randn(1, 6, text_dim, generator=g), "text_mask": see[None]}

    def grads(checkpointing):
        torch.manual_seed(0)
        bb = tcplug.get_component("backbone", f["backbone"])(
            config={**f["config"], "num_layers": 2}, gradient_checkpointing=checkpointing,
            attention=tcplug.get_component("attention", "cross_frame")(window=1)).train()
        bb(latents(t=3, family=family), torch.tensor([500.0]), dict(ctx)).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in bb.parameters() if p.grad is not None])

    plain, checkpointed = grads(False), grads(True)
    assert torch.allclose(plain, checkpointed, atol=1e-6), (plain - checkpointed).abs().max()


@family_param
def test_non_causal_variant_does_not_stream(family):
    assert not backbone(family, ("full3d", {})).supports_streaming and not backbone(family).supports_streaming


@family_param
def test_locked_tokens_keep_their_timestep(family):
    """Per-token timesteps reach the model's blocks: a token's output depends on its own timestep
    (a locked token given t=0 differs from the same token at the free tokens' t), and giving every
    token the clip's timestep equals per-clip timesteps."""
    bb = backbone(family, layers=2)
    x = latents(t=3, family=family)
    n = 4
    free = torch.full((1, 3, n), 600.0)
    locked = free.clone()
    locked[0, 1:, :2] = 0.0  # two tokens of frames 1, 2 locked
    with torch.no_grad():
        a, b = bb(x, free), bb(x, locked)
        c = bb(x, torch.tensor([600.0]))
    assert torch.allclose(a, c, atol=1e-5)
    tokens = per_token(a - b, bb)
    assert tokens[0, 1:, :2].min() > 1e-4  # the locked tokens' own outputs changed


@family_param
def test_motion_lock_trains_and_samples(family, tmp_path):
    """The module's motion lock (mask at latent resolution, whole tokens, latent-frame
    granularity) in a training step and in sampling: locked tokens follow the anchor frame."""
    from tcplug.module import TCPlugModule

    torch.manual_seed(0)
    latent = vae(family)
    m = TCPlugModule(backbone=backbone(family, layers=1), latent=latent,
                     motion_lock=tcplug.get_component("motion_lock", "mask")(source="static"), lock_prob=1.0,
                     noise="flow_matching", prediction_type="flow")
    video = torch.rand(2, 9, 3, 32, 32) * 2 - 1
    static = torch.zeros(2, 1, 32, 32)
    static[:, :, :16] = 1  # top half static
    batch = {"video": video, "static": static}
    m.train()
    total, _ = m.training_losses(batch)
    total.backward()
    side = 32 // latent.downsample
    half = side // 2
    assert m._last_timesteps.shape == (2, 3, 1, side, side)
    assert (m._last_timesteps[:, 1:, :, :half] == 0).all() and (m._last_timesteps[:, 0] > 0).all()
    m.eval()
    lock = m.diffusion.lock_mask(batch, None, (2, 3, latent.latent_channels, side, side))
    assert lock.shape == (2, 1, 1, side, side) and lock[:, :, :, :half].eq(1).all() and lock[:, :, :, half:].eq(0).all()


@family_param
def test_conditioner_adapters_leave_the_model_unchanged_at_initialisation(family):
    """depth / skeleton / physics_state add zero-initialised residuals to the model's blocks: at
    initialisation the output equals the plain model's; a non-zero residual changes it."""
    from tcplug.module import TCPlugModule
    from tests.helpers import synthetic_batch

    torch.manual_seed(0)
    batch = synthetic_batch(n=1, frames=9, size=32)
    latent = vae(family)
    side = 32 // latent.downsample
    x = torch.randn(1, 3, latent.latent_channels, side, side)
    ts = torch.tensor([500.0])
    for name in ("depth", "skeleton", "physics_state"):
        bb = backbone(family, layers=2)
        cond = tcplug.get_component("conditioner", name)()
        m = TCPlugModule(backbone=bb, latent=latent, conditioner=cond, noise="flow_matching",
                         prediction_type="flow").eval()
        with torch.no_grad():
            ctx = m.diffusion.context(batch, tuple(x.shape))
            assert len(ctx["residuals"]) == 2
            plain = bb(x, ts)
            assert torch.equal(bb(x, ts, ctx), plain), name
            moved = bb(x, ts, {"residuals": [r + 0.5 * torch.randn_like(r) for r in ctx["residuals"]]})
        assert (moved - plain).abs().max() > 1e-4, name


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    from tcplug_wan.tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("wan22") / "tiny-wan22", two_experts=True)


def test_wan22_experts_route_alike_in_training_and_sampling_and_export(wan22_dir, tmp_path):
    """Wan 2.2's two experts as tcplug's noise_boundary router: expert 0 is the folder's
    transformer/ (high noise), expert 1 its transformer_2/; the boundary 0.875 x 1000 in the same
    timestep space routes training batches and sampler steps alike; with a LoRA per expert, the
    exported adapters loaded into WanPipeline (transformer and transformer_2) reproduce tcplug's
    sample."""
    from diffusers import WanPipeline

    from tcplug.lora import LoraSpec, export_lora
    from tcplug.module import TCPlugModule

    d = str(wan22_dir)
    get = tcplug.get_component
    model = TCPlugModule(
        backbone=[get("backbone", "wan")(pretrained=d), get("backbone", "wan")(pretrained=d, subfolder="transformer_2")],
        router=get("router", "noise_boundary")(num_experts=2, boundary_ratio=0.875),
        latent=get("latent", "wan_vae")(pretrained=d),
        conditioner=get("conditioner", "wan_text")(pretrained=d, max_length=16, dropout=0.0),
        lora=LoraSpec(rank=2, init=False), noise="flow_matching", prediction_type="flow", shift=3.0,
        scheduler=d + "/scheduler", guidance_scale=2.0).eval()
    # training: each clip goes to the expert its timestep names (t >= 875 -> expert 0)
    x = torch.randn(3, 3, 16, 4, 4)
    t = torch.tensor([990.0, 875.0, 874.0])
    ctx = {"text": torch.randn(3, 16, 32)}
    with torch.no_grad():
        mixed = model.diffusion.denoise(x, t, ctx)
        e0 = model.diffusion.experts[0](x, t, ctx)
        e1 = model.diffusion.experts[1](x, t, ctx)
    assert torch.allclose(mixed[:2], e0[:2], atol=1e-5) and torch.allclose(mixed[2:], e1[2:], atol=1e-5)
    assert not torch.allclose(e0, e1)  # two different models, not copies
    # sampling: the same routing as WanPipeline's boundary, with both experts' LoRA exported
    for i, expert in enumerate(model.diffusion.experts):
        export_lora(expert, str(tmp_path / f"expert_{i}"))
    pipe = WanPipeline.from_pretrained(d, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "expert_0"))
    pipe.load_lora_weights(str(tmp_path / "expert_1"), load_into_transformer_2=True)
    prompts = ["a red square moves left"]
    lat = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ref = pipe(prompt=prompts, latents=lat.clone(), num_inference_steps=6, guidance_scale=2.0, height=32, width=32,
               num_frames=9, output_type="pt", max_sequence_length=16).frames
    ours = (model.generate(1, 9, 32, 32, steps=6, batch={"txt": prompts}, latents=lat.permute(0, 2, 1, 3, 4)) + 1) / 2
    assert (ref - ours.clamp(0, 1)).abs().max() < 1e-4
    assert model.diffusion.sampler_expert_steps[0] > 0 and model.diffusion.sampler_expert_steps[1] > 0


def test_train_one_expert_only():
    from tcplug.module import TCPlugModule

    get = tcplug.get_component
    m = TCPlugModule(backbone=[wan(), wan(seed=1)], router=get("router", "noise_boundary")(num_experts=2),
                     latent=vae("wan"),
                     train_experts=[1], noise="flow_matching", prediction_type="flow")
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in m.diffusion.experts[0].parameters())
    assert all(id(p) in in_opt for p in m.diffusion.experts[1].parameters())


@pytest.mark.slow
def test_wan_full_recipe_stacks_every_technique_on_cpu(tmp_path):
    """recipes/wan/full.yaml on a tiny Wan folder: cross-frame attention in Wan, two experts, world
    model residuals + Wan's text encoder, motion lock, flow-warp / feature / adversarial losses
    through the VAE; trains and validates on CPU with every loss term logged."""
    import json

    from tcplug_wan.tiny import make_tiny_folder

    from tests.conftest import RECIPES, ROOT, run_tcplug

    folder = make_tiny_folder(tmp_path / "tiny-wan")
    proc = run_tcplug("fit", "--config", RECIPES / "wan" / "full.yaml", "--trainer.max_steps=22",
                      "--trainer.val_check_interval=22", "--trainer.enable_progress_bar=false", cwd=tmp_path,
                      env={"PYTHONPATH": str(ROOT), "WAN_MODEL_DIR": str(folder)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())["metrics"]
    for key in ("train/loss_denoise", "train/loss_flow_warp", "train/loss_perceptual_temporal",
                "train/loss_adversarial", "train/loss_dynamics", "val/tvs", "val/motion_ratio", "val/expert_steps_0"):
        assert key in metrics, key


@pytest.mark.parametrize("term", [("flow_warp", {"space": "latent"}), ("flow_warp", {"space": "pixel", "max_clips": 1}),
                                  ("perceptual_temporal", {"features": "latent_encoder"}),
                                  ("perceptual_temporal", {"features": "random_trunk", "max_clips": 1})],
                         ids=["flow_warp-latent", "flow_warp-pixel-1clip", "perceptual-latent-encoder",
                              "perceptual-trunk-1clip"])
@family_param
def test_temporal_losses_through_a_time_compressing_vae(term, family):
    """Both routes of the temporal losses on Wan and LTX: the decoded prediction (a subset of clips), or
    latents / VAE features at the latent frame rate with flows pooled over each latent frame's
    span; finite, and they send gradient into the backbone."""
    from tcplug.module import TCPlugModule
    from tests.helpers import synthetic_batch

    get = tcplug.get_component
    name, kw = term
    m = TCPlugModule(backbone=backbone(family, layers=1), latent=vae(family),
                     losses=[get("loss", "denoise")(weight=0.0), get("loss", name)(weighting="none", **kw)],
                     noise="flow_matching", prediction_type="flow").train()
    total, terms = m.training_losses(synthetic_batch(n=2, frames=9, size=32))
    assert torch.isfinite(terms[name]) and terms[name] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


@family_param
def test_frame_index_gives_a_subset_of_frames_its_absolute_positions(family):
    """``context["frame_index"]``: latents holding frames 0, 4, 8 of a video are attended as those
    frames. The variant's rule reads them (``cross_frame`` window 1 then sees no other frame: the
    same output as ``per_frame``) and so does the model's rotary embedding (``full3d``: a shift
    of every frame changes nothing, since rotary positions are relative; other gaps do)."""
    x = latents(t=3, family=family)
    ts = torch.tensor([500.0])
    gapped = {"frame_index": [0, 4, 8]}
    window = backbone(family, ("cross_frame", {"window": 1}), layers=2)
    alone = backbone(family, ("per_frame", {}), layers=2)
    full = backbone(family, ("full3d", {}), layers=2)
    with torch.no_grad():
        assert torch.allclose(window(x, ts, gapped), alone(x, ts), atol=1e-5)
        assert not torch.allclose(window(x, ts), alone(x, ts), atol=1e-4)
        plain = full(x, ts)
        assert torch.allclose(full(x, ts, {"frame_index": [5, 6, 7]}), plain, atol=1e-4)
        assert not torch.allclose(full(x, ts, gapped), plain, atol=1e-4)
