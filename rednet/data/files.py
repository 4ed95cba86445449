"""The user's own image files (visualize.py and predict.py ``images=``): finding them and reading one as a
model input."""

from __future__ import annotations

import glob
from pathlib import Path

import torch
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from rednet.data.transforms import IMAGE_ERRORS, MODES, open_image
from rednet.errors import DataError


def image_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the image files under the folder ``path`` (recursively,
    hidden entries skipped), sorted."""
    path = Path(path)
    kinds = ", ".join(IMG_EXTENSIONS)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"images={path}: no such file or folder; give an image file ({kinds}) or a folder of "
                        f"them, or leave images= out to draw the first validation images")
    found = _folder_images(path)
    if not found:
        raise DataError(f"images={path} holds no image files; the kinds read are {kinds}")
    return found


def load_image(path: Path, in_chans: int, image_size: int) -> torch.Tensor:
    """An image file as uint8 (C, H, W): grey or RGB as ``in_chans`` says, its shorter side resized
    to ``image_size`` (the aspect ratio kept, so nothing is cropped away). A file that is not a
    readable image is a DataError naming it."""
    if in_chans not in MODES:
        raise DataError(f"the model takes {in_chans}-channel input and only grey (1) or RGB (3) image files can be "
                        f"read for it")
    try:
        image = open_image(str(path), MODES[in_chans])
    except IMAGE_ERRORS as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {reason}); give image files "
                        f"({', '.join(IMG_EXTENSIONS)})") from None
    return transforms.functional.pil_to_tensor(transforms.Resize(image_size)(image))


GLOB_CHARS = set("*?[")


def find_images(spec) -> list[Path]:
    """predict.py ``images=``: a file, a folder (searched recursively), a glob (``photos/*.jpg``,
    ``photos/**/*.png``) or a list of any of them, as the image files they name, in that order
    (each folder's and each glob's sorted), each once. A file named outright is taken whatever its
    suffix (it is read, or reported unreadable); folders and globs keep image files only."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    kinds = ", ".join(IMG_EXTENSIONS)
    if not specs:
        raise DataError("images= is empty; give an image file, a folder, a glob such as 'photos/*.jpg', or a "
                        "list [a.jpg,b.png]")
    found: dict[Path, None] = {}
    for item in specs:
        item = str(item)
        path = Path(item).expanduser()
        if path.is_file():
            found.setdefault(path)
        elif path.is_dir():
            found.update((file, None) for file in _folder_images(path) if file not in found)
        elif GLOB_CHARS & set(item):
            for match in sorted(glob.glob(str(path), recursive=True)):
                match = Path(match)
                if match.is_dir():
                    found.update((file, None) for file in _folder_images(match) if file not in found)
                elif match.suffix.lower() in IMG_EXTENSIONS:
                    found.setdefault(match)
        else:
            raise DataError(f"images={item}: no such file or folder; give an image file, a folder, a glob such as "
                            f"'photos/*.jpg', or a list [a.jpg,b.png]")
    if not found:
        raise DataError(f"images={_shown(spec)} matched no image files; the kinds read are {kinds}")
    return list(found)


def _folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, hidden entries skipped, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _shown(spec) -> str:
    return str(spec) if isinstance(spec, (str, Path)) else "[" + ",".join(str(s) for s in spec) + "]"
