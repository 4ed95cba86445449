"""rednet.engine.feed: uint8 batches to the device, normalised there, against torchvision's CPU reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from rednet.data.transforms import TrainTransform, ValTransform, normalize_batch
from rednet.engine.feed import DeviceFeed
from rednet.errors import DataError
from tests.photos import write_imagefolder

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("tree"), classes=2, train_per_class=5, val_per_class=3)


def reference(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """torchvision's ToTensor + Normalize, image by image, from (H, W, C) uint8 arrays as PIL gives them."""
    to_float = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.stack([to_float(image.permute(1, 2, 0).numpy()) for image in images])


def exact(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """(images / 255 - mean) / std in float64: the value that float32 arithmetic approximates."""
    shape = (len(mean), 1, 1)
    return (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(shape)) / torch.tensor(
        std, dtype=torch.float64).view(shape)


def assert_normalised(out: torch.Tensor, images: torch.Tensor, mean=MEAN, std=STD) -> None:
    """The same float32 values as torchvision's CPU pipeline (the same operations in the same order),
    and within float32 rounding of the float64 value: three roundings of numbers below 2.7 in
    magnitude move them by at most ~5e-7, while a wrong constant, channel order or a missing /255
    moves them by at least 1e-3."""
    assert out.dtype == torch.float32
    assert torch.equal(out.cpu(), reference(images.cpu(), mean, std))
    assert (out.cpu().double() - exact(images.cpu(), mean, std)).abs().max() <= 1e-6


class Recording:
    """A loader that records when each batch was taken from it."""

    def __init__(self, batches: list, num_workers: int = 0) -> None:
        self.batches, self.num_workers, self.taken, self.iterated = batches, num_workers, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.iterated += 1
        for batch in self.batches:
            self.taken += 1
            yield batch


def test_normalised_batch_equals_totensor_normalize(tree):
    loader = DataLoader(datasets.ImageFolder(str(tree / "val"), loader=ValTransform(224, 256)), batch_size=4)
    feed = DeviceFeed(loader, "cpu", MEAN, STD)
    assert len(feed) == len(loader) == 2
    seen = 0
    for (images, target), (raw, raw_target) in zip(feed, loader):
        assert images.shape == raw.shape and raw.dtype == torch.uint8
        assert_normalised(images, raw)
        assert torch.equal(target, raw_target)
        seen += len(target)
    assert seen == 6


def test_train_loader_through_the_feed(tree):
    loader = DataLoader(datasets.ImageFolder(str(tree / "train"), loader=TrainTransform(64)), batch_size=4,
                        shuffle=True)
    batches = list(DeviceFeed(loader, "cpu", MEAN, STD))
    assert [len(target) for _, target in batches] == [4, 4, 2]
    for images, _ in batches:
        assert images.shape[1:] == (3, 64, 64) and images.dtype == torch.float32
        assert images.min() >= (0 - max(MEAN)) / min(STD) - 1e-6 and images.max() <= (1 - min(MEAN)) / min(STD) + 1e-6


def test_channels_last_and_dtype_are_honoured():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    [(out, _)] = DeviceFeed([(images, torch.zeros(2))], "cpu", MEAN, STD, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_normalised(out, images)
    [(out, _)] = DeviceFeed([(images, torch.zeros(2))], "cpu", MEAN, STD, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    # Rounding to 8 significant bits (bfloat16) moves a value in [2, 4) by at most half of 2^-6; to
    # 11 (float16) by half of 2^-9. The values stay below 2.7 in magnitude.
    assert (out.double() - exact(images)).abs().max() <= 2 ** -7 + 1e-6
    [(out, _)] = DeviceFeed([(images, torch.zeros(2))], "cpu", MEAN, STD, dtype=torch.float16, channels_last=True)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - exact(images)).abs().max() <= 2 ** -10 + 1e-6


def test_float_batch_is_refused_in_one_line_naming_the_dataset():
    normalised = reference(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    feed = DeviceFeed([(normalised, torch.zeros(2))], "cpu", MEAN, STD, name="data=imagenet (/data/imagenet)")
    with pytest.raises(DataError) as caught:
        next(iter(feed))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data=imagenet (/data/imagenet) yields float32 images, but batches must be uint8")
    assert "not ToTensor + Normalize" in message
    with pytest.raises(DataError, match=r"normalize_batch takes uint8 images .*got float32 of shape \(2, 3, 8, 8\)"):
        normalize_batch(normalised, MEAN, STD)


def test_default_name_is_the_dataset_class(tree):
    # The reference's float output, as a config that still ends in ToTensor would give it.
    to_float = transforms.Compose([transforms.CenterCrop(32), transforms.ToTensor()])
    loader = DataLoader(datasets.ImageFolder(str(tree / "val"), transform=to_float), batch_size=2)
    with pytest.raises(DataError, match="^the dataset ImageFolder yields float32 images"):
        next(iter(DeviceFeed(loader, "cpu", MEAN, STD)))


def test_channel_count_must_match_mean_and_std():
    grey = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"shape \(2, 1, 8, 8\), but the normalisation has 3 channel"):
        next(iter(DeviceFeed([(grey, torch.zeros(2))], "cpu", MEAN, STD, name="digits")))


def test_empty_batch_passes():
    """An all-unreadable batch under data.bad_images=skip collates to (0, C, H, W)."""
    for empty in (torch.empty(0, 3, 8, 8, dtype=torch.uint8), torch.empty(0, 3, 8, 8)):
        [(out, target)] = DeviceFeed([(empty, torch.empty(0, dtype=torch.long))], "cpu", MEAN, STD)
        assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32 and target.shape == (0,)


def test_normalize_batch_on_one_image():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    out = normalize_batch(image, MEAN, STD)
    assert out.shape == (3, 5, 7)
    assert_normalised(out[None], image[None])
    grey = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    assert_normalised(normalize_batch(grey, [0.5], [0.25])[None], grey[None], [0.5], [0.25])


def batches(count: int) -> list:
    return [(torch.full((1, 3, 2, 2), k, dtype=torch.uint8), torch.tensor([k])) for k in range(count)]


def test_iter_starts_the_loader_at_once_and_takes_no_batch_until_next():
    """A trainer restores its generators between iter() and the first batch (the loader draws its
    workers' seeds in iter()); a batch taken before that would be augmented from the wrong state."""
    loader = Recording(batches(3))
    iterator = iter(DeviceFeed(loader, "cpu", MEAN, STD))
    assert loader.taken == 0
    next(iterator)
    assert loader.taken == 1  # on the CPU, one batch at a time


def test_lookahead_keeps_order_and_loses_nothing():
    """The CUDA branch's order of events, run on the CPU (no streams): while batch k is returned,
    batch k + 1 has already been taken from the loader; every batch comes out once, in order."""
    loader = Recording(batches(4), num_workers=2)
    feed = DeviceFeed(loader, "cpu", MEAN, STD)
    assert not feed.lookahead  # only on CUDA
    feed.lookahead = True
    out = []
    for images, target in feed:
        out.append(int(target))
        assert loader.taken == min(len(out) + 1, 4)
        assert_normalised(images, torch.full((1, 3, 2, 2), int(target), dtype=torch.uint8))
    assert out == [0, 1, 2, 3]
    assert len(list(feed)) == 4 and loader.iterated == 2  # a second epoch starts a new loader iterator


def test_lookahead_only_on_cuda_with_workers():
    assert not DeviceFeed(Recording([], num_workers=4), "cpu", MEAN, STD).lookahead
    assert not DeviceFeed(Recording([], num_workers=0), "meta", MEAN, STD).lookahead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_feed_equals_cpu_reference():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    loader = Recording([(images[:4].pin_memory(), torch.arange(4)), (images[4:].pin_memory(), torch.arange(4))],
                       num_workers=2)
    out = list(DeviceFeed(loader, "cuda", MEAN, STD, channels_last=True))
    assert [o[0].device.type for o in out] == ["cuda", "cuda"]
    assert_normalised(torch.cat([o[0] for o in out]), images)
