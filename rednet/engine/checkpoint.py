"""Checkpoint IO: atomic writes that survive a crash at any moment, and reads that never run code.

A checkpoint is a plain dict of tensors, numbers, strings and containers, so it loads with
``torch.load(..., weights_only=True)``: a file from elsewhere cannot execute anything on load.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from rednet.errors import CheckpointError


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Writes ``obj`` to ``path`` so that ``path`` is whole at every moment.

    The bytes go to a temporary file in the same folder, are fsynced, and replace ``path`` with an
    atomic rename. The file being replaced stays as ``<name>.prev.pt``. If the write fails (a full
    disk, say), the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            prev = previous_path(path)
            prev_tmp = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
            # A hard link keeps `path` in place until the rename below replaces it.
            try:
                os.link(path, prev_tmp)
            except OSError:
                prev_tmp.write_bytes(path.read_bytes())
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer,
        # raised while handling the OSError that says why.
        cause = e if isinstance(e, OSError) else e.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e).splitlines()[0]
        kept = "the previous checkpoint there is intact" if existed else "nothing was written there"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from e
    finally:  # gone after the rename; after a failure or a second Ctrl-C, `path` is untouched
        tmp.unlink(missing_ok=True)
    return path


def _other_copy(path: Path) -> str:
    prev = previous_path(path)
    return f"; the previous checkpoint is {prev}" if prev.is_file() else "; use another copy"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint file with ``weights_only=True``, turning every failure into one clear line."""
    path = Path(path)
    if path.is_dir():
        inside = [p for folder in (path / "checkpoints", path) for p in (folder / "best.pt", folder / "last.pt")
                  if p.is_file()]
        hint = (f"pass the file in it: {inside[0]}" + (f" (or {inside[1]})" if len(inside) > 1 else "")
                if inside else "pass a checkpoint file, e.g. a run's checkpoints/best.pt")
        raise CheckpointError(f"checkpoint {path} is a directory, not a file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (ckpt=... or resume=...)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains Python objects other than tensors and plain containers; refusing "
                f"to load it because unpickling them could run code. Re-save it as a plain state_dict") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({e}){_other_copy(path)}") from None
    except Exception as e:  # anything else the unpickler meets in a damaged file: EOFError, KeyError, ...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a PyTorch file "
                              f"({reason}){_other_copy(path)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj
