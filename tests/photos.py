"""Photographs for the data-pipeline tests and ``scripts/bench_data.py``: JPEGs re-encoded from the two
real photographs that scikit-learn ships (china.jpg and flower.jpg, 640 x 427), at ImageNet-like
sizes and qualities, and a few files in the other formats the transforms must read right.

Noise decodes unlike a photograph (nothing for the entropy coder to gain, no smooth areas), so every
image here is a crop, flip or resize of a real photograph. Everything is deterministic: the same
call writes the same files.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

# (width, height) and how often each appears: ImageNet is mostly about 500 x 375 or 500 x 333, in
# both orientations, with a tail of larger pictures.
SIZES = ((500, 375), (500, 375), (500, 333), (375, 500), (500, 375), (640, 480), (800, 600), (1024, 768))
QUALITIES = (75, 80, 85, 90, 95)


@lru_cache(maxsize=1)
def _sources() -> tuple[Image.Image, ...]:
    return tuple(Image.fromarray(array) for array in load_sample_images().images)


def photo(index: int) -> tuple[Image.Image, int]:
    """The ``index``-th RGB photograph and its JPEG quality: a random crop of one of the two sources
    (flipped half the time), resized to one of :data:`SIZES`."""
    rng = np.random.default_rng(index)
    source = _sources()[index % 2]
    width, height = SIZES[index % len(SIZES)]
    # The largest crop of the target's aspect ratio that fits, shrunk by up to a quarter, somewhere in the source.
    fit = min(source.width / width, source.height / height) * rng.uniform(0.75, 1.0)
    crop_w, crop_h = width * fit, height * fit
    left, top = rng.uniform(0, source.width - crop_w), rng.uniform(0, source.height - crop_h)
    image = source.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, QUALITIES[int(rng.integers(len(QUALITIES)))]


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` JPEG photographs ``folder/photo_<index>.jpg``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        image, quality = photo(index)
        path = folder / f"photo_{index:05d}.jpg"
        path.write_bytes(jpeg_bytes(image, quality))
        paths.append(path)
    return paths


def write_imagefolder(root: Path, classes: int = 2, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """An ImageFolder tree ``root/{train,val}/class_<k>/photo_<index>.jpg`` of distinct photographs."""
    index = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            write_photos(root / split / f"class_{k}", per_class, start=index)
            index += per_class
    return root


def write_formats(folder: Path) -> dict[str, Path]:
    """One photograph in each format the transforms must read like PIL's ``convert(mode)``: an RGB
    JPEG and PNG, a greyscale JPEG and PNG, a CMYK JPEG (Adobe's inverted kind, as Photoshop writes
    it), an RGBA PNG with a gradient of transparency, a palette PNG and a 16-bit greyscale PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = photo(0)
    alpha = Image.linear_gradient("L").resize(image.size)
    made = {
        "rgb.jpg": (image, "JPEG"),
        "rgb.png": (image, "PNG"),
        "grey.jpg": (image.convert("L"), "JPEG"),
        "grey.png": (image.convert("L"), "PNG"),
        "cmyk.jpg": (image.convert("CMYK"), "JPEG"),
        "rgba.png": (Image.merge("RGBA", (*image.split(), alpha)), "PNG"),
        "palette.png": (image.quantize(64), "PNG"),
        "grey16.png": (image.convert("L").convert("I;16"), "PNG"),
    }
    paths = {}
    for name, (picture, fmt) in made.items():
        paths[name] = folder / name
        picture.save(paths[name], fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return paths
