"""rednet.data.transforms against torchvision's reference pipeline on real photographs (tests/photos.py)."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from scipy.stats import ks_2samp
from torchvision import transforms

import rednet.data.transforms as T
from tests.photos import jpeg_bytes, photo, write_formats, write_photos

SIZE, RESIZE = 224, 256
DECODERS = ["simplejpeg", "PIL"]


@pytest.fixture(params=DECODERS)
def decoder(request, monkeypatch):
    """Each test runs with simplejpeg and with the fallback that decodes every JPEG with PIL."""
    if request.param == "simplejpeg" and T.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    if request.param == "PIL":
        monkeypatch.setattr(T, "simplejpeg", None)
    return request.param


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    # All the sizes of tests/photos.py (500 x 375 up to 1024 x 768), qualities 75-95.
    return [str(path) for path in write_photos(tmp_path_factory.mktemp("photos"), 16)]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats"))


def reference_train(path: str, mode: str = "RGB") -> torch.Tensor:
    """torchvision's ImageNet training transform, stopped at uint8."""
    augment = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                                  transforms.PILToTensor()])
    return augment(Image.open(path).convert(mode))


def reference_val(path: str, mode: str = "RGB") -> torch.Tensor:
    prepare = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(SIZE), transforms.PILToTensor()])
    return prepare(Image.open(path).convert(mode))


def difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, int]:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    diff = (ours.int() - theirs.int()).abs()
    return diff.float().mean().item(), int(diff.max())


# ---- the crop box ----

@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (333, 500), (768, 1024), (224, 224), (40, 900)])
def test_crop_boxes_are_torchvisions_draw_for_draw(height, width):
    """The same generator state gives torchvision's own box, from the size alone (no image decoded),
    in both orientations and for the sampler's 10-try fallback (a 40 x 900 strip)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(200):
        torch.manual_seed(seed)
        ours = T.TrainTransform.sample_box(height, width)
        torch.manual_seed(seed)
        theirs = transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        assert tuple(ours) == tuple(theirs)


def test_crop_box_distribution_matches_torchvisions_sampler():
    """Area fraction and aspect ratio of 4,000 boxes against 4,000 of torchvision's (other draws):
    a two-sample KS test; p < 0.001 would say the distributions differ."""
    height, width = 375, 500
    torch.manual_seed(1)
    ours = np.array([T.TrainTransform.sample_box(height, width) for _ in range(4000)], dtype=float)
    torch.manual_seed(2)
    image = torch.zeros(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(4000)], dtype=float)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    area = [b[:, 2] * b[:, 3] / (height * width) for b in (ours, theirs)]
    aspect = [b[:, 3] / b[:, 2] for b in (ours, theirs)]
    assert ks_2samp(*area).pvalue > 1e-3
    assert ks_2samp(*aspect).pvalue > 1e-3
    assert 0.35 < np.median(area[0]) < 0.65 and area[0].min() >= 0.07


def test_flip_half_the_time():
    """Horizontal flips at p = 0.5: read from the output of an image that grows brighter left to
    right (600 draws; 0.5 +- 0.075 is 3.7 standard deviations)."""
    ramp = np.repeat(np.arange(0, 256, 4, dtype=np.uint8)[None, :], 48, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp, ramp], axis=-1)).save(buffer, "PNG")
    transform = T.TrainTransform(8)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(600):
        out = transform(buffer.getvalue()).int()
        flipped += int(out[0, :, 0].sum() > out[0, :, -1].sum())
    assert 255 <= flipped <= 345


# ---- pixels against torchvision's PIL pipeline ----

def test_simplejpeg_decodes_as_pil_to_the_bit(photos, formats):
    """The fast decoder is only a faster way to the reference's pixels: the same libjpeg-turbo IDCT
    and chroma upsampling as PIL's, colour and greyscale JPEGs, every photograph bit for bit."""
    if T.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    for path in photos + [str(formats["grey.jpg"])]:
        decoder = T._Decoder(path, "RGB")
        assert decoder.image is None, path  # the fast path was taken
        assert torch.equal(decoder.pixels(), transforms.functional.pil_to_tensor(Image.open(path).convert("RGB")))


def test_train_matches_torchvision_with_the_same_seed(photos, decoder):
    """With the same seed, the reference's box and flip, so the same pixels up to rounding.

    torch's uint8 antialiased bilinear kernel and PIL's compute the same filter in different fixed
    point, so a pixel may differ by one grey level; a wrong box (swapped axes, an offset), a missed
    flip or a different filter differs by tens of levels over whole regions. Mean <= 0.5 and max <= 2.
    """
    transform = T.TrainTransform(SIZE)
    for seed, path in enumerate(photos[:8]):  # each size of tests/photos.py once
        torch.manual_seed(seed)
        ours = transform(path)
        torch.manual_seed(seed)
        mean, worst = difference(ours, reference_train(path))
        assert mean <= 0.5 and worst <= 2, (path, mean, worst)


def test_val_matches_torchvision_pil_pipeline(photos, decoder):
    """Resize(256) + CenterCrop(224), antialiased, against torchvision's PIL pipeline on the same photographs.

    Tolerance: mean |difference| <= 0.1 grey level per image, max <= 2. Why that is enough: both
    sides compute the same antialiased bilinear (triangle) filter at the same output size and crop
    offsets and differ only in fixed-point rounding (PIL's and torch's uint8 kernels keep different
    fraction bits), which moves a pixel by at most one level. Measured on 40 photographs of
    tests/photos.py: mean 0.0016 (worst image 0.005), max 1, with simplejpeg and with PIL decoding.
    A mean of 0.1 level is 0.04% of the range, far below the JPEG noise that quality 75-95 already
    adds (several levels), so it cannot change what a network learns or scores. Every real mistake
    is far above it, measured on these photographs (smallest mean of 16): the crop one pixel lower
    5.7, no antialiasing 0.77, bicubic instead of bilinear 0.86. Max 2 rather than 1 leaves room
    for another CPU's SIMD path of the same kernel.
    """
    transform = T.ValTransform(SIZE, RESIZE)
    for path in photos:
        mean, worst = difference(transform(path), reference_val(path))
        assert mean <= 0.1 and worst <= 2, (path, mean, worst)


@pytest.mark.parametrize("width, height", [(500, 377), (377, 500), (301, 500), (256, 224), (224, 900)])
def test_val_size_and_offsets_round_as_torchvision(tmp_path, width, height):
    """Sizes where the rounding shows: 500 x 377 resizes to 339.5 -> 339 x 256 (int(), not round())
    and centres at 57.5 -> 58 (round half to even, not floor); a short side already at 224-256 and
    a strip. One pixel off in size or offset moves the whole picture: a mean of about a grey level."""
    image, quality = photo(3)
    path = tmp_path / "sized.jpg"
    path.write_bytes(jpeg_bytes(image.resize((width, height), Image.Resampling.BICUBIC), quality))
    assert T.resized_size(height, width, RESIZE) == transforms.Resize(RESIZE)(Image.open(path)).size[::-1]
    mean, worst = difference(T.ValTransform(SIZE, RESIZE)(str(path)), reference_val(str(path)))
    assert mean <= 0.1 and worst <= 2, (mean, worst)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_format_comes_out_as_pil_converts_it(formats, decoder, mode):
    """PNG, greyscale, CMYK JPEG, RGBA and palette PNG, 16-bit grey: PIL's convert(mode), then the
    same resize as the reference (the tolerance of the val test above)."""
    channels = {"RGB": 3, "L": 1}[mode]
    for name, path in formats.items():
        val = T.ValTransform(SIZE, RESIZE, mode)(str(path))
        mean, worst = difference(val, reference_val(str(path), mode))
        assert mean <= 0.1 and worst <= 2, (name, mean, worst)
        torch.manual_seed(0)
        train = T.TrainTransform(SIZE, mode)(str(path))
        torch.manual_seed(0)
        mean, worst = difference(train, reference_train(str(path), mode))
        assert mean <= 0.5 and worst <= 2, (name, mean, worst)
        for out in (val, train):
            assert out.shape == (channels, SIZE, SIZE) and out.dtype == torch.uint8 and out.is_contiguous()


def test_cmyk_jpeg_is_not_read_as_rgb(formats, decoder):
    """A CMYK JPEG's colours are PIL's CMYK -> RGB conversion, not its first three channels."""
    ours = T.ValTransform(SIZE, RESIZE)(str(formats["cmyk.jpg"]))
    assert difference(ours, reference_val(str(formats["rgb.jpg"])))[0] < 3  # the same photograph


def test_exif_orientation_is_ignored_as_in_the_reference(tmp_path, decoder):
    image, _ = photo(1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    out = T.ValTransform(SIZE, RESIZE)(str(tmp_path / "rotated.jpg"))
    assert difference(out, reference_val(str(tmp_path / "rotated.jpg")))[1] <= 1


def _junk_in_header() -> bytes:
    """Junk bytes between two header segments: libjpeg only warns ("extraneous bytes before marker")."""
    data = jpeg_bytes(*photo(2))
    dqt = data.index(b"\xff\xdb")  # the first quantisation table, after the JFIF segment
    return data[:dqt] + b"\x00\x00\x00" + data[dqt:]


def _wrong_restart_marker() -> bytes:
    """A bit error in the scan: the fourth restart marker reads RST5. libjpeg warns and resynchronises;
    the header is intact, so this fails only when the pixels are decoded."""
    image, quality = photo(2)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, restart_marker_rows=1)
    data = buffer.getvalue()
    rst3 = data.index(b"\xff\xd3")
    return data[:rst3] + b"\xff\xd5" + data[rst3 + 2:]


@pytest.mark.parametrize("damage", [_junk_in_header, _wrong_restart_marker])
def test_jpeg_that_turbojpeg_refuses_but_pil_reads(tmp_path, decoder, damage):
    """Recoverable damage: PIL (the reference) decodes it with libjpeg's warnings; TurboJPEG refuses
    it, and the transform falls back to PIL instead of failing, for the header and for the scan."""
    path = tmp_path / "damaged.jpg"
    path.write_bytes(damage())
    if T.simplejpeg is not None:
        with pytest.raises(ValueError, match="Corrupt JPEG data"):
            T.simplejpeg.decode_jpeg(path.read_bytes(), "RGB")
    assert difference(T.ValTransform(SIZE, RESIZE)(str(path)), reference_val(str(path)))[1] <= 1


# ---- sources and errors ----

def test_bytes_source_equals_path_source(photos, formats, decoder):
    for path in [photos[0], str(formats["rgb.png"]), str(formats["cmyk.jpg"])]:
        data = open(path, "rb").read()
        assert torch.equal(T.ValTransform(SIZE, RESIZE)(data), T.ValTransform(SIZE, RESIZE)(path))
        torch.manual_seed(3)
        from_bytes = T.TrainTransform(SIZE)(data)
        torch.manual_seed(3)
        assert torch.equal(from_bytes, T.TrainTransform(SIZE)(path))


def test_an_open_image_equals_its_file(photos, formats):
    # predict.py and the Python API take PIL images too: the same pixels as the file they came from.
    from PIL import Image

    for path, mode in [(photos[0], "RGB"), (str(formats["rgb.png"]), "RGB"), (str(formats["cmyk.jpg"]), "RGB"),
                       (photos[1], "L")]:
        with Image.open(path) as image:
            assert torch.equal(T.ValTransform(SIZE, RESIZE, mode)(image), T.ValTransform(SIZE, RESIZE, mode)(path))


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_jpeg_raises_an_image_error(photos, decoder, cut, monkeypatch):
    """Even where someone has let PIL fill a truncated image with grey: the label would not apply."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = open(photos[0], "rb").read()
    truncated = data[:int(len(data) * cut)]
    for transform in (T.TrainTransform(SIZE), T.ValTransform(SIZE, RESIZE)):
        with pytest.raises(T.IMAGE_ERRORS) as caught:
            transform(truncated)
        assert "truncated" in str(caught.value) or "Premature end" in str(caught.value), caught.value
    with pytest.raises(T.IMAGE_ERRORS):
        T.open_image(truncated, "RGB")
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # the user's setting, restored


def test_not_an_image_raises_an_image_error(decoder):
    for data in (b"plain text, not an image", b"\xff\xd8\xff" + b"\x00" * 64):
        with pytest.raises(T.IMAGE_ERRORS):
            T.TrainTransform(SIZE)(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims another size: decoding it would fail, so an
    error about the size proves the check came first."""
    data = bytearray(jpeg_bytes(photo(0)[0].resize((64, 48)), 90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("make", [_jpeg_claiming, _png_claiming])
def test_decompression_bomb_is_refused_before_decoding(make, decoder):
    bomb = make(60000, 60000)  # 3.6 gigapixels in a few kilobytes
    assert len(bomb) < 10_000
    for transform in (T.TrainTransform(SIZE), T.ValTransform(SIZE, RESIZE)):
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)) as caught:
            transform(bomb)
        assert "decompression bomb" in str(caught.value).lower() or "could be" in str(caught.value)


def test_pixel_limit_applies_to_real_photographs_too(photos, decoder, monkeypatch):
    """The limit is rednet's, whatever PIL's own setting, on the fast path as on PIL's."""
    monkeypatch.setattr(T, "MAX_IMAGE_PIXELS", 100_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone lifted PIL's own limit
    with pytest.raises(Image.DecompressionBombError, match="decompression bombs"):
        T.TrainTransform(SIZE)(photos[0])


def test_loader_randomness_is_torchs_global_generator(photos, decoder):
    """DataLoader seeds each worker's torch generator, and exact resume restores it: nothing else
    (Python's random, numpy) may change the draws."""
    transform = T.TrainTransform(SIZE)
    torch.manual_seed(7)
    first = transform(photos[2])
    np.random.seed(1)
    torch.manual_seed(7)
    assert torch.equal(first, transform(photos[2]))
