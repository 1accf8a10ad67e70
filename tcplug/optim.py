"""Optimizers: AdamW over parameter groups the components declare, the learning-rate warm-up,
and the discriminator's own optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tcplug.errors import TcplugError
from tcplug.kinds import Component


def param_groups(model: nn.Module, lr: float, exclude: set[int] = frozenset()) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters (those in ``exclude``, by id,
    left out): every parameter a component declares in :meth:`~tcplug.Component.param_groups`
    trains in a group of its own at ``lr * lr_scale`` (the first component to claim a parameter
    wins); the rest, in ``model.parameters()`` order, in the main group, which comes first."""
    seen = set(exclude)
    groups: dict[tuple, dict[str, Any]] = {}  # declarations with the same settings share a group
    for component in (m for m in model.modules() if isinstance(m, Component)):
        for group in component.param_groups():
            settings = {k: v for k, v in group.items() if k != "params"}
            scale = settings.pop("lr_scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
                raise TcplugError(f"{type(component).__name__}.param_groups(): lr_scale must be a number > 0, "
                                  f"got {scale!r}")
            params = [p for p in group["params"] if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            key = (float(scale), tuple(sorted(settings.items())))
            entry = groups.setdefault(key, {"params": [], "lr": lr * float(scale), **settings})
            entry["params"] += params
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [{"params": main}] + [g for g in groups.values() if g["params"]]


class Warmup:
    """Linear warm-up factor over ``steps`` optimizer steps (a class, not a lambda: picklable)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def adamw(groups: list[dict[str, Any]] | Any, lr: float, betas: tuple[float, float], weight_decay: float = 0.0,
          warmup_steps: int = 0):
    """``(optimizer, scheduler or None)``: AdamW with a linear warm-up over ``warmup_steps``."""
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup(warmup_steps)) if warmup_steps > 0 else None
    return opt, sched


__all__ = ["Warmup", "adamw", "param_groups"]
