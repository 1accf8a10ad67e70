"""The model the sampling benchmarks time: a checkpoint's, or the full.yaml-sized dit."""

from __future__ import annotations

import torch


def load_model(ckpt: str | None, smoke: bool):
    """``(model, chunk, size)``: from a checkpoint (its recipe inside), else a random-weight dit
    with cross_frame window 2 + anchor (sampling speed and memory do not depend on weights)."""
    import tcplug
    from tcplug.module import TCPlugModule

    if ckpt:
        model = TCPlugModule.from_checkpoint(ckpt)
        return model, int(model.recipe["data"]["frames"]), int(model.recipe["data"]["size"])

    torch.manual_seed(0)
    att = tcplug.get_component("attention", "cross_frame")(window=2, anchor=True)
    dim, depth, size, chunk = (32, 1, 16, 4) if smoke else (96, 4, 32, 8)
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=4, dim=dim, depth=depth, heads=4,
                                                  attention=att)
    return TCPlugModule(backbone=net).eval(), chunk, size
