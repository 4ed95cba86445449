"""Reading an image file safely, and the ImageNet-style train and val transforms, on uint8.

Every transform takes a *source*, a path to an image file or the encoded bytes of one (a member of
a packed shard), and returns a uint8 tensor (channels, size, size). Normalisation happens on the
device, after the batch has crossed (:mod:`rednet.engine.feed`): uint8 is a quarter of float32's
bytes through the loader workers' shared memory and PCIe.

This first version is torchvision's reference pipeline, kept to the uint8 output; faster decoding
(scaled JPEG decoding, resizing uint8 tensors) replaces it where it measures faster with the same
output distribution (``scripts/bench_data.py``).
"""

from __future__ import annotations

import io
import os
from typing import Union

import torch
from PIL import Image, ImageFile
from torchvision import transforms

Source = Union[str, os.PathLike, bytes]

# What PIL raises on a file that is not a whole, decodable image (UnidentifiedImageError and
# "image file is truncated" are OSErrors; some broken headers raise SyntaxError or ValueError;
# PIL's warning about a large image is an exception too where warnings are errors).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
MODES = {1: "L", 3: "RGB"}  # in_chans -> PIL mode
# PIL's default limit against decompression bombs (a small file that decodes to gigabytes). PIL
# only warns between one and two times it, and a user or a library may have lifted it; here it
# always applies.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def open_image(source: Source, mode: str) -> Image.Image:
    """The whole image in ``mode`` ("RGB" or "L"), or one of :data:`IMAGE_ERRORS`."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:  # the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f"{image.width} x {image.height} pixels is more than the {MAX_IMAGE_PIXELS} allowed against "
                f"decompression bombs")
        # convert() decodes the whole file, so a truncated one fails here, unless someone set
        # LOAD_TRUNCATED_IMAGES: then PIL would fill the rest with grey and the label would still apply.
        allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            return image.convert(mode)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = allowed


class TrainTransform:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) to ``size`` and a horizontal flip, drawn
    from torch's global generator (so loader workers are seeded by the DataLoader)."""

    def __init__(self, size: int, mode: str = "RGB") -> None:
        self.size, self.mode = size, mode
        self.augment = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                           transforms.PILToTensor()])

    def __call__(self, source: Source) -> torch.Tensor:
        return self.augment(open_image(source, self.mode))


class ValTransform:
    """The shorter side resized to ``resize`` (antialiased), then the centre ``size`` x ``size``."""

    def __init__(self, size: int, resize: int, mode: str = "RGB") -> None:
        self.size, self.resize, self.mode = size, resize, mode
        self.prepare = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                                           transforms.PILToTensor()])

    def __call__(self, source: Source) -> torch.Tensor:
        return self.prepare(open_image(source, self.mode))
