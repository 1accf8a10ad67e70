"""Resuming and run folders: ``--ckpt_path last``, a resumed run's settings against its
checkpoint's, and a run folder of its own for every run, however many start at once."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from tcplug.errors import TcplugError

#: what a resumed run keeps from its checkpoint: a change here would not continue the same model
#: (its weights, its objective's parameterisation, which weights train, the warm-up's schedule)
FIXED = ("backbone", "latent", "discriminator", "router", "conditioner", "motion_lock", "noise", "prediction_type",
         "num_train_timesteps", "beta_schedule", "shift", "lora", "train_experts", "warmup_steps")


def _logger_args(cfg) -> dict:
    logger = cfg.get("trainer", {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger.get("init_args", {}) if hasattr(logger, "get") else {}


def resolve_last_checkpoint(cfg) -> None:
    """``--ckpt_path last``: resume the newest run folder of this recipe's logger, in place.

    Lightning looks for ``last.ckpt`` only in the *new* run's folder (an empty
    ``version_N+1``); here ``last`` becomes the newest ``runs/<name>/version_*/checkpoints/
    last.ckpt`` and the logger continues writing into that folder, so a resumed run keeps one
    folder. Without any ``last.ckpt`` the run starts fresh (with a message). A checkpoint inside
    a run folder (validate/test/predict, or a resume) writes into that folder too.
    """
    args = _logger_args(cfg)
    path = cfg.get("ckpt_path")
    save_dir, name = args.get("save_dir"), args.get("name")
    if path and path != "last" and args.get("version") is None:
        ckpt = Path(path).resolve()
        m = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name) if ckpt.parent.name == "checkpoints" else None
        if m and save_dir and name is not None and ckpt.parent.parent.parent == Path(save_dir, name).resolve():
            args["version"] = int(m.group(1))
    if path != "last" or not save_dir or name is None:
        return  # no versioned run folder: let Lightning resolve it
    found = []
    for ckpt in Path(save_dir, name).glob("version_*/checkpoints/last.ckpt"):
        m = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name)
        if m:
            found.append((int(m.group(1)), ckpt))
    if not found:
        print(f"tcplug: no {save_dir}/{name}/version_*/checkpoints/last.ckpt to resume: starting fresh",
              file=sys.stderr)
        cfg["ckpt_path"] = None
        return
    version, ckpt = max(found)
    cfg["ckpt_path"] = str(ckpt)
    args["version"] = version
    print(f"tcplug: resuming {ckpt}", file=sys.stderr)


def reserve_run_folder(cfg) -> Path | None:
    """Give a new run a ``version_N`` folder of its own, made atomically (``mkdir`` fails for the
    second of two runs that pick the same N, which takes the next), and fix the logger's version
    to it; returns the folder (None when the logger names no versioned folder, the version is
    given, or this process is a rank that a launcher started: the launching process reserved)."""
    args = _logger_args(cfg)
    save_dir, name = args.get("save_dir"), args.get("name")
    if not save_dir or name is None or args.get("version") is not None or "version" not in args:
        return None
    if any(v in os.environ for v in ("LOCAL_RANK", "RANK")):
        return None
    root = Path(save_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken) + 1 if taken else 0
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    args["version"] = version
    return root / f"version_{version}"


def _differs(a: Any, b: Any) -> bool:
    """Whether the asked setting ``a`` differs from the checkpoint's ``b``. A key the checkpoint's
    recipe does not have at all (a setting added to tcplug since it was written, at its default
    now) is no difference: an old checkpoint stays resumable."""
    if isinstance(a, dict) and isinstance(b, dict):
        return any(_differs(a.get(k), b[k]) for k in b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(b, key=str):
            if _differs(a.get(key), b[key]):
                return _first_difference(a.get(key), b[key], f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if _differs(x, y):
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where} is {b!r} in the checkpoint, {a!r} now"


def compare_with_checkpoint(asked: dict, ckpt: dict, path: str) -> dict[str, tuple[Any, Any]]:
    """What a resumed run asks of its model (``asked``, the recipe's ``model`` section as given)
    against what its checkpoint was trained with: the settings it changes that a resume can apply
    (returned as ``{key: (asked, the checkpoint's)}``: learning rates, optimizer settings, gradient
    clipping, the sampler, validation, guidance, the loss terms), and an error naming each change
    it cannot (:data:`FIXED`: the model's components and parameterisation)."""
    from tcplug.checkpoint import parse_recipe

    text = ckpt.get("tcplug_config")
    saved = parse_recipe(text, path).get("model") or {} if text else {}
    refused, applied = [], {}
    for key in sorted(set(saved) | set(asked)):
        a, b = asked.get(key), saved.get(key)
        if key not in saved or not _differs(a, b):
            continue
        if key in FIXED:
            refused.append(_first_difference(a, b, f"model.{key}"))
        else:
            applied[key] = (a, b)
    if refused:
        raise TcplugError(f"cannot resume {path}: the checkpoint was trained with another model "
                          f"({'; '.join(refused)}). Resume it with the recipe it was trained with (it is inside: "
                          "`tcplug sample --ckpt` needs nothing else), or start a new run")
    return applied


__all__ = ["FIXED", "compare_with_checkpoint", "reserve_run_folder", "resolve_last_checkpoint"]
