"""Checkpoints: writing that a kill cannot corrupt, reading that never unpickles code, and what
tcplug keeps in them: the recipe, the layout of the state-dict keys (and the one migration of
older layouts), the weights a local model folder holds (left out, filled in on load)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tcplug.errors import TcplugError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, flushes it to disk, then
    renames it over the target (``os.replace`` is atomic on POSIX and Windows).

    A process killed while writing (SIGKILL, out of memory, a node lost) leaves the previous
    ``last.ckpt`` intact and at most a ``.tmp`` file, which the next save removes. tcplug's CLI
    installs it in place of Lightning's default checkpoint IO.
    """

    suffix = ".tmp"

    def __init__(self) -> None:
        super().__init__()
        #: path -> the global step of the checkpoint this process last wrote there
        self.saved_steps: dict[str, int] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*{self.suffix}"):
            stale.unlink(missing_ok=True)  # left by a process killed mid-write
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.parent / f".{path.name}.{os.getpid()}{self.suffix}"
        try:
            with open(tmp, "wb") as f:
                self.write_bytes(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, a read-only folder: the last complete checkpoint stays
            tmp.unlink(missing_ok=True)
            kept = f"; {path} (the last complete checkpoint) is kept" if path.is_file() else ""
            raise TcplugError(f"cannot write the checkpoint {path}: {exc.strerror or exc}{kept}") from None
        self.saved_steps[str(path)] = int(checkpoint.get("global_step", -1))

    def write_bytes(self, f, data) -> None:
        """Write the serialized checkpoint (a seam for fault-injection tests)."""
        f.write(data)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Read with ``weights_only=True`` (never unpickles code); a pickled payload is refused
        with a clear message."""
        return load_checkpoint(path, map_location=map_location)


def load_checkpoint(path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    import pickle
    import re
    import zipfile

    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise TcplugError(f"{path}: not a readable checkpoint (not a complete PyTorch archive: truncated, or "
                          "another kind of file; `tcplug fit` writes RUN/checkpoints/last.ckpt)")
    if Path(path).is_file():  # every record of the archive carries a CRC; torch.load does not check them
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            damaged = f"the archive ({exc})"
        if damaged is not None:
            raise TcplugError(f"{path}: damaged: {damaged} does not match its checksum (the file changed after it "
                              "was written: a copy or a disk error); it was not used")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise TcplugError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it names {found.group(1)})" if found else ""
        raise TcplugError(  # torch's own text would suggest weights_only=False: never pass that on
            f"{path}: refused to load: the checkpoint carries pickled objects beyond tensors and plain "
            f"data, which could run code{what}"
        ) from None
    except Exception as exc:
        raise TcplugError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None


# ----- what tcplug keeps in a checkpoint --------------------------------------------------------
#: the module layout a checkpoint's state-dict keys follow (``tcplug_layout``). 1 (no stamp):
#: before the model moved into ``TCPlugModule.diffusion``; 2: ``diffusion.<component>...``.
LAYOUT = 2
#: state-dict prefixes that moved under ``diffusion.`` in layout 2
_MOVED_TO_DIFFUSION = ("latent.", "conditioners.", "router.", "experts.", "motion_lock.")
#: the checkpoint entries that hold state-dict keys
_KEYED = ("state_dict", "current_model_state")


def stamp_layout(checkpoint: dict[str, Any]) -> None:
    checkpoint["tcplug_layout"] = LAYOUT


def migrate(checkpoint: dict[str, Any]) -> None:
    """Bring an older checkpoint's state-dict keys to today's layout, in place: its ``state_dict``,
    the EMA callback's ``current_model_state`` and the ``tcplug_folder_weights`` list. The one
    place that knows old layouts; a checkpoint of today's layout is left as it is."""
    if checkpoint.get("tcplug_layout", 1) >= LAYOUT:
        return

    def moved(key: str) -> str:
        return f"diffusion.{key}" if key.startswith(_MOVED_TO_DIFFUSION) else key

    for entry in _KEYED:
        if isinstance(checkpoint.get(entry), dict):
            checkpoint[entry] = {moved(k): v for k, v in checkpoint[entry].items()}
    if checkpoint.get("tcplug_folder_weights"):
        checkpoint["tcplug_folder_weights"] = [moved(k) for k in checkpoint["tcplug_folder_weights"]]
    checkpoint["tcplug_layout"] = LAYOUT


def folder_weights(module) -> set[str]:
    """State-dict keys of frozen parameters that a component loaded from a local model folder
    (a component that did sets :attr:`~tcplug.Component.pretrained` to that folder), and the
    stored buffers of such a component when nothing in it trains (a VAE's latent statistics)."""
    from tcplug.kinds import Component

    keys: set[str] = set()
    own = set(module.state_dict())
    for prefix, sub in module.named_modules():
        if not isinstance(sub, Component) or not isinstance(sub.pretrained, str) or not sub.pretrained:
            continue
        frozen = True
        for name, p in sub.named_parameters():
            if not p.requires_grad:
                keys.add(f"{prefix}.{name}" if prefix else name)
            else:
                frozen = False
        if frozen:
            keys.update(k for name, _ in sub.named_buffers() if (k := f"{prefix}.{name}" if prefix else name) in own)
    return keys


def leave_out_folder_weights(module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen weights a model folder holds from ``checkpoint["state_dict"]``, listing
    them as ``tcplug_folder_weights`` (so a LoRA checkpoint of a 1.3 B model holds the adapters)."""
    skip = folder_weights(module)
    if skip:
        state = checkpoint.get("state_dict", {})
        for key in skip:
            state.pop(key, None)
        checkpoint["tcplug_folder_weights"] = sorted(skip)


def fill_folder_weights(module, checkpoint: dict[str, Any]) -> None:
    """Put back the weights a checkpoint left out, from those the components just loaded from
    their folders."""
    left_out = checkpoint.get("tcplug_folder_weights")
    if not left_out:
        return
    own = module.state_dict()
    missing = [k for k in left_out if k not in own]
    if missing:
        raise TcplugError(f"checkpoint leaves out {len(missing)} folder weights this model does not have "
                          f"(e.g. {missing[0]}): was it made with another recipe?")
    state = checkpoint.setdefault("state_dict", {})
    for key in left_out:
        state[key] = own[key]


def parse_recipe(text: str, where: str = "the checkpoint") -> dict:
    """The resolved recipe (YAML) a checkpoint carries, as a dict."""
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TcplugError(f"{where}: the recipe inside is not valid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise TcplugError(f"{where}: the recipe inside is not a mapping")
    return cfg


def load_weights(module, state_dict: dict[str, Any], path) -> None:
    """``module.load_state_dict(state_dict)``; weights the module's current layers cannot take (a
    component changed since the checkpoint at ``path`` was written) are a :class:`TcplugError`
    naming the tensors, not a traceback."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:4] if ln.strip()]
        raise TcplugError(f"{path}: its weights do not fit the model its recipe builds now (a component's "
                          f"layers changed since it was written?): {' '.join(lines)[:400]}") from None
