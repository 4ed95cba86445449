"""The user's own image files (visualize.py ``images=``): finding them and reading one as a model input."""

from __future__ import annotations

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
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
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
