"""Memory planning: what a recipe's training step needs, estimated without allocating it.

The recipe's module is built on the ``meta`` device (a model family reads only its folder's
``config.json``; a backbone's ``apply_storage_dtype()``, where it has one, is applied as at its
first forward), so a 14B model costs nothing to plan. Counted exactly from the built module:
parameters of every component (by dtype), gradients and AdamW state of the trainable ones.
Measured on the meta device: the backbone's activations for the recipe's clip, i.e. the bytes
autograd saves for the backward pass in one forward (``torch.autograd.graph.saved_tensors_hooks``;
weights excluded), with and without gradient checkpointing. The peak adds one block's
activations being recomputed / back-propagated. Streaming adds its K/V buffer (the window's
frames of keys and values in every block). What is not estimated is said (``not_estimated``).

:func:`plan` returns a dict; ``tcplug plan --config RECIPE [--gpu-memory 24GB]`` prints it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tcplug.errors import TcplugError

GiB = 2**30
#: what a process holds before any model: the CUDA context and kernels (GPU, typical), or the
#: interpreter with torch, Lightning and diffusers imported (CPU: measured by the planning process)
CUDA_RUNTIME = int(0.6 * GiB)
DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


def parse_bytes(text: str) -> int:
    """``"24GB"``, ``"80GiB"``, ``"139"`` (GiB) -> bytes (GB and GiB are both read as 2**30)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(g|gb|gib|m|mb|mib)?\s*", str(text).lower())
    if not m:
        raise TcplugError(f"--gpu-memory {text!r}: give a size such as 24GB or 80GiB")
    value = float(m.group(1))
    return int(value * (2**20 if (m.group(2) or "g").startswith("m") else GiB))


def precision_dtypes(precision: Any) -> tuple[torch.dtype | None, torch.dtype]:
    """Lightning's ``trainer.precision`` -> (the dtype parameters are cast to, or None when kept
    as built; the dtype activations are computed in)."""
    text = str(precision if precision is not None else "32-true").lower()
    key = "bf16" if "bf16" in text else "16" if text.startswith("16") else "64" if text.startswith("64") else "32"
    dtype = DTYPES[key]
    return (dtype if text.endswith("true") and key != "32" else None), dtype


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def component_bytes(module: nn.Module) -> dict[str, dict[str, int]]:
    """``{component: {"params", "bytes", "trainable", "trainable_bytes"}}`` for the module's
    top-level children (the diffusion model split into its experts, latent and conditioners)."""
    parts: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        if name == "diffusion":
            for sub, mod in child.named_children():
                if sub != "schedule":
                    parts["backbone" if sub == "experts" else sub] = mod
        else:
            parts[name] = child
    out = {}
    for name, mod in parts.items():
        params = list(mod.parameters())
        train = [p for p in params if p.requires_grad]
        total = sum(p.numel() for p in params)
        if total == 0 and not list(mod.buffers()):
            continue
        out[name] = {"params": total, "bytes": tensor_bytes(params) + tensor_bytes(mod.buffers()),
                     "trainable": sum(p.numel() for p in train), "trainable_bytes": tensor_bytes(train)}
    return out


def set_checkpointing(backbone: nn.Module, on: bool) -> bool:
    """Turn the backbone's gradient checkpointing on or off; False when it has none."""
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(model, "enable_gradient_checkpointing"):
        (model.enable_gradient_checkpointing if on else model.disable_gradient_checkpointing)()
        return True
    if hasattr(backbone, "gradient_checkpointing") and isinstance(backbone.gradient_checkpointing, bool):
        backbone.gradient_checkpointing = on
        return True
    return False


def checkpointing_of(backbone: nn.Module) -> bool | None:
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(model, "is_gradient_checkpointing"):
        return bool(model.is_gradient_checkpointing)
    value = getattr(backbone, "gradient_checkpointing", None)
    return value if isinstance(value, bool) else None


@contextmanager
def counting_saved(exclude: set[int]):
    """Count the bytes autograd saves for backward (each storage once; ``exclude``: ids of the
    parameters, which are weights, not activations). Yields a one-item list with the total."""
    seen: dict[int, Tensor] = {}
    total = [0]

    def pack(t: Tensor) -> Tensor:
        base = t._base if t._base is not None else t
        if id(base) in exclude or id(t) in exclude or id(base) in seen:
            return t
        seen[id(base)] = base  # kept alive: ids stay unique while counting
        total[0] += base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def backbone_activations(backbone: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                         context: dict[str, Any]) -> int:
    """Bytes autograd saves in one training forward of ``backbone`` on latents ``shape`` (meta)."""
    backbone.to(dtype).train()
    exclude = {id(p) for p in backbone.parameters()}
    x = torch.zeros(shape, device="meta", dtype=dtype)
    t = torch.full((shape[0],), 500, device="meta", dtype=torch.long)
    with counting_saved(exclude) as total:
        out = backbone(x, t, context)
    return total[0] + tensor_bytes([out])


def _text_context(module, backbone, b: int, dtype: torch.dtype) -> dict[str, Any]:
    """The text states a family's backbone attends to (its conditioner's ``max_length`` tokens of
    ``text_dim``), or none."""
    text_dim = getattr(backbone, "text_dim", None)
    conds = list(getattr(module.diffusion, "conditioners", []) or [])
    length = next((int(c.max_length) for c in conds if getattr(c, "max_length", None)), None)
    if not text_dim or length is None:
        return {}
    return {"text": torch.zeros(b, length, text_dim, device="meta", dtype=dtype)}


def stream_buffer(backbone: nn.Module, tokens_per_frame: int, batch: int, dtype: torch.dtype) -> int | None:
    """Bytes of the streaming K/V buffer: the window's frames of keys and values in every block."""
    variants = getattr(backbone, "variants", None) or [getattr(b, "attention", None)
                                                       for b in getattr(backbone, "blocks", [])]
    total = 0
    for v in variants:
        if v is None or not getattr(v, "causal", False):
            return None
        try:
            window = v.memory()
        except NotImplementedError:
            return None
        frames = window if isinstance(window, int) else int(getattr(v, "window", 0) or 0) + 1
        total += 2 * batch * frames * tokens_per_frame * int(backbone.token_dim) * torch.finfo(dtype).bits // 8
    return total or None


def build_on_meta(cfg: dict):
    """The recipe's module built on the meta device (nothing allocated, no weight read)."""
    from tcplug.module import TCPlugModule
    from tcplug.recipe import instantiate

    with torch.device("meta"):
        return instantiate(cfg, classes={"model": TCPlugModule}).model


def plan(cfg: dict, gpu_memory: int | None = None, device: str = "gpu") -> dict[str, Any]:
    """Estimate the peak memory of one training step of the recipe ``cfg`` (resolved) on one
    ``device`` (``gpu`` or ``cpu``); with ``gpu_memory`` (bytes) say whether it fits and which
    levers would make it fit. Sizes in bytes."""
    module = build_on_meta(cfg)
    before = rss_bytes()  # torch, Lightning and the components' libraries imported; the module is on meta
    data = cfg.get("data") or {}
    trainer = cfg.get("trainer") or {}
    frames, size, batch = int(data.get("frames") or 8), int(data.get("size") or 32), int(data.get("batch_size") or 1)
    cast, compute = precision_dtypes(trainer.get("precision"))
    if cast is not None:
        module.to(cast)
    for expert in module.diffusion.experts:  # a family backbone's storage_dtype, applied as at its first forward
        apply = getattr(expert, "apply_storage_dtype", None)
        if apply is not None:
            apply()
    parts = component_bytes(module)
    diffusion = module.diffusion
    backbone = diffusion.backbone
    shape = diffusion.latent_shape(batch, frames, size, size)
    patch = int(getattr(backbone, "patch_size", 1) or 1)
    tokens_per_frame = (shape[3] // patch) * (shape[4] // patch)
    tokens = shape[0] * shape[1] * tokens_per_frame
    context = _text_context(module, backbone, shape[0], compute)
    ckpt = checkpointing_of(backbone)
    acts: dict[bool, int] = {}
    for on in ([ckpt] if ckpt is None else [False, True]):
        if on is not None:
            set_checkpointing(backbone, on)
        acts[bool(on)] = backbone_activations(backbone, shape, compute, context)
    if ckpt is not None:
        set_checkpointing(backbone, ckpt)
    blocks = max(int(getattr(backbone, "num_blocks", 0) or 0), 1)
    block = (acts[False] - acts.get(True, 0)) / blocks if True in acts else acts[False] / blocks
    peak_acts = {on: int(a + 2 * block) for on, a in acts.items()}  # + one block recomputed and its gradients
    weights = sum(p["bytes"] for p in parts.values())
    trainable = sum(p["trainable_bytes"] for p in parts.values())
    runtime = CUDA_RUNTIME if device == "gpu" else before
    clip = batch * frames * 3 * size * size * 4
    lines = {"weights": weights, "gradients": trainable, "optimizer": 2 * trainable,
             "activations": peak_acts[bool(ckpt)], "batch": clip, "runtime": runtime}
    total = sum(lines.values())
    buffer = stream_buffer(backbone, tokens_per_frame, 1, compute)
    result: dict[str, Any] = {
        "device": device, "precision": str(trainer.get("precision", "32-true")),
        "clip": {"batch": batch, "frames": frames, "size": size, "latent": list(shape), "tokens": tokens},
        "components": parts, "gradient_checkpointing": ckpt,
        "activations_saved": {("checkpointing" if on else "none"): a for on, a in acts.items()},
        "activation_bytes_per_token": {("checkpointing" if on else "none"): a / tokens for on, a in peak_acts.items()},
        "lines": lines, "total": total, "stream_kv_buffer": buffer,
        "not_estimated": ["activations of components other than the backbone (conditioner adapters, the "
                          "discriminator, perceptual features, the VAE encoder when pixels are encoded live)",
                          "allocator fragmentation"],
    }
    if gpu_memory is not None:
        result["gpu_memory"] = gpu_memory
        result["fits"] = total <= gpu_memory
        result["levers"] = levers(result, backbone, gpu_memory)
    return result


def levers(result: dict[str, Any], backbone: nn.Module, budget: int) -> list[dict[str, Any]]:
    """What would bring the estimate under ``budget``, each with its estimated saving (bytes), in
    the order a user would try them."""
    lines, out = result["lines"], []
    acts = result["activations_saved"]
    parts = result["components"]
    frozen = sum(p["bytes"] - p["trainable_bytes"] for p in parts.values())
    if result["gradient_checkpointing"] is False and "checkpointing" in acts:
        saving = lines["activations"] - int(result["activation_bytes_per_token"]["checkpointing"] * result["clip"]["tokens"])
        out.append({"lever": "model.backbone.init_args.gradient_checkpointing: true", "saves": saving})
    if lines["gradients"] > 0.2 * lines["weights"]:
        out.append({"lever": "model.lora (train adapters only; the base is frozen)",
                    "saves": int(lines["gradients"] + lines["optimizer"])})
    if result["precision"].startswith("32"):
        out.append({"lever": "trainer.precision: bf16-mixed and the backbone's dtype: bfloat16", "saves": lines["weights"] // 2})
    if frozen:
        out.append({"lever": "model.backbone.init_args.storage_dtype: float8_e4m3fn (frozen weights stored in fp8, "
                             "computed in bf16)", "saves": frozen // 2 if result["precision"].startswith("bf16") else frozen * 3 // 4})
    per_gpu = lines["weights"] + lines["gradients"] + lines["optimizer"]
    out.append({"lever": "trainer.strategy: FSDP over N GPUs (weights, gradients and optimizer state / N)",
                "saves": int(per_gpu * 0.5), "per": "2 GPUs"})
    over = result["total"] - budget
    for lever in out:
        lever["enough"] = lever["saves"] >= over
    return out


def report(result: dict[str, Any]) -> str:
    """The plan as text."""
    def g(b: float) -> str:
        return f"{b / GiB:7.2f} GiB"

    c = result["clip"]
    lines = [f"clip: {c['batch']} x {c['frames']} frames of {c['size']}x{c['size']} -> latents {tuple(c['latent'])}, "
             f"{c['tokens']} tokens; precision {result['precision']}; gradient checkpointing "
             f"{ {True: 'on', False: 'off', None: 'n/a'}[result['gradient_checkpointing']] }", "components:"]
    for name, p in result["components"].items():
        lines.append(f"  {name:<14} {p['params'] / 1e6:10.1f} M params {g(p['bytes'])}  trainable {p['trainable'] / 1e6:.1f} M")
    lines.append(f"estimate for one training step on one {result['device'].upper()}:")
    for name, b in result["lines"].items():
        lines.append(f"  {name:<14} {g(b)}")
    lines.append(f"  {'total':<14} {g(result['total'])}")
    for mode, per in result["activation_bytes_per_token"].items():
        lines.append(f"activations per token ({'with' if mode == 'checkpointing' else 'without'} gradient "
                     f"checkpointing): {per / 2**10:.1f} KiB")
    if result["stream_kv_buffer"] is not None:
        lines.append(f"streaming K/V buffer (sampling, one video): {g(result['stream_kv_buffer'])}")
    if "fits" in result:
        lines.append(f"{'fits' if result['fits'] else 'does not fit'} in {g(result['gpu_memory']).strip()}")
        if not result["fits"]:
            lines.append("levers (estimated saving each):")
            for lever in result["levers"]:
                lines.append(f"  - {lever['lever']}: {g(lever['saves']).strip()}{' (enough)' if lever['enough'] else ''}")
    lines.append("not estimated: " + "; ".join(result["not_estimated"]))
    return "\n".join(lines)


__all__ = ["build_on_meta", "component_bytes", "levers", "parse_bytes", "plan", "precision_dtypes", "report"]
