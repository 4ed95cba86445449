"""Reading an image file safely, and the ImageNet-style train and val transforms, on uint8.

Every transform takes a *source*, a path to an image file or the encoded bytes of one (a member of
a packed shard), and returns a contiguous uint8 tensor (channels, size, size). Normalisation happens
on the device, after the batch has crossed (:mod:`rednet.engine.feed`): uint8 is a quarter of
float32's bytes through the loader workers' shared memory and PCIe.

How it is fast (``scripts/bench_data.py`` measures each step against torchvision's reference: PIL
decode, RandomResizedCrop, ToTensor, Normalize), with the same output distribution:

- JPEGs decode with simplejpeg (libjpeg-turbo's TurboJPEG API): about 1.3x PIL's decoder per core,
  with bit-identical pixels (the same library, IDCT and upsampling). PNG and other formats, CMYK
  JPEGs, the "L" mode, files that TurboJPEG refuses, and every JPEG when simplejpeg is not
  installed, go through PIL, as in the reference.
- The crop box comes from torchvision's own sampler, with the same draws from torch's global
  generator in the same order, so a seed gives the reference's boxes and flips exactly.
- Crop and resize run on uint8 (H, W, C) memory, in torch's antialiased bilinear kernel for uint8
  (about 3x PIL's resize), within one grey level of PIL's result. Nothing becomes float on the CPU.
- Not kept (measured in the benchmark): decoding at 1/2-1/8 scale in the DCT domain (PIL's
  ``draft()``). It never applies to ImageNet's typical 500 x 375 pictures at 224 px (the crop is
  rarely twice the output), saves about a fifth of the decode where it does, and sharpens the
  result: a mean difference of 0.24 grey levels and up to 31 from the reference's pixels.

EXIF orientation is ignored, as torchvision's reference does (and ImageNet's published numbers):
PIL and simplejpeg both decode the stored pixels as they are.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Union

import torch
from PIL import Image, ImageFile
from torchvision import transforms
from torchvision.transforms.v2 import functional as F

from rednet.errors import DataError

try:  # optional: the fast JPEG decoder (pip install simplejpeg); without it, PIL decodes JPEGs too
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests/test_transforms.py
    simplejpeg = None

Source = Union[str, os.PathLike, bytes, Image.Image]  # a file, its bytes, or an image already open

# What PIL (and simplejpeg, ValueError) raise on a file that is not a whole, decodable image
# (UnidentifiedImageError and "image file is truncated" are OSErrors; some broken headers raise
# SyntaxError or ValueError; PIL's warning about a large image is an exception too where warnings
# are errors).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
MODES = {1: "L", 3: "RGB"}  # in_chans -> PIL mode
# PIL's default limit against decompression bombs (a small file that decodes to gigabytes). PIL
# only warns between one and two times it, and a user or a library may have lifted it; here it
# always applies.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop defaults
JPEG_MAGIC = b"\xff\xd8\xff"
# The JPEGs that simplejpeg decodes to RGB exactly as PIL's convert("RGB") does (bit-identical:
# the same libjpeg-turbo IDCT and upsampling); CMYK and YCCK (Adobe) JPEGs go to PIL, whose CMYK ->
# RGB conversion is the reference's, and so does "L": TurboJPEG's grey is the stored luma, which
# differs from PIL's convert("L") of the decoded colours by up to 12 levels where colours clip.
SIMPLEJPEG_SPACES = {"YCbCr", "Gray", "RGB"}
# A stand-in image for torchvision's crop sampler, which reads only the shape of what it is given.
_SHAPE = torch.empty(1, 1, 1)


def check_pixels(width: int, height: int) -> None:
    """Refuses a decompression bomb from its header's size, before anything is decoded."""
    if width * height > MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{width} x {height} pixels is more than the {MAX_IMAGE_PIXELS} allowed against decompression bombs")


def _read(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as file:
        return file.read()


def open_image(source: Source, mode: str) -> Image.Image:
    """The whole image in ``mode`` ("RGB" or "L"), or one of :data:`IMAGE_ERRORS`."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:  # the header only
        check_pixels(image.width, image.height)
        return _convert(image, mode)


def _convert(image: Image.Image, mode: str, copy: bool = True) -> Image.Image:
    # load() decodes the whole file, so a truncated one fails here, unless someone set
    # LOAD_TRUNCATED_IMAGES: then PIL would fill the rest with grey and the label would still apply.
    allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        image.load()
        return image if image.mode == mode and not copy else image.convert(mode)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``short``, rounded as torchvision's ``Resize(short)``."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


class _Decoder:
    """One encoded image: its size from the header first (checked against bombs), then its pixels."""

    def __init__(self, source: Source, mode: str) -> None:
        self.mode, self.image = mode, None
        if isinstance(source, Image.Image):
            self.data, self.image = b"", source
            self.height, self.width = source.height, source.width
            check_pixels(self.width, self.height)
            return
        self.data = _read(source)
        space = None
        if simplejpeg is not None and mode == "RGB" and self.data.startswith(JPEG_MAGIC):
            try:
                self.height, self.width, space, _ = simplejpeg.decode_jpeg_header(self.data)
            except ValueError:  # a header TurboJPEG cannot read: PIL decides, as in the reference
                pass
        if space not in SIMPLEJPEG_SPACES:
            self.image = Image.open(io.BytesIO(self.data))  # the header only
            self.height, self.width = self.image.height, self.image.width
        check_pixels(self.width, self.height)

    def pixels(self) -> torch.Tensor:
        """(C, H, W) uint8 over (H, W, C) memory, the layout torch's fast uint8 resize works in."""
        if self.image is None:
            try:
                array = simplejpeg.decode_jpeg(self.data, "RGB")
                return torch.from_numpy(array).permute(2, 0, 1)
            except ValueError:
                # TurboJPEG is stricter than PIL (it refuses "extraneous bytes before marker" and
                # other recoverable damage): PIL accepts or refuses the file, as in the reference.
                self.image = Image.open(io.BytesIO(self.data))
        return transforms.functional.pil_to_tensor(_convert(self.image, self.mode, copy=False))


class TrainTransform:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) to ``size`` and a horizontal flip, drawn
    from torch's global generator (so loader workers are seeded by the DataLoader), in the same
    order and with the same draws as torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``."""

    def __init__(self, size: int, mode: str = "RGB") -> None:
        self.size, self.mode = size, mode

    @staticmethod
    def sample_box(height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a crop, by torchvision's own sampler, from the image size alone."""
        return transforms.RandomResizedCrop.get_params(_SHAPE.expand(1, height, width), list(SCALE), list(RATIO))

    def __call__(self, source: Source) -> torch.Tensor:
        decoder = _Decoder(source, self.mode)
        top, left, height, width = self.sample_box(decoder.height, decoder.width)
        crop = decoder.pixels()[:, top:top + height, left:left + width]
        out = F.resize(crop, [self.size, self.size], antialias=True)
        if torch.rand(1) < 0.5:
            out = out.flip(-1)
        return out.contiguous()


def eval_transform(cfg) -> ValTransform:
    """What one image goes through to be evaluated by a model trained on data ``cfg`` (a ``data``
    config node): the ImageFolder validation transform, which eval.py, predict.py and visualize.py
    share. Images of the training size (CIFAR's 32 px) pass through unchanged."""
    return ValTransform(cfg.image_size, cfg.val_resize or cfg.image_size, MODES[cfg.in_chans])


class ValTransform:
    """The shorter side resized to ``resize`` (antialiased), then the centre ``size`` x ``size``:
    torchvision's ``Resize(resize)`` + ``CenterCrop(size)``, with its rounding of both."""

    def __init__(self, size: int, resize: int, mode: str = "RGB") -> None:
        self.size, self.resize, self.mode = size, resize, mode

    def __call__(self, source: Source) -> torch.Tensor:
        decoder = _Decoder(source, self.mode)
        height, width = resized_size(decoder.height, decoder.width, self.resize)
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        out = F.resize(decoder.pixels(), [height, width], antialias=True)
        return out[:, top:top + self.size, left:left + self.size].contiguous()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 ``(images / 255 - mean) / std``, ``mean`` and ``std`` shaped to
    broadcast over the channels. ToTensor's division, then Normalize's subtraction and division:
    the reference's float32 values to the bit, not just to a rounding error."""
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (batch, channels, height, width), or one image (channels, height, width),
    normalised on the images' device as :class:`rednet.engine.feed.DeviceFeed` normalises a loader's."""
    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[-3] != len(mean):
        raise DataError(f"normalize_batch takes uint8 images of {len(mean)} channel(s), (batch,) channels, height, "
                        f"width; got {str(images.dtype).removeprefix('torch.')} of shape {tuple(images.shape)}")
    shape = (len(mean), 1, 1)
    return normalize(images, torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(shape),
                     torch.tensor(list(std), dtype=torch.float32, device=images.device).view(shape))
