"""Images in and out of the figures: reading the user's image files, undoing the data's
normalisation for display, and writing a figure as a PNG atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from rednet.errors import DataError


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100, close: bool = True) -> Path:
    """Writes ``fig`` to ``path`` as a PNG (a temporary file, then a rename), and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if close:
            pyplot().close(fig)
    return path


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised (C, H, W) tensor as the (H, W, C) array in [0, 1] that was normalised."""
    mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] to (H, W) luminance, for an image under a colour map."""
    if image.shape[2] == 1:
        return image[:, :, 0]
    return image[:, :, :3] @ np.array([0.299, 0.587, 0.114], dtype=image.dtype)


def show(ax, image: np.ndarray) -> None:
    """Draws an (H, W, C) image in [0, 1], pixels as squares (an 8x8 digit stays legible)."""
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


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


def load_image(path: Path, in_chans: int, image_size: int, mean, std) -> torch.Tensor:
    """An image file as the model's input: grey or RGB as ``in_chans`` says, its shorter side resized
    to ``image_size`` (the aspect ratio kept, so nothing is cropped away), normalised with ``mean``
    and ``std``. A file that is not a readable image is a DataError naming it."""
    from rednet.data.transforms import IMAGE_ERRORS, MODES, open_image

    if in_chans not in MODES:
        raise DataError(f"images=: the model takes {in_chans}-channel input and only grey (1) or RGB (3) image "
                        f"files can be read for it")
    try:
        image = open_image(str(path), MODES[in_chans])
    except IMAGE_ERRORS as e:
        reason = " ".join(str(e).split())
        raise DataError(f"images=: {path} is not a readable image ({type(e).__name__}: {reason}); give image "
                        f"files ({', '.join(IMG_EXTENSIONS)})") from None
    to_input = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(),
                                   transforms.Normalize(list(mean), list(std))])
    return to_input(image)
