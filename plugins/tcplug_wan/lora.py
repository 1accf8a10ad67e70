"""Wan LoRA adapters in the original Wan key layout (the Wan repository's module names, as
ComfyUI and most Wan LoRA files on the hub write them), beside diffusers' layout.

diffusers names a module after ``WanTransformer3DModel`` (``blocks.0.attn1.to_q``); the original
layout after the Wan repository's ``WanModel`` (``diffusion_model.blocks.0.self_attn.q``), with
``lora_down`` / ``lora_up`` for peft's ``lora_A`` / ``lora_B`` and one ``alpha`` scalar per module
(the update is ``(alpha / rank) up @ down``). diffusers' ``WanPipeline.load_lora_weights`` reads
both layouts.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from tcplug import TcplugError

PREFIX = "diffusion_model."
#: diffusers module name (after ``blocks.N.``, or at the top) -> the original Wan name
BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
TOP_NAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}
SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_KEY = re.compile(r"^(?:blocks\.(\d+)\.)?(.+)\.(lora_[AB]\.weight)$")


def _module(name: str, block: str | None, table_block: dict, table_top: dict) -> str:
    table = table_block if block is not None else table_top
    if name not in table:
        raise TcplugError(f"Wan LoRA: no original name for the module {'blocks.' + block + '.' if block else ''}{name} "
                          f"(known: {', '.join(table)})")
    return (f"blocks.{block}." if block is not None else "") + table[name]


def to_original(state: dict[str, Tensor], alpha: float | None = None) -> dict[str, Tensor]:
    """A peft state dict of ``WanTransformer3DModel`` (``blocks.0.attn1.to_q.lora_A.weight``) in
    the original layout (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``), with an
    ``alpha`` per module (default: its rank, i.e. the scale is already in ``lora_up``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise TcplugError(f"Wan LoRA: {key!r} is not a peft adapter key (MODULE.lora_A.weight / lora_B.weight)")
        block, name, suffix = m.groups()
        module = PREFIX + _module(name, block, BLOCK_NAMES, TOP_NAMES)
        out[f"{module}.{SUFFIX[suffix]}"] = value
        if suffix == "lora_A.weight":
            out[f"{module}.alpha"] = torch.tensor(float(alpha if alpha is not None else value.shape[0]))
    return out


def from_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_original`: diffusers' peft keys, ``alpha / rank`` folded into
    ``lora_B`` (a file whose alpha equals its rank comes back unchanged)."""
    block_back = {v: k for k, v in BLOCK_NAMES.items()}
    top_back = {v: k for k, v in TOP_NAMES.items()}
    suffix_back = {v: k for k, v in SUFFIX.items()}
    pattern = re.compile(r"^(?:blocks\.(\d+)\.)?(.+)\.(lora_down\.weight|lora_up\.weight)$")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        m = pattern.match(key.removeprefix(PREFIX))
        if m is None:
            raise TcplugError(f"Wan LoRA: {key!r} is not an original-layout adapter key")
        block, name, suffix = m.groups()
        module = _module(name, block, block_back, top_back)
        if suffix == "lora_up.weight":
            down = state[key.replace("lora_up.weight", "lora_down.weight")]
            alpha = state.get(key.replace("lora_up.weight", "alpha"))
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            value = (value.float() * scale).to(value.dtype)
        out[f"{module}.{suffix_back[suffix]}"] = value
    return out


__all__ = ["BLOCK_NAMES", "TOP_NAMES", "from_original", "to_original"]
