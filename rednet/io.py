"""Every file a run writes, and every checkpoint it reads, goes through here.

The one guarantee for writes: the bytes go to a temporary file in the same folder, are fsynced, and
replace the target with an atomic rename; then the folder is fsynced, so that the rename itself
survives a power cut. A reader sees the old file or the new one, never a part; a crash, a full disk
or a second Ctrl-C leaves the old file in place and no temporary file behind.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a file from elsewhere cannot run
code on load. This module sits below everything else in the package and imports none of it but
:mod:`rednet.errors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from rednet.errors import CheckpointError, WriteError

Content = bytes | str | Callable[[IO[bytes]], None]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _reason(error: BaseException) -> str:
    # torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer, raised
    # while handling the OSError that says why.
    cause = error if isinstance(error, OSError) else error.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _write_temporary(tmp: Path, content: Content) -> None:
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())


def previous_path(path: str | Path) -> Path:
    """Where the file that ``path`` replaced is kept with ``keep_previous``: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def atomic_write(path: str | Path, content: Content, what: str = "", keep_previous: bool = False) -> Path:
    """Writes ``content`` (bytes, text, or a function that writes into a binary file) to ``path``.

    With ``keep_previous`` the file being replaced stays as :func:`previous_path`. A failure raises
    :class:`~rednet.errors.WriteError` naming ``what`` and ``path`` and saying what is left there.
    """
    return atomic_write_all({path: content}, what, keep_previous)[0]


def atomic_write_all(files: dict[str | Path, Content], what: str = "", keep_previous: bool = False) -> list[Path]:
    """Writes several files as one: every temporary file is written and fsynced before the first
    rename, so a failure while writing (a full disk) leaves all the old files as they were. An
    ONNX model and its sidecar go together this way."""
    paths = [Path(p) for p in files]
    temporaries = [_temporary(p) for p in paths]
    existed = [p.exists() for p in paths]
    renamed: list[Path] = []
    try:
        for path, tmp, content in zip(paths, temporaries, files.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_temporary(tmp, content)
        for path, tmp in zip(paths, temporaries):
            if keep_previous and path.exists():
                prev = previous_path(path)
                prev_tmp = _temporary(prev)
                try:  # a hard link keeps `path` in place until the rename below replaces it
                    os.link(path, prev_tmp)
                except OSError:
                    prev_tmp.write_bytes(path.read_bytes())
                os.replace(prev_tmp, prev)
            os.replace(tmp, path)
            renamed.append(path)
        for folder in {p.parent for p in paths}:
            _fsync_dir(folder)
    except (OSError, RuntimeError) as e:
        name = f"{what} {paths[0]}" if what else str(paths[0])
        kept = (f"the previous {what or 'file'} there is intact" if any(existed) else "nothing was written there") \
            if not renamed else f"{len(renamed)} of the {len(paths)} files were replaced"
        raise WriteError(f"could not write {name}: {_reason(e)}; {kept}") from e
    finally:  # gone after the renames; after a failure or a second Ctrl-C, the targets are untouched
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return paths


def link_replace(source: str | Path, target: str | Path, what: str = "") -> Path:
    """Makes ``target`` the file that ``source`` is now, atomically: a hard link, so that nothing is
    written twice, or a copy where the filesystem has no hard links. Files here are only ever
    replaced by a rename, never written in place, so a later replacement of ``source`` leaves
    ``target`` as it was."""
    source, target = Path(source), Path(target)
    tmp = _temporary(target)
    try:
        tmp.unlink(missing_ok=True)  # os.link does not overwrite
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src:
                _write_temporary(tmp, lambda f: shutil.copyfileobj(src, f))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        kept = f"the previous {what or 'file'} there is intact" if target.exists() else "nothing was written there"
        raise WriteError(f"could not write {what + ' ' if what else ''}{target}: {_reason(e)}; {kept}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def atomic_open(path: str | Path, what: str = "") -> Iterator[IO[bytes]]:
    """A binary file to write ``path`` through, for writers that stream (a tar shard, a figure):
    ``path`` appears, whole, only when the block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        kept = f"the previous {what or 'file'} there is intact" if path.exists() else "nothing was written there"
        raise WriteError(f"could not write {what + ' ' if what else ''}{path}: {_reason(e)}; {kept}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def to_json(obj: Any) -> str:
    """``obj`` as strict JSON: a NaN or infinite number (a diverged loss) becomes null, which every
    JSON parser reads, where Python's default NaN is not JSON at all."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def write_json(path: str | Path, obj: Any, what: str = "") -> Path:
    return atomic_write(path, to_json(obj) + "\n", what)


def save_checkpoint(obj: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Writes ``obj`` with ``torch.save``; the checkpoint it replaces stays as ``<name>.prev.pt``."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f), "checkpoint", keep_previous)
    except WriteError as e:
        raise CheckpointError(str(e)) from e.__cause__


def link_checkpoint(source: str | Path, target: str | Path) -> Path:
    """``target`` (``best.pt``) becomes the checkpoint ``source`` (``last.pt``) holds, without writing it again."""
    try:
        return link_replace(source, target, "checkpoint")
    except WriteError as e:
        raise CheckpointError(str(e)) from e.__cause__


def _other_copy(path: Path) -> str:
    prev = previous_path(path)
    return f"; use the previous checkpoint {prev}" if prev.is_file() else "; copy it again or use another checkpoint"


# What torch.save writes: a zip archive, or (before torch 1.6, and with _use_new_zipfile_serialization=False)
# a pickle, which starts with the PROTO opcode.
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", b"\x80"


def _check_format(path: Path) -> None:
    """A file torch.save did not write, or one cut short, said as such before torch reads it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written or copied"
                              f"{_other_copy(path)}")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise CheckpointError(f"{path} is not a checkpoint: torch.save did not write it; pass a .pt/.pth file, e.g. "
                              f"a run's checkpoints/best.pt")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):  # a zip's directory is at its very end
        raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes, its end is missing): it was cut off "
                              f"while being written or copied{_other_copy(path)}")


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
    _check_format(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} contains Python objects other than tensors and plain containers; refusing "
                f"to load it because unpickling them could run code. Re-save it as a plain state_dict") from None
        raise CheckpointError(f"checkpoint {path} is damaged: it cannot be read as a PyTorch file"
                              f"{_other_copy(path)}") from None
    except Exception:  # anything else the unpickler meets in a damaged file: EOFError, KeyError, ...
        # The reader's own words (zip internals, a pickle opcode as a KeyError) mean nothing to the user.
        raise CheckpointError(f"checkpoint {path} is damaged: it cannot be read as a PyTorch file"
                              f"{_other_copy(path)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj
