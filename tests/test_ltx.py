"""The LTX-Video model family on tiny random models: sampling equals LTXPipeline's (its sigmas and
token-count shift included), the VAE is normalised as the pipeline normalises it, the T5 padding
mask reaches the model, LoRA trains adapters only and exports to what LTXPipeline.load_lora_weights
reads, precomputed shards (with text masks) train without the encoders, the recipes train on CPU,
noise-boundary experts route alike in training and sampling."""

import json

import pytest
import torch

from tests.conftest import RECIPES, ROOT, run_tcplug
from tests.test_faults import weights

ENV = {"PYTHONPATH": str(ROOT)}
PROMPTS = ["a red square moves left", "two blue discs bounce over a striped background"]


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory):
    from tcplug_ltx.tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("ltx") / "tiny-ltx")


def ltx_module(folder, lora=None, **kw):
    from tcplug import get_component
    from tcplug.lora import LoraSpec
    from tcplug.module import TCPlugModule

    args = dict(noise="flow_matching", prediction_type="flow", scheduler=str(folder / "scheduler"), guidance_scale=3.0)
    args.update(kw)
    return TCPlugModule(
        backbone=get_component("backbone", "ltx")(pretrained=str(folder)),
        latent=get_component("latent", "ltx_vae")(pretrained=str(folder)),
        conditioner=get_component("conditioner", "ltx_text")(pretrained=str(folder), max_length=16,
                                                             negative_prompt="gray static", dropout=0.0),
        lora=LoraSpec(**lora) if lora else None, **args,
    ).eval()


def packed(latents):
    """``(B, C, T', h, w)`` -> LTXPipeline's tokens ``(B, T'*h*w, C)`` (patch size 1)."""
    return latents.permute(0, 2, 3, 4, 1).flatten(1, 3)


def pipeline_sample(pipe, latents, steps=5, guidance=3.0):
    return pipe(prompt=PROMPTS, negative_prompt="gray static", latents=packed(latents).clone(),
                num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, num_frames=9,
                output_type="pt", max_sequence_length=16).frames


def tcplug_sample(model, latents, steps=5):
    video = model.generate(2, 9, 32, 32, steps=steps, batch={"txt": PROMPTS}, latents=latents.permute(0, 2, 1, 3, 4))
    return (video + 1) / 2


def start_latents(seed=0):
    return torch.randn(2, 8, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_sampling_equals_ltx_pipeline(ltx_dir):
    """Same prompts, negative prompt, initial latents and the folder's scheduler (flow matching
    with LTX's dynamic shift from the token count): tcplug's sample equals LTXPipeline's to 1e-4;
    guidance changes it (the check can see a difference)."""
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(ltx_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    model = ltx_module(ltx_dir)
    latents = start_latents()
    ref = pipeline_sample(pipe, latents)
    ours = tcplug_sample(model, latents).clamp(0, 1)
    assert ref.shape == ours.shape == (2, 9, 3, 32, 32)
    assert (ref - ours).abs().max() < 1e-4
    assert (pipeline_sample(pipe, latents, guidance=1.5) - ours).abs().max() > 1e-3


def test_sampler_timesteps_are_the_pipelines(ltx_dir):
    """The backbone's timestep_schedule gives LTXPipeline's sigmas (1 .. 1/steps) and mu from the
    number of latent tokens; the sampler's timesteps then equal the pipeline's."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    model = ltx_module(ltx_dir)
    shape = (1, 3, 8, 8, 8)
    sched = model.diffusion.schedule.make_sampler(7, model.diffusion.timestep_schedule(shape))
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(ltx_dir / "scheduler")

    mu = calculate_shift(3 * 8 * 8, 1024, 4096, 0.95, 2.05)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 7, 7), mu=mu)
    assert torch.allclose(sched.timesteps, ref.timesteps)
    default = FlowMatchEulerDiscreteScheduler.from_pretrained(ltx_dir / "scheduler")
    default.set_timesteps(7, mu=mu)
    assert not torch.allclose(sched.timesteps, default.timesteps)  # the sigmas matter


def test_vae_normalises_as_the_pipeline(ltx_dir):
    """ltx_vae latents are ``(z - latents_mean) * scaling_factor / latents_std`` of the VAE's
    posterior mode (the tiny folder's statistics are random, not 0/1); decode inverts it; 4k+1
    frames for the tiny VAE's 4x time compression."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    from tcplug import TcplugError, get_component

    vae = get_component("latent", "ltx_vae")(pretrained=str(ltx_dir), encoder=True)
    assert vae.temporal_compression == 4 and vae.downsample == 4 and vae.latent_frames(9) == 3
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 3, 8, 8, 8)
    raw = AutoencoderKLLTXVideo.from_pretrained(ltx_dir / "vae")
    mode = raw.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    ref = LTXPipeline._normalize_latents(mode, raw.latents_mean, raw.latents_std, raw.config.scaling_factor)
    assert torch.allclose(z.permute(0, 2, 1, 3, 4), ref, atol=1e-5)
    assert not torch.allclose(z.permute(0, 2, 1, 3, 4), mode, atol=1e-2)  # the statistics are not trivial
    assert vae.decode(z).shape == (1, 9, 3, 32, 32)
    with pytest.raises(TcplugError, match=r"4k\+1 frames"):
        vae.encode(torch.zeros(1, 8, 3, 32, 32))


def test_text_mask_hides_padding_tokens(ltx_dir):
    """ltx_text hands the T5 padding mask to the model: changing the embeddings of padded tokens
    leaves the output unchanged; without the mask it changes."""
    from tcplug import get_component

    text = get_component("conditioner", "ltx_text")(pretrained=str(ltx_dir), max_length=16, dropout=0.0).eval()
    ctx = text({"txt": ["a red square"]}, (1, 3, 8, 8, 8))
    mask = ctx["text_mask"]
    assert mask.shape == (1, 16) and mask[0, :4].all() and not mask[0, 4:].any()  # 3 words + </s>
    bb = get_component("backbone", "ltx")(pretrained=str(ltx_dir)).eval()
    x = torch.randn(1, 3, 8, 8, 8)
    garbled = ctx["text"].clone()
    garbled[:, 4:] += 5.0
    ts = torch.tensor([500.0])
    with torch.no_grad():
        a = bb(x, ts, ctx)
        b = bb(x, ts, {**ctx, "text": garbled})
        c = bb(x, ts, {"text": garbled})  # no mask: every token attended
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-4


def test_lora_trains_adapters_only_and_exports_to_ltx_pipeline(ltx_dir, tmp_path):
    """model.lora: only adapter weights train; the exported adapters, loaded by
    LTXPipeline.load_lora_weights, give tcplug's sample."""
    from diffusers import LTXPipeline

    from tcplug.lora import export_lora

    model = ltx_module(ltx_dir, lora={"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                                      "init": False})  # random B: the adapters change the output
    trainable = [n for n, p in model.diffusion.experts.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    latents = start_latents(1)
    ours = tcplug_sample(model, latents).clamp(0, 1)
    out = tmp_path / "lora"
    assert export_lora(model.backbone, str(out)) > 0
    pipe = LTXPipeline.from_pretrained(ltx_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipeline_sample(pipe, latents)
    pipe.load_lora_weights(str(out))
    loaded = pipeline_sample(pipe, latents)
    assert (plain - ours).abs().max() > 1e-3  # the adapters matter
    assert (loaded - ours).abs().max() < 1e-4


def test_folder_weights_stay_out_of_checkpoints(ltx_dir):
    model = ltx_module(ltx_dir, lora={"rank": 4, "init": False})
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert kept and all("lora_" in k for k in kept if k.startswith("experts."))
    assert not any(k.startswith(("latent.", "conditioners.")) for k in kept)


def test_missing_subfolder_is_named(tmp_path):
    from tcplug import TcplugError, get_component

    (tmp_path / "model").mkdir()
    with pytest.raises(TcplugError, match="has no transformer/"):
        get_component("backbone", "ltx")(pretrained=str(tmp_path / "model"))
    with pytest.raises(TcplugError, match="has no text_encoder/"):
        get_component("conditioner", "ltx_text")(pretrained=str(tmp_path / "model"))


def test_noise_boundary_experts_route_alike_on_ltx(ltx_dir):
    """Two LTX backbones as noise_boundary experts: a training batch goes to the expert its
    timestep names, and the sampler's steps (LTX's shifted timesteps) split at the same boundary."""
    from tcplug import get_component
    from tcplug.module import TCPlugModule

    d = str(ltx_dir)
    torch.manual_seed(0)
    second = get_component("backbone", "ltx")(pretrained=d)
    for p in second.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model = TCPlugModule(backbone=[get_component("backbone", "ltx")(pretrained=d), second],
                         router=get_component("router", "noise_boundary")(num_experts=2, boundary_ratio=0.875),
                         latent=get_component("latent", "ltx_vae")(pretrained=d),
                         noise="flow_matching", prediction_type="flow", scheduler=d + "/scheduler").eval()
    x = torch.randn(3, 3, 8, 8, 8)
    t = torch.tensor([990.0, 875.0, 874.0])
    with torch.no_grad():
        mixed = model.diffusion.denoise(x, t, {})
        e0, e1 = model.diffusion.experts[0](x, t, {}), model.diffusion.experts[1](x, t, {})
    assert torch.allclose(mixed[:2], e0[:2], atol=1e-5) and torch.allclose(mixed[2:], e1[2:], atol=1e-5)
    assert not torch.allclose(e0, e1)
    steps = 8
    model.generate(1, 9, 32, 32, steps=steps, latents=torch.randn(1, 3, 8, 8, 8))
    sched = model.diffusion.schedule.make_sampler(steps, model.diffusion.timestep_schedule((1, 3, 8, 8, 8)))
    high = int((sched.timesteps >= 875).sum())
    assert 0 < high < steps and model.diffusion.sampler_expert_steps == [high, steps - high]


@pytest.mark.slow
def test_precomputed_shards_train_without_the_encoders(ltx_dir, tmp_path, monkeypatch):
    """`tcplug data encode` writes latents, T5 embeddings and their masks (and the negative
    prompt's); a training step on those shards runs with neither encoder loaded."""
    raw = tmp_path / "raw"
    proc = run_tcplug("data", "synth", "--out", raw, "--clips", "4", "--frames", "9", "--size", "32",
                      "--shard-size", "2", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    enc = tmp_path / "enc"
    env = {**ENV, "LTX_MODEL_DIR": str(ltx_dir), "LTX_SHARDS": str(enc)}
    proc = run_tcplug("data", "encode", "--config", RECIPES / "ltx" / "t2v-lora.yaml", "--shards", raw,
                      "--out", enc, "--batch-size", "2", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((enc / "encode.json").read_text())
    assert info["temporal_compression"] == 4 and set(info["shared"]) == {"negative_text_emb", "negative_text_mask"}

    import diffusers
    import transformers

    from tcplug import get_component
    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule

    def refuse(*a, **k):
        raise AssertionError("an encoder was loaded")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKLLTXVideo, "encode", refuse)
    model = TCPlugModule(
        backbone=get_component("backbone", "ltx")(pretrained=str(ltx_dir)),
        latent=get_component("latent", "ltx_vae")(pretrained=str(ltx_dir)),
        conditioner=get_component("conditioner", "ltx_text")(pretrained=str(ltx_dir), dropout=0.5),
        noise="flow_matching", prediction_type="flow")
    dm = VideoDataModule(shards=str(enc), frames=9, size=32, batch_size=2, val_clips=2)
    dm.setup("fit")
    assert {"latents", "text_emb", "text_mask", "txt"} <= set(dm.keys)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["latents"].shape == (2, 3, 8, 8, 8) and batch["text_emb"].shape[2] == 32
    assert batch["text_mask"].shape == batch["text_emb"].shape[:2] and 0 < batch["text_mask"].sum() < batch["text_mask"].numel()
    model.train()
    total, _ = model.training_losses(batch)
    total.backward()
    assert not model.latent.encoder_loaded and model.diffusion.conditioners[0].text_encoder is None


@pytest.mark.slow
def test_recipes_train_on_cpu_and_export(ltx_dir, tmp_path):
    """recipes/ltx/tiny.yaml (config-built) and t2v-lora.yaml on the tiny folder (+ cpu-smoke) train
    and validate on CPU; `tcplug export --lora` of the LoRA run writes what LTXPipeline loads, and
    the loaded pipeline reproduces the checkpoint's sample."""
    from diffusers import LTXPipeline


    proc = run_tcplug("fit", "--config", RECIPES / "ltx" / "tiny.yaml", "--trainer.max_steps=6",
                      "--trainer.val_check_interval=6", "--trainer.enable_progress_bar=false", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "runs" / "ltx-tiny").rglob("metrics.json")).read_text())["metrics"]
    assert "val/tvs" in metrics and "val/motion_ratio" in metrics

    env = {**ENV, "LTX_MODEL_DIR": str(ltx_dir)}
    proc = run_tcplug("fit", "--config", RECIPES / "ltx" / "t2v-lora.yaml", "--config",
                      RECIPES / "presets" / "cpu-smoke.yaml", cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next((tmp_path / "runs" / "ltx-t2v-lora").rglob("last.ckpt"))
    assert all("lora_" in k for k in weights(ckpt)["state_dict"] if k.startswith("experts."))
    out = tmp_path / "lora"
    proc = run_tcplug("export", ckpt, "--lora", out, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tcplug.module import TCPlugModule

    model = TCPlugModule.from_checkpoint(str(ckpt))
    model.diffusion.guidance_scale = 3.0
    cond = model.diffusion.conditioners[0]
    cond.negative_prompt, cond._negative, cond.max_length = "gray static", None, 16
    pipe = LTXPipeline.from_pretrained(ltx_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    latents = start_latents(2)
    assert (pipeline_sample(pipe, latents) - tcplug_sample(model, latents).clamp(0, 1)).abs().max() < 1e-4


def test_fsdp_overlay_wraps_each_ltx_block():
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

    from tests.helpers import fsdp_wrapped_classes

    assert fsdp_wrapped_classes(RECIPES / "ltx" / "fsdp.yaml") == {LTXVideoTransformerBlock}
