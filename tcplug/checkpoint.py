"""Checkpoint writing that a kill cannot corrupt."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, flushes it to disk, then
    renames it over the target (``os.replace`` is atomic on POSIX and Windows).

    A process killed while writing (SIGKILL, out of memory, a node lost) leaves the previous
    ``last.ckpt`` intact and at most a ``.tmp`` file, which the next save removes. tcplug's CLI
    installs it in place of Lightning's default checkpoint IO.
    """

    suffix = ".tmp"

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
        with open(tmp, "wb") as f:
            self.write_bytes(f, buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

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
    from pathlib import Path

    from tcplug.errors import TcplugError

    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise TcplugError(f"{path}: not a readable checkpoint (not a complete PyTorch archive: truncated, or "
                          "another kind of file; `tcplug fit` writes RUN/checkpoints/last.ckpt)")
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
