"""The shipped recipes as base + techniques: which resolved settings each technique owns, and the
configurations the ablation trains (plus-one: base + X; leave-one-out: full - X).

A resolved config (``tcplug fit --print_config``) is flattened to ``{path: value}`` where a list of
components (``model.losses``, ``model.conditioner``) becomes one entry per component,
``model.losses[flow_warp]``, so that adding or removing a term is a change of its own key.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: every technique's settings (flattened paths, see the module docstring). A path owned by several
#: techniques (the discriminator: the adversarial term trains it, the perceptual term reads its
#: trunk) stays while any of them is present.
TECHNIQUES: dict[str, tuple[str, ...]] = {
    "cross_frame": ("model.backbone.init_args.attention",),
    "flow_warp": ("model.losses[flow_warp]",),
    "perceptual_temporal": ("model.losses[perceptual_temporal]", "model.discriminator"),
    "adversarial": ("model.losses[adversarial]", "model.discriminator", "model.disc_lr"),
    "experts": ("model.router",),
    "world_model": ("model.conditioner[physics_state]",),
    "captions": ("model.conditioner[caption]", "model.guidance_scale"),
    "motion_lock": ("model.motion_lock", "model.lock_prob"),
    # the world model without privilege (the state estimated from the first frame): plus-one only
    "world_model_pixels": ("model.conditioner[pixel_state]",),
    # latent designs: not in `full` (measured as full + X)
    "two_tier": ("model.latent", "model.backbone.init_args.in_channels", "model.backbone.init_args.patch_size",
                 "model.losses[reconstruction]"),
    "video_ldm": ("model.latent", "model.backbone.init_args.in_channels", "model.backbone.init_args.patch_size",
                  "model.losses[reconstruction]", "model.losses[flow_warp]"),
}
#: the techniques `full` stacks
IN_FULL = ("cross_frame", "flow_warp", "perceptual_temporal", "adversarial", "experts", "world_model", "captions",
           "motion_lock")
#: techniques `full` does not hold that are measured on top of it too (full + X)
LATENT_DESIGNS = ("two_tier", "video_ldm")
#: settings every recipe may name differently (its run folder)
FREE = ("trainer.logger.init_args.name",)
#: list settings whose items are components, flattened per item
COMPONENT_LISTS = ("model.losses", "model.conditioner")


def short(class_path: str) -> str:
    """``tcplug_losses.FlowWarp`` -> ``flow_warp`` (the registry name); an unknown path is kept."""
    import importlib

    from tcplug.registry import get_registry

    module, _, name = class_path.rpartition(".")
    if not module:
        return class_path
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path
    return get_registry().name_of(cls) or class_path


#: components whose settings are compared one by one (any other component is one value)
OPEN_COMPONENTS = ("model.backbone", "trainer.logger")


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{path: value}`` of a resolved config (see the module docstring)."""
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if path in COMPONENT_LISTS:
            items = [] if value is None else value if isinstance(value, list) else [value]
            for item in items:
                out[f"{path}[{short(item['class_path'])}]"] = item
        elif isinstance(value, dict) and ("class_path" not in value or path in OPEN_COMPONENTS):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(flat: dict) -> dict:
    """The inverse of :func:`flatten` (component lists in the order of ``flat``)."""
    out: dict = {}
    for path, value in flat.items():
        parts = path.split(".")
        if parts[-1].endswith("]"):
            node = _node(out, parts[:-1])
            node.setdefault(parts[-1].split("[", 1)[0], []).append(value)
        else:
            _node(out, parts[:-1])[parts[-1]] = value
    for head in COMPONENT_LISTS:
        section, key = head.split(".")
        out.setdefault(section, {}).setdefault(key, None)
    return out


def _node(root: dict, parts: list[str]) -> dict:
    for p in parts:
        root = root.setdefault(p, {})
    return root


def resolve(*configs: str | Path) -> dict:
    """``tcplug fit --config C ... --print_config`` as a dict (in this process)."""
    import contextlib
    import io

    from tcplug.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        raise SystemExit(f"{' + '.join(map(str, configs))}: {err.getvalue().strip()[-500:]}")
    return yaml.safe_load(out.getvalue())


def owned(techniques) -> set[str]:
    """Every path the given techniques own."""
    return {p for t in techniques for p in TECHNIQUES[t]}


def differs(a: dict, b: dict) -> set[str]:
    """Paths where flattened configs ``a`` and ``b`` differ (present in one only included)."""
    return {k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")} - set(FREE)


def compose(base: dict, full: dict, techniques) -> dict:
    """A resolved config: ``base`` with the given techniques' settings taken from ``full`` (the
    techniques configured as in ``full``), component lists in ``full``'s order.

    Couplings: motion locking from the world model's rollout (``source: conditioning``) needs the
    world model; without it the lock reads the sample's own first pass (``source: first_pass``)."""
    fb, ff = flatten(base), flatten(full)
    keep = owned(techniques)
    flat = {}
    for path in list(ff) + [p for p in fb if p not in ff]:
        value = ff.get(path) if path in keep else fb.get(path, "<absent>")
        if path in keep and path not in ff:
            value = fb.get(path, "<absent>")
        if value != "<absent>":
            flat[path] = copy.deepcopy(value)
    lock = flat.get("model.motion_lock")
    if isinstance(lock, dict) and "world_model" not in techniques and \
            (lock.get("init_args") or {}).get("source") == "conditioning":
        lock["init_args"]["source"] = "first_pass"
    # keep base's order for non-component settings: rebuild from base's tree
    return _in_order(unflatten(flat), base)


def _in_order(cfg: dict, like: dict) -> dict:
    """``cfg`` with its keys in ``like``'s order where both have them."""
    if not isinstance(cfg, dict) or not isinstance(like, dict):
        return cfg
    out = {k: _in_order(cfg[k], like[k]) for k in like if k in cfg}
    out.update({k: v for k, v in cfg.items() if k not in out})
    return out


def write(cfg: dict, path: Path, name: str) -> Path:
    """Write a composed config as a recipe with run name ``name``."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("config", None)
    cfg["trainer"]["logger"]["init_args"]["name"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
