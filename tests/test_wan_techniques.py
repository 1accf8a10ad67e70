"""tcplug's techniques inside a real model family (tiny random Wan on CPU): attention variants as
Wan processors (visibility rule, full3d == Wan, streaming == all at once), per-token motion locking,
conditioner adapters that start as no-ops, Wan 2.2's two experts routed alike in training and
sampling."""

import pytest
import torch

import tcplug
from tcplug.sampling import NoiseSchedule, frame_noise, sample_loop, stream_sample
from tests.test_attention import ALL, CAUSAL, ident

ONE_BLOCK = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=64, ffn_dim=64, num_layers=1, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan(attention=None, layers=1, seed=0):
    torch.manual_seed(seed)
    cfg = {**ONE_BLOCK, "num_layers": layers}
    if attention is not None:
        name, kw = attention
        attention = tcplug.get_component("attention", name)(**kw)
    return tcplug.get_component("backbone", "wan")(config=cfg, attention=attention).eval()


def latents(t=5, seed=1):
    return torch.randn(1, t, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ALL, ids=[ident(a) for a in ALL])
def test_visibility_rule_holds_inside_wan(spec):
    """One Wan block with the variant installed: perturbing key frame j changes query frame i's
    output exactly when the variant's rule lets i see j (patch embedding, feed-forward and
    cross-attention are per token, so attention is the only path between frames; a frame's own
    tokens always reach its output through the residual connection)."""
    bb = wan(spec)
    x = latents()
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


def test_full3d_equals_the_unmodified_model():
    plain, framed = wan(layers=2), wan(("full3d", {}), layers=2)
    framed.model.load_state_dict(plain.model.state_dict())
    x, text = latents(), torch.randn(1, 7, 32)
    with torch.no_grad():
        a = plain(x, torch.tensor([700.0]), {"text": text})
        b = framed(x, torch.tensor([700.0]), {"text": text})
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_third_party_variant_works_in_wan_unchanged():
    """Any AttentionVariant (here one defined in the test, not registered by a built-in) runs in
    Wan: the processor hands it (B, T', heads, N, D) after Wan's projections, norms and rotary."""
    from tcplug import AttentionVariant

    class Scaled(AttentionVariant):
        seen = []

        def forward(self, q, k, v, kv_index=None):
            Scaled.seen.append(tuple(q.shape))
            return torch.nn.functional.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1),
                                                                    v.flatten(0, 1)).view_as(q)

    torch.manual_seed(0)
    bb = tcplug.get_component("backbone", "wan")(config=ONE_BLOCK, attention=Scaled()).eval()
    with torch.no_grad():
        out = bb(latents(t=3), torch.tensor([10.0]))
    assert out.shape == (1, 3, 16, 4, 4) and Scaled.seen == [(1, 3, 2, 4, 16)]


STREAMING = [s for s in CAUSAL if s != ("temporal", {"causal": True})]  # an unbounded window cannot stream


@pytest.mark.parametrize("spec", STREAMING, ids=[ident(a) for a in STREAMING])
def test_streaming_equals_all_at_once_in_wan(spec):
    """Causal variants: sampling 7 latent frames in chunks of 3 with the K/V frame buffer (and
    the chunk's absolute rotary positions) equals sampling them all at once."""
    bb = wan(spec, layers=2)
    assert bb.supports_streaming
    schedule = NoiseSchedule("flow_matching", "flow", shift=3.0)
    frames, shape = 7, (16, 4, 4)
    noise = frame_noise(5, 0, range(frames), shape)[None]
    with torch.no_grad():
        whole = sample_loop(lambda x, t: bb(x, t), noise, schedule, 3)
        streamed = torch.cat(list(stream_sample(lambda x, t, s: bb(x, t, {"stream": s}), shape, frames, 3, schedule,
                                                3, seed=5)), dim=1)
    assert torch.allclose(whole, streamed, atol=1e-4), (whole - streamed).abs().max()


def test_non_causal_variant_does_not_stream_in_wan():
    assert not wan(("full3d", {})).supports_streaming and not wan().supports_streaming


def test_locked_tokens_keep_their_timestep_in_wan():
    """Per-token timesteps reach Wan's blocks: a token's output depends on its own timestep (a
    locked token given t=0 differs from the same token at the free tokens' t), and giving every
    token the clip's timestep equals per-clip timesteps."""
    bb = wan(layers=2)
    x = latents(t=3)
    n = 4
    free = torch.full((1, 3, n), 600.0)
    locked = free.clone()
    locked[0, 1:, :2] = 0.0  # two tokens of frames 1, 2 locked
    with torch.no_grad():
        a, b = bb(x, free), bb(x, locked)
        c = bb(x, torch.tensor([600.0]))
    assert torch.allclose(a, c, atol=1e-5)
    tokens = (a - b).abs().view(1, 3, 16, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(1, 3, 4, -1).amax(-1)
    assert tokens[0, 1:, :2].min() > 1e-4  # the locked tokens' own outputs changed


def test_motion_lock_trains_and_samples_with_wan(tmp_path):
    """The module's motion lock (mask at latent resolution, whole Wan tokens, latent-frame
    granularity) in a training step and in sampling: locked tokens follow the anchor frame."""
    from tcplug.module import TCPlugModule

    torch.manual_seed(0)
    vae_cfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    m = TCPlugModule(backbone=wan(layers=1), latent=tcplug.get_component("latent", "wan_vae")(config=vae_cfg),
                     motion_lock=tcplug.get_component("motion_lock", "mask")(source="static"), lock_prob=1.0,
                     noise="flow_matching", prediction_type="flow")
    video = torch.rand(2, 9, 3, 32, 32) * 2 - 1
    static = torch.zeros(2, 1, 32, 32)
    static[:, :, :16] = 1  # top half static
    batch = {"video": video, "static": static}
    m.train()
    total, _ = m.training_losses(batch)
    total.backward()
    assert m._last_timesteps.shape == (2, 3, 1, 4, 4)
    assert (m._last_timesteps[:, 1:, :, :2] == 0).all() and (m._last_timesteps[:, 0] > 0).all()
    m.eval()
    lock = m.lock_mask(batch, None, (2, 3, 16, 4, 4))
    assert lock.shape == (2, 1, 1, 4, 4) and lock[:, :, :, :2].eq(1).all() and lock[:, :, :, 2:].eq(0).all()


def test_conditioner_adapters_leave_wan_unchanged_at_initialisation():
    """depth / skeleton / physics_state add zero-initialised residuals to Wan's blocks: at
    initialisation the output equals the plain model's; a non-zero residual changes it."""
    from tcplug.module import TCPlugModule
    from tests.helpers import synthetic_batch

    torch.manual_seed(0)
    vae_cfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    batch = synthetic_batch(n=1, frames=9, size=32)
    x = latents(t=3)
    ts = torch.tensor([500.0])
    for name in ("depth", "skeleton", "physics_state"):
        bb = wan(layers=2)
        cond = tcplug.get_component("conditioner", name)()
        m = TCPlugModule(backbone=bb, latent=tcplug.get_component("latent", "wan_vae")(config=vae_cfg),
                         conditioner=cond, noise="flow_matching", prediction_type="flow").eval()
        with torch.no_grad():
            ctx = m.context(batch, tuple(x.shape))
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
        mixed = model.denoise(x, t, ctx)
        e0 = model.experts[0](x, t, ctx)
        e1 = model.experts[1](x, t, ctx)
    assert torch.allclose(mixed[:2], e0[:2], atol=1e-5) and torch.allclose(mixed[2:], e1[2:], atol=1e-5)
    assert not torch.allclose(e0, e1)  # two different models, not copies
    # sampling: the same routing as WanPipeline's boundary, with both experts' LoRA exported
    for i, expert in enumerate(model.experts):
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
    assert model.sampler_expert_steps[0] > 0 and model.sampler_expert_steps[1] > 0


def test_train_one_expert_only():
    from tcplug.module import TCPlugModule

    get = tcplug.get_component
    m = TCPlugModule(backbone=[wan(), wan(seed=1)], router=get("router", "noise_boundary")(num_experts=2),
                     latent=get("latent", "wan_vae")(config=dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1],
                                                                 num_res_blocks=1, temperal_downsample=[False, True, True])),
                     train_experts=[1], noise="flow_matching", prediction_type="flow")
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in m.experts[0].parameters())
    assert all(id(p) in in_opt for p in m.experts[1].parameters())


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
def test_temporal_losses_through_a_time_compressing_vae(term):
    """Both routes of the temporal losses on Wan: the decoded prediction (a subset of clips), or
    latents / VAE features at the latent frame rate with flows pooled over each latent frame's
    span; finite, and they send gradient into the backbone."""
    from tcplug.module import TCPlugModule
    from tests.helpers import synthetic_batch

    get = tcplug.get_component
    name, kw = term
    vae_cfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    m = TCPlugModule(backbone=wan(layers=1), latent=get("latent", "wan_vae")(config=vae_cfg),
                     losses=[get("loss", "denoise")(weight=0.0), get("loss", name)(weighting="none", **kw)],
                     noise="flow_matching", prediction_type="flow").train()
    total, terms = m.training_losses(synthetic_batch(n=2, frames=9, size=32))
    assert torch.isfinite(terms[name]) and terms[name] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
