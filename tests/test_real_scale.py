"""Real Wan configurations without their memory: the published 1.3B / 14B shapes built on the meta
device (parameter counts, LoRA targets, the FSDP wrap of recipes/wan/fsdp.yaml), and the memory
planner (`tcplug plan`): exact component counts, activations as autograd saves them, weights
never counted twice, a verdict and levers for a card."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import RECIPES, run_tcplug

LORA = ["to_q", "to_k", "to_v", "to_out.0"]


def rss_mib():
    from tcplug.plan import rss_bytes

    return rss_bytes() / 2**20


def test_wan_14b_on_meta_has_its_published_size_and_lora_targets():
    """The 14B configuration: 14.29 B parameters, built without allocating them; LoRA rank 32 on
    t2v-lora.yaml's targets adapts 320 projections (self- and cross-attention of 40 blocks)."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import TRANSFORMER

    from tcplug.lora import LoraSpec, apply_lora

    apply_lora(WanBackbone(config=dict(TRANSFORMER)), LoraSpec(rank=2))  # every library imported
    before = rss_mib()
    with torch.device("meta"):
        net = WanBackbone(config="wan2.1-t2v-14b")
        small = WanBackbone(config="wan2.1-t2v-1.3b")
    assert sum(p.numel() for p in net.parameters()) == 14_288_491_584
    assert sum(p.numel() for p in small.parameters()) == 1_418_996_800
    assert net.num_blocks == 40 and net.token_dim == 5120 and small.token_dim == 1536
    trainable = apply_lora(net, LoraSpec(rank=32, target_modules=LORA))
    assert trainable == 320 * 32 * (5120 + 5120)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 320 and all(".attn1." in n or ".attn2." in n for n in adapted)
    assert all(p.is_meta for p in net.parameters())
    assert rss_mib() - before < 500  # 57 GB of fp32 weights were never allocated


FSDP_CHECK = r"""
import json, sys, torch, torch.distributed as dist, yaml
from importlib import import_module
from torch.distributed.fsdp import FSDPModule, fully_shard
from tcplug_wan import WanBackbone
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
policy = yaml.safe_load(open(sys.argv[1]))["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
classes = tuple(getattr(import_module(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]) for p in policy)
with torch.device("meta"):
    model = WanBackbone(config="wan2.1-t2v-14b").model
units = [m for m in model.modules() if isinstance(m, classes)]
for m in units:
    fully_shard(m)
fully_shard(model)
inner = sum(p.numel() for m in units for p in m.parameters())
own = sum(p.numel() for p in model.parameters()) - inner
print(json.dumps({"units": sum(isinstance(m, FSDPModule) for m in model.modules()), "blocks": len(units),
                  "root_own": own, "largest_block": max(sum(p.numel() for p in m.parameters()) for m in units),
                  "meta": all(p.is_meta for p in model.parameters())}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_wan_14b_fsdp_wrap_of_the_recipe_on_meta(tmp_path):
    """recipes/wan/fsdp.yaml's wrap policy on the 14B model (meta, one gloo rank): 40 block units
    and the root, nothing allocated; the largest unit gathered at once is a block (351 M
    parameters), the root's own layers are smaller than one block."""
    proc = subprocess.run([sys.executable, "-c", FSDP_CHECK, str(RECIPES / "wan" / "fsdp.yaml"), str(tmp_path / "pg")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocks"] == 40 and out["units"] == 41 and out["meta"]
    assert out["root_own"] < out["largest_block"] < 14_288_491_584 / 35


def test_a_model_folder_on_meta_reads_only_its_config(tmp_path):
    """Under torch.device("meta") a family reads the folder's config.json alone: the same module,
    no weight loaded (a folder whose weights are gone still plans)."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    real = WanBackbone(pretrained=str(folder))
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    with torch.device("meta"):
        meta = WanBackbone(pretrained=str(folder))
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert all(p.is_meta for p in meta.parameters())


def test_saved_activations_are_counted_once_and_without_weights():
    """Linear(64, 256) -> GELU -> Linear(256, 64) with trainable weights on x (8, 64): autograd
    keeps x, the first output (for GELU) and GELU's output; the weights it also keeps are
    parameters, not activations; an input two layers keep is counted once. The count is the same
    on meta as on real tensors."""
    from tcplug.plan import counting_saved

    for device in ("cpu", "meta"):
        net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)
        with counting_saved({id(p) for p in net.parameters()}) as total:
            net(torch.zeros(8, 64, device=device))
        assert total[0] == 4 * 8 * (64 + 256 + 256), device
        # two layers reading the same input keep it once
        a, b = nn.Linear(64, 32).to(device), nn.Linear(64, 32).to(device)
        with counting_saved({id(p) for p in [*a.parameters(), *b.parameters()]}) as total:
            x = torch.zeros(8, 64, device=device)
            a(x) + b(x)
        assert total[0] == 4 * 8 * 64, device


def plan_of(*recipes, **extra):
    from tcplug.plan import plan
    from tcplug.recipe import load

    return plan(load([str(r) for r in recipes]), **extra)


def test_plan_counts_what_the_module_holds():
    """The planner's components are the built module's (every parameter, the trainable ones after
    LoRA); gradients and AdamW state follow the trainable bytes; checkpointing saves activations."""
    from tcplug.module import TCPlugModule
    from tcplug.recipe import instantiate, load

    cfg = load([str(RECIPES / "wan" / "tiny.yaml")])
    cfg["model"]["lora"] = {"rank": 4, "target_modules": LORA}
    cfg["model"]["backbone"]["init_args"]["gradient_checkpointing"] = True
    from tcplug.plan import plan

    result = plan(cfg, device="cpu")
    module = instantiate(cfg, classes={"model": TCPlugModule}).model
    assert sum(p["params"] for p in result["components"].values()) == sum(p.numel() for p in module.parameters())
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert result["lines"]["gradients"] == sum(4 * p.numel() for p in trainable)
    assert result["lines"]["optimizer"] == 2 * result["lines"]["gradients"]
    saved = result["activations_saved"]
    assert saved["checkpointing"] < saved["none"]
    assert result["gradient_checkpointing"] is True


@pytest.mark.slow
def test_plan_command_says_whether_it_fits_and_which_lever(tmp_path):
    """`tcplug plan --gpu-memory`: the tiny Wan recipe fits a 24 GB card; the 14B configuration of
    the CPU recipe does not, and the planner names levers with their savings (FSDP among them)."""
    overlay = tmp_path / "14b.yaml"
    overlay.write_text("model:\n  backbone:\n    init_args:\n      config: wan2.1-t2v-14b\n")
    small = run_tcplug("plan", "--config", RECIPES / "wan" / "tiny.yaml", "--gpu-memory", "24GB", cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    assert "fits in 24.00 GiB" in small.stdout and "does not fit" not in small.stdout
    big = run_tcplug("plan", "--config", RECIPES / "wan" / "cpu-1.3b.yaml", "--config", overlay, "--gpu-memory", "24GB",
                     "--device", "gpu", "--json", cwd=tmp_path)
    assert big.returncode == 0, big.stderr
    result = json.loads(big.stdout)
    assert not result["fits"] and result["components"]["backbone"]["params"] == 14_288_491_584 + 104_857_600  # + LoRA
    assert result["lines"]["weights"] > 50 * 2**30  # fp32 (the recipe's 32-true)
    levers = {lever["lever"].split(" ")[0]: lever for lever in result["levers"]}
    assert "trainer.strategy:" in levers and "trainer.precision:" in levers


def test_plan_refuses_a_bad_card_size(tmp_path):
    proc = run_tcplug("plan", "--config", RECIPES / "wan" / "tiny.yaml", "--gpu-memory", "lots", cwd=tmp_path)
    assert proc.returncode == 2 and "24GB" in proc.stderr



@pytest.mark.parametrize("storage, tol", [("bfloat16", 0.02), ("float8_e4m3fn", 0.15)])
def test_storage_dtype_keeps_the_output_and_stores_frozen_weights_small(storage, tol):
    """`storage_dtype`: after the first forward the frozen block weights are stored in fp8 / bf16
    (a quarter / half of their fp32 bytes), the adapters stay fp32 and still train; the output
    and the adapters' gradients stay within a stated tolerance of the fp32 model's."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import TRANSFORMER

    from tcplug.lora import LoraSpec, apply_lora

    nets = []
    for s in (None, storage):
        torch.manual_seed(0)
        net = WanBackbone(config=dict(TRANSFORMER), storage_dtype=s).train()
        apply_lora(net, LoraSpec(rank=4, init=False))
        nets.append(net)
    before = sum(p.numel() * p.element_size() for n, p in nets[1].named_parameters() if "blocks" in n and "lora_" not in n)
    x = torch.randn(2, 3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])
    outs, grads = [], []
    for net in nets:
        out = net(x, t, {"text": torch.ones(2, 4, 32)})
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for n, p in net.named_parameters() if "lora_" in n]))
    kept = {p.dtype for n, p in nets[1].named_parameters() if "lora_" in n}
    stored = {p.dtype for n, p in nets[1].named_parameters() if "blocks" in n and "lora_" not in n and p.dim() == 2}
    assert kept == {torch.float32} and stored == {getattr(torch, storage)}
    after = sum(p.numel() * p.element_size() for n, p in nets[1].named_parameters() if "blocks" in n and "lora_" not in n)
    assert after < before * (0.3 if "float8" in storage else 0.55)
    assert (outs[0] - outs[1]).norm() / outs[0].norm() < tol
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 2 * tol


def test_storage_dtype_refuses_an_unknown_dtype():
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import TRANSFORMER

    from tcplug import TcplugError

    with pytest.raises(TcplugError, match="storage_dtype 'int4' is not one of float8_e4m3fn"):
        WanBackbone(config=dict(TRANSFORMER), storage_dtype="int4")


def test_gradient_checkpointing_keeps_the_adapters_gradients():
    """The checkpointing lever recomputes activations; the adapters' gradients are the same."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import TRANSFORMER

    from tcplug.lora import LoraSpec, apply_lora

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = WanBackbone(config=dict(TRANSFORMER), gradient_checkpointing=ckpt).train()
        apply_lora(net, LoraSpec(rank=4, init=False))
        x = torch.randn(2, 3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        net(x, torch.tensor([300, 700]), {"text": torch.ones(2, 4, 32)}).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in net.named_parameters() if "lora_" in n]))
    assert net.model.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_a_folder_loads_straight_into_bf16_with_the_weights_of_a_cast(tmp_path):
    """`dtype: bfloat16` with `pretrained:` loads the fp32 folder into bf16 (diffusers'
    `torch_dtype`, no fp32 copy kept): every weight equals the fp32 load cast to bf16, except the
    modules Wan keeps in fp32 (norms, time embedder, scale-shift tables), which stay exact."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    full = dict(WanBackbone(pretrained=str(folder)).model.named_parameters())
    half = dict(WanBackbone(pretrained=str(folder), dtype="bfloat16").model.named_parameters())
    assert half.keys() == full.keys()
    kept = [n for n, p in half.items() if p.dtype == torch.float32]
    assert kept and all(torch.equal(half[n], full[n]) for n in kept)
    cast = [n for n, p in half.items() if p.dtype == torch.bfloat16]
    assert len(cast) > len(kept) and all(torch.equal(half[n], full[n].to(torch.bfloat16)) for n in cast)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_offload_to_disk_samples_the_same_and_keeps_the_blocks_on_disk(family, tmp_path):
    """`offload: disk`: each block's weights are written to `offload_dir` and loaded one block at a
    time (diffusers' group offloading); a sampling forward returns what the resident model returns,
    twice (the second from the files)."""
    from tcplug_ltx.tiny import TEXT_DIM
    from tcplug_ltx.tiny import TRANSFORMER as LTX
    from tcplug_wan.tiny import TRANSFORMER as WAN

    from tcplug import get_component

    config, c, text = (WAN, 16, 32) if family == "wan" else (LTX, 8, TEXT_DIM)
    outs = []
    for offload in (None, "disk"):
        torch.manual_seed(0)
        kw = {"offload": "disk", "offload_dir": str(tmp_path / "blocks")} if offload else {}
        net = get_component("backbone", family)(config=dict(config), **kw).eval()
        x = torch.randn(1, 3, c, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outs.append([net(x, torch.tensor([500.0]), {"text": torch.ones(1, 4, text)}) for _ in range(2)])
    files = sorted((tmp_path / "blocks").glob("*.safetensors"))
    assert len(files) >= net.num_blocks
    assert all(torch.allclose(o, outs[0][0], atol=1e-6) for o in outs[1])


def test_offload_refuses_training_and_unknown_modes(tmp_path):
    """Group offloading would reload each block from the copy made when it began, losing a
    training step's updates: a forward with gradients is refused with the levers that train."""
    from tcplug_wan import WanBackbone
    from tcplug_wan.tiny import TRANSFORMER

    from tcplug.errors import TcplugError

    net = WanBackbone(config=dict(TRANSFORMER), offload="disk", offload_dir=str(tmp_path)).train()
    with pytest.raises(TcplugError, match="for sampling, not training.*storage_dtype"):
        net(torch.randn(1, 3, 16, 8, 8), torch.tensor([500.0]), {"text": torch.ones(1, 4, 32)})
    with pytest.raises(TcplugError, match="offload 'gpu' is not one of cpu, disk"):
        WanBackbone(config=dict(TRANSFORMER), offload="gpu")
    with pytest.raises(TcplugError, match="needs offload_dir"):
        WanBackbone(config=dict(TRANSFORMER), offload="disk")
