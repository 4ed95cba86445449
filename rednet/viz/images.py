"""Images in and out of the figures: undoing the data's normalisation for display, drawing an
image on an axis, and writing a figure as a PNG atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rednet.io import atomic_open


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100, close: bool = True) -> Path:
    """Writes ``fig`` to ``path`` as a PNG through :func:`rednet.io.atomic_open`, and closes it."""
    path = Path(path)
    try:
        with atomic_open(path, "figure") as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
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
