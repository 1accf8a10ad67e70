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


def apply_settings(module) -> None:
    """Give the module's optimizers its current settings (learning rates with their groups'
    ``lr_scale``, betas, weight decay; the discriminator's own), where they differ from what the
    optimizers hold: after a resume, Lightning restores the checkpoint's. Nothing changes when the
    settings are the checkpoint's, so such a resume stays bit-identical."""
    optimizers = module.optimizers(use_pl_optimizer=False)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    schedulers = module.lr_schedulers()
    schedulers = schedulers if isinstance(schedulers, list) else [] if schedulers is None else [schedulers]
    disc = {id(p) for p in module.discriminator.parameters()} if module.discriminator is not None else set()
    wanted = [(optimizers[0], [g.get("lr", module.lr) for g in param_groups(module, module.lr, disc)],
               module.betas, module.weight_decay, schedulers[0] if schedulers else None)]
    if len(optimizers) > 1:
        wanted.append((optimizers[1], [module.disc_lr] * len(optimizers[1].param_groups), module.disc_betas, 0.0, None))
    for opt, lrs, betas, decay, sched in wanted:
        for i, (group, lr) in enumerate(zip(opt.param_groups, lrs)):
            held = sched.base_lrs[i] if sched is not None else group["lr"]
            if held != lr:
                if sched is not None:
                    sched.base_lrs[i] = group["initial_lr"] = lr
                    group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
                else:
                    group["lr"] = lr
            if tuple(group.get("betas", betas)) != tuple(betas):
                group["betas"] = tuple(betas)
            if group.get("weight_decay", decay) != decay:
                group["weight_decay"] = decay


__all__ = ["Warmup", "adamw", "apply_settings", "param_groups"]
