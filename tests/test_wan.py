"""The Wan model family on tiny random models: sampling equals WanPipeline's, LoRA trains adapters
only and exports to what WanPipeline.load_lora_weights reads, precomputed shards train without the
encoders, time compression is the latent design's, the tiny recipe trains / resumes / runs DDP."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import RECIPES, ROOT, run_tcplug
from tests.test_faults import run_args, weights

ENV = {"PYTHONPATH": str(ROOT)}
PROMPTS = ["a red square moves left", "two blue discs bounce over a striped background"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from tcplug_wan.tiny import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("wan") / "tiny-wan")


def wan_module(folder, lora=None, **kw):
    from tcplug import get_component
    from tcplug.lora import LoraSpec
    from tcplug.module import TCPlugModule

    args = dict(noise="flow_matching", prediction_type="flow", shift=3.0, scheduler=str(folder / "scheduler"),
                guidance_scale=3.0)
    args.update(kw)
    return TCPlugModule(
        backbone=get_component("backbone", "wan")(pretrained=str(folder)),
        latent=get_component("latent", "wan_vae")(pretrained=str(folder)),
        conditioner=get_component("conditioner", "wan_text")(pretrained=str(folder), max_length=16,
                                                             negative_prompt="gray static", dropout=0.0),
        lora=LoraSpec(**lora) if lora else None, **args,
    ).eval()


def pipeline_sample(pipe, latents, steps=5, guidance=3.0):
    return pipe(prompt=PROMPTS, negative_prompt="gray static", latents=latents.clone(), num_inference_steps=steps,
                guidance_scale=guidance, height=32, width=32, num_frames=9, output_type="pt",
                max_sequence_length=16).frames


def tcplug_sample(model, latents, steps=5):
    video = model.generate(2, 9, 32, 32, steps=steps, batch={"txt": PROMPTS}, latents=latents.permute(0, 2, 1, 3, 4))
    return (video + 1) / 2


def test_sampling_equals_wan_pipeline(wan_dir):
    """Same prompt, negative prompt, initial latents and the folder's scheduler (UniPC, flow
    shift 3): tcplug's sample equals WanPipeline's to 1e-4; guidance changes it (the check sees it)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    model = wan_module(wan_dir)
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = pipeline_sample(pipe, latents)
    ours = tcplug_sample(model, latents).clamp(0, 1)
    assert ref.shape == ours.shape == (2, 9, 3, 32, 32)
    assert (ref - ours).abs().max() < 1e-4
    assert (pipeline_sample(pipe, latents, guidance=1.5) - ours).abs().max() > 1e-3


def test_time_compression_is_the_latent_designs(wan_dir):
    from tcplug import TcplugError, get_component

    vae = get_component("latent", "wan_vae")(pretrained=str(wan_dir))
    assert vae.temporal_compression == 4 and vae.latent_frames(9) == 3 and vae.latent_frames(1) == 1
    z = vae.encode(torch.rand(1, 9, 3, 32, 32) * 2 - 1)
    assert z.shape == (1, 3, 16, 4, 4)
    assert vae.decode(z).shape == (1, 9, 3, 32, 32)
    with pytest.raises(TcplugError, match=r"4k\+1 frames \(e\.g\. 5 or 9\), got 8"):
        vae.encode(torch.zeros(1, 8, 3, 32, 32))
    model = wan_module(wan_dir)
    with pytest.raises(TcplugError, match="4k"):
        model.generate(1, 8, 32, 32, steps=1, batch={"txt": PROMPTS[:1]})


def test_lora_trains_adapters_only_and_exports_to_wan_pipeline(wan_dir, tmp_path):
    """model.lora: only adapter weights train (the base is frozen and not in the optimizer);
    the exported adapters, loaded by WanPipeline.load_lora_weights, give tcplug's sample."""
    from diffusers import WanPipeline

    from tcplug.lora import export_lora

    model = wan_module(wan_dir, lora={"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                                      "init": False})  # random B: the adapters change the output
    trainable = [n for n, p in model.diffusion.experts.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.diffusion.experts.parameters() if p.requires_grad)
    assert not any(id(p) in in_opt for n, p in model.diffusion.experts.named_parameters() if "lora_" not in n)

    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = tcplug_sample(model, latents).clamp(0, 1)
    out = tmp_path / "lora"
    assert export_lora(model.backbone, str(out)) > 0
    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipeline_sample(pipe, latents)
    pipe.load_lora_weights(str(out))
    loaded = pipeline_sample(pipe, latents)
    assert (plain - ours).abs().max() > 1e-3  # the adapters matter
    assert (loaded - ours).abs().max() < 1e-4


def test_lora_exports_in_both_layouts_load_in_wan_pipeline_with_alpha_folded(wan_dir, tmp_path):
    """alpha != rank, adapters on attention and feed-forward: the diffusers export and the
    original Wan layout (ComfyUI's keys) both load into WanPipeline and give tcplug's sample (the
    alpha / rank scale travels: unfolded, diffusers would load the update at alpha = rank); the
    original keys round-trip to diffusers' keys."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file
    from tcplug_wan.lora import from_original

    from tcplug.lora import export_lora, folded_state_dict

    model = wan_module(wan_dir, lora={"rank": 4, "alpha": 12, "init": False,
                                      "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]})
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = tcplug_sample(model, latents).clamp(0, 1)
    for fmt in ("diffusers", "original"):
        out = tmp_path / fmt
        assert export_lora(model.backbone, str(out), fmt) > 0
        pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(out), weight_name=None if fmt == "diffusers" else "wan_lora.safetensors")
        loaded = pipeline_sample(pipe, latents)
        assert (loaded - ours).abs().max() < 1e-4, fmt
    original = load_file(str(tmp_path / "original" / "wan_lora.safetensors"))
    assert "diffusion_model.blocks.1.self_attn.q.lora_down.weight" in original
    assert "diffusion_model.blocks.0.ffn.2.lora_up.weight" in original
    assert not any("attn1" in k or "to_q" in k for k in original)
    state = folded_state_dict(model.backbone)
    back = from_original(original)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_lora_export_refuses_a_format_the_family_does_not_write(wan_dir, tmp_path):
    from tcplug import TcplugError
    from tcplug.lora import export_lora

    model = wan_module(wan_dir, lora={"rank": 4})
    with pytest.raises(TcplugError, match="diffusers, original, not 'kohya'"):
        export_lora(model.backbone, str(tmp_path / "x"), "kohya")


def test_lora_targets_matching_nothing_name_the_layers(wan_dir):
    from tcplug import TcplugError

    with pytest.raises(TcplugError, match="match no module .*to_q"):
        wan_module(wan_dir, lora={"rank": 4, "target_modules": ["q_proj"]})


def test_folder_weights_stay_out_of_checkpoints(wan_dir):
    """Frozen weights a component loaded from the model folder are not saved; loading fills them
    back from the folder, and the trained adapters round-trip."""
    model = wan_module(wan_dir, lora={"rank": 4, "init": False})
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert kept and all("lora_" in k for k in kept if k.startswith("experts."))
    assert not any(k.startswith(("latent.", "conditioners.")) for k in kept)
    other = wan_module(wan_dir, lora={"rank": 4, "init": False})
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_wan_backbone_takes_per_frame_and_per_token_timesteps(wan_dir):
    """Per-frame and per-token timesteps reach Wan as its (B, seq_len) form: equal timesteps give
    the per-clip output; one frame's timestep changed changes that frame most."""
    from tcplug import get_component

    bb = get_component("backbone", "wan")(pretrained=str(wan_dir)).eval()
    x = torch.randn(1, 3, 16, 4, 4)
    text = torch.randn(1, 5, 32)
    with torch.no_grad():
        clip = bb(x, torch.tensor([500.0]), {"text": text})
        frame = bb(x, torch.full((1, 3), 500.0), {"text": text})
        token = bb(x, torch.full((1, 3, 4), 500.0), {"text": text})
        moved = bb(x, torch.tensor([[500.0, 500.0, 10.0]]), {"text": text})
    assert torch.allclose(clip, frame, atol=1e-5) and torch.allclose(clip, token, atol=1e-5)
    diff = (moved - clip).abs().flatten(2).mean(2)[0]
    assert diff[2] > 0 and diff[2] > diff[0]


def test_missing_subfolder_is_named(tmp_path):
    from tcplug import TcplugError, get_component

    (tmp_path / "model").mkdir()
    with pytest.raises(TcplugError, match="has no transformer/"):
        get_component("backbone", "wan")(pretrained=str(tmp_path / "model"))
    with pytest.raises(TcplugError, match="not a local folder"):
        get_component("latent", "wan_vae")(pretrained=str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_precomputed_shards_train_without_the_encoders(wan_dir, tmp_path, monkeypatch):
    """`tcplug data encode` writes latents and text embeddings; a recipe on those shards trains
    with no VAE encoder and no text encoder loaded (their loaders are made to fail)."""
    raw = tmp_path / "raw"
    proc = run_tcplug("data", "synth", "--out", raw, "--clips", "6", "--frames", "9", "--size", "32",
                      "--shard-size", "3", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    enc = tmp_path / "enc"
    env = {**ENV, "WAN_MODEL_DIR": str(wan_dir), "WAN_SHARDS": str(enc)}
    proc = run_tcplug("data", "encode", "--config", RECIPES / "wan" / "t2v-lora.yaml", "--shards", raw,
                      "--out", enc, "--batch-size", "2", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoded 6 clips into 2 shard(s)" in proc.stdout
    assert (enc / "negative_text_emb.npy").exists()
    assert json.loads((enc / "encode.json").read_text())["temporal_compression"] == 4
    again = run_tcplug("data", "encode", "--config", RECIPES / "wan" / "t2v-lora.yaml", "--shards", raw,
                       "--out", enc, cwd=tmp_path, env=env)
    assert "(2 already done)" in again.stdout  # resumable: finished shards are skipped

    # in process: the training recipe's components, one training step on an encoded batch, with
    # the encoders' loaders made to fail
    import diffusers
    import transformers

    from tcplug.data import VideoDataModule
    from tcplug.module import TCPlugModule

    def refuse(*a, **k):
        raise AssertionError("an encoder was loaded")

    monkeypatch.setattr(transformers.UMT5EncoderModel, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKLWan, "encode", refuse)
    from tcplug import get_component

    model = TCPlugModule(
        backbone=get_component("backbone", "wan")(pretrained=str(wan_dir)),
        latent=get_component("latent", "wan_vae")(pretrained=str(wan_dir)),
        conditioner=get_component("conditioner", "wan_text")(pretrained=str(wan_dir), dropout=0.5),
        lora=None, noise="flow_matching", prediction_type="flow")
    dm = VideoDataModule(shards=str(enc), frames=9, size=32, batch_size=2, val_clips=2)
    dm.setup("fit")
    assert {"latents", "text_emb", "txt"} <= set(dm.keys)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["latents"].shape == (2, 3, 16, 4, 4) and batch["text_emb"].shape[2] == 32
    assert batch["negative_text_emb"].shape[0] == 1
    model.train()
    total, _ = model.training_losses(batch)
    total.backward()
    assert not model.latent.encoder_loaded and model.diffusion.conditioners[0].text_encoder is None

    # and the whole recipe trains on them through the CLI (cpu-smoke shrinks it), encoders unused
    proc = run_tcplug("fit", "--config", RECIPES / "wan" / "t2v-lora.yaml", "--config",
                      RECIPES / "presets" / "cpu-smoke.yaml", "--data.shards", enc, "--data.size=32",
                      "--data.frames=9", "--trainer.max_steps=2",
                      "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                      cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())["metrics"]
    assert metrics["val/tvs"] == metrics["val/tvs"] and "val/motion_ratio" in metrics


@pytest.mark.slow
def test_t2v_lora_cpu_smoke_trains_and_exports(wan_dir, tmp_path):
    """WAN_MODEL_DIR=<tiny folder> t2v-lora.yaml + cpu-smoke.yaml trains and validates on CPU on
    the synthetic world (live encoders); `tcplug export --lora` of its checkpoint loads into
    WanPipeline and reproduces the checkpoint's sample."""
    from diffusers import WanPipeline

    env = {**ENV, "WAN_MODEL_DIR": str(wan_dir)}
    proc = run_tcplug("fit", "--config", RECIPES / "wan" / "t2v-lora.yaml", "--config",
                      RECIPES / "presets" / "cpu-smoke.yaml", cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs").glob("*/version_0"))
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert "val/tvs" in metrics and "val/frame_distance" in metrics
    ckpt = run / "checkpoints" / "last.ckpt"
    state = weights(ckpt)["state_dict"]
    assert all("lora_" in k for k in state if k.startswith("experts."))
    out = tmp_path / "lora"
    proc = run_tcplug("export", ckpt, "--lora", out, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").exists()

    from tcplug.module import TCPlugModule

    model = TCPlugModule.from_checkpoint(str(ckpt))
    model.diffusion.guidance_scale = 3.0
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    model.diffusion.conditioners[0].negative_prompt = "gray static"
    model.diffusion.conditioners[0]._negative = None
    model.diffusion.conditioners[0].max_length = 16
    ref = pipeline_sample(pipe, latents)
    ours = tcplug_sample(model, latents).clamp(0, 1)
    assert (ref - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_tiny_recipe_resumes_exactly_after_a_kill(tmp_path, tiny):
    """recipes/wan/tiny.yaml killed with SIGKILL mid-run, resumed with --ckpt_path last, ends
    with exactly the weights of an uninterrupted run."""
    recipe = RECIPES / "wan" / "tiny.yaml"
    args = [a for a in run_args(tiny, "x", steps=6) if not a.startswith(("--data.frames", "--data.size",
                                                                          "--trainer.logger"))]
    args += ["--data.frames=5", "--data.size=32"]
    proc = run_tcplug("fit", "--config", recipe, *args, "--trainer.logger.init_args.name=straight", cwd=tmp_path,
                      env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = run_tcplug("fit", "--config", recipe, *args, "--trainer.logger.init_args.name=killed",
                        "--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.init_args.step=5",
                        cwd=tmp_path, env=ENV)
    assert killed.returncode == -9
    resumed = run_tcplug("fit", "--config", recipe, *args, "--trainer.logger.init_args.name=killed",
                         "--ckpt_path", "last", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = weights(tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


@pytest.mark.slow
def test_tiny_recipe_ddp_two_ranks(tmp_path, tiny):
    tiny = [a for a in tiny if not a.startswith(("--data.frames", "--data.size", "--data.train_clips",
                                                 "--data.val_clips", "--model.num_val_samples"))]
    proc = run_tcplug("fit", "--config", RECIPES / "wan" / "tiny.yaml", *tiny, "--data.frames=5", "--data.size=32",
                      "--data.train_clips=8", "--data.shard_size=2", "--data.val_clips=4", "--model.num_val_samples=2",
                      "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      "--trainer.callbacks+=tests.helpers.DumpMetrics", f"--trainer.callbacks.init_args.out_dir={tmp_path}",
                      cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("val/loss", "val/tvs", "val/motion_ratio"):
        assert ranks[0][key] == pytest.approx(ranks[1][key], rel=1e-6), key
    assert np.isfinite(ranks[0]["val/loss"])


def test_fsdp_overlay_wraps_each_wan_block():
    """recipes/wan/fsdp.yaml: each WanTransformerBlock is one FSDP unit and is checkpointed."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from tests.helpers import fsdp_wrapped_classes

    assert fsdp_wrapped_classes(RECIPES / "wan" / "fsdp.yaml") == {WanTransformerBlock}
