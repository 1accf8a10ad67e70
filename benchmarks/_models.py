"""The model the sampling benchmarks time: a checkpoint's, or the full.yaml-sized dit."""

from __future__ import annotations

import torch


def load_model(ckpt: str | None, smoke: bool, recipe: str | None = None):
    """``(model, chunk, size)``: from a checkpoint (its recipe inside), from a recipe (random
    weights; its attention made ``cross_frame`` window 2 + anchor, so that it streams), else a
    random-weight dit with that attention (sampling speed and memory do not depend on weights)."""
    import tcplug
    from tcplug.module import TCPlugModule

    if recipe:
        import contextlib
        import io

        import yaml

        from tcplug.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["fit", "--config", recipe, "--model.backbone.init_args.attention=cross_frame",
                      "--model.backbone.init_args.attention.init_args.anchor=true", "--print_config"])
            except SystemExit:
                pass
        cfg = yaml.safe_load(out.getvalue())
        torch.manual_seed(0)
        model = TCPlugModule.from_recipe(cfg).eval()
        return model, int(cfg["data"]["frames"]), int(cfg["data"]["size"])
    if ckpt:
        model = TCPlugModule.from_checkpoint(ckpt)
        return model, int(model.recipe["data"]["frames"]), int(model.recipe["data"]["size"])

    torch.manual_seed(0)
    att = tcplug.get_component("attention", "cross_frame")(window=2, anchor=True)
    dim, depth, size, chunk = (32, 1, 16, 4) if smoke else (96, 4, 32, 8)
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=4, dim=dim, depth=depth, heads=4,
                                                  attention=att)
    return TCPlugModule(backbone=net).eval(), chunk, size
