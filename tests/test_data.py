"""Datasets through the real torchvision and scikit-learn readers, on tiny files in the real formats."""

import os
import pickle
import socket
import urllib.error

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.datasets.utils import check_integrity

from rednet.config import DataConfig, TrainConfig
from rednet.data import ShardSampler, build_datamodule, list_datasets
from rednet.errors import DataError
from tests.conftest import CONFIGS, data_cfg, folder_cfg, load_data_yaml, raises_one_line
from tests.fakedata import CIFAR10_CLASSES, make_cifar, make_imagefolder, write_corrupt_image

# Single-channel statistics of the digits training split (seed 0), scaled to [0, 1].
DIGITS = {"in_chans": 1, "image_size": 8, "mean": [0.3054], "std": [0.3761]}


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=50, n_test=20)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("cifar100"), "cifar100", n_train=200, n_test=100)


# Config files

def test_every_data_yaml_validates_against_the_schema():
    for path in sorted(CONFIGS.glob("*.yaml")):
        if "# @package _global_" in path.read_text():  # a recipe: every group it sets must fit its schema
            recipe = OmegaConf.load(path)
            recipe.pop("defaults", None)  # Hydra's list of the groups it overrides, not a config key
            OmegaConf.merge(OmegaConf.structured(TrainConfig), recipe)
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), load_data_yaml(path))
        assert cfg.name == path.stem and cfg.name in list_datasets()
        assert len(cfg.mean) == len(cfg.std) == cfg.in_chans, path.name


def test_cifar_normalisation_constants():
    cifar10 = data_cfg("cifar10")
    assert list(cifar10.mean) == pytest.approx([0.4914, 0.4822, 0.4465])
    assert list(cifar10.std) == pytest.approx([0.2470, 0.2435, 0.2616])
    cifar100 = data_cfg("cifar100")
    assert list(cifar100.mean) == pytest.approx([0.5071, 0.4865, 0.4409])
    assert list(cifar100.std) == pytest.approx([0.2673, 0.2564, 0.2762])


# CIFAR

def test_cifar10_reads_files_whose_md5_is_not_the_official_one(cifar10_root):
    official = dict(__import__("torchvision").datasets.CIFAR10.train_list)
    assert not check_integrity(os.path.join(cifar10_root, "cifar-10-batches-py", "data_batch_1"),
                               official["data_batch_1"])
    dm = build_datamodule(data_cfg("cifar10", root=cifar10_root, download=False))
    assert (dm.num_classes, dm.class_names, dm.in_chans, dm.image_size) == (10, CIFAR10_CLASSES, 3, 32)
    assert (len(dm.train_set), len(dm.val_set)) == (50, 20)

    x, y = next(iter(dm.train_loader(batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10

    # Validation is unaugmented and in file order: the stored pixels, as uint8.
    x, y = next(iter(dm.val_loader(batch_size=20)))
    with open(os.path.join(cifar10_root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert y.tolist() == raw["labels"]
    assert torch.equal(x.reshape(20, 3072), torch.from_numpy(raw["data"]))
    assert (dm.mean, dm.std) == ([0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616])  # for the device to apply


def test_cifar100_fine_labels_and_class_names(cifar100_root):
    dm = build_datamodule(data_cfg("cifar100", root=cifar100_root, download=False))
    assert dm.num_classes == 100 and dm.class_names[:2] == ["class_00", "class_01"]
    assert (len(dm.train_set), len(dm.val_set)) == (200, 100)
    labels = torch.cat([y for _, y in dm.val_loader(batch_size=32)])
    assert sorted(labels.tolist()) == list(range(100))
    x, _ = next(iter(dm.train_loader(batch_size=16)))
    assert x.shape == (16, 3, 32, 32)


def test_cifar_with_download_true_reads_present_files_without_downloading(cifar10_root, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("present files must not be downloaded again")
    monkeypatch.setattr("rednet.data.cifar.download_and_extract_archive", no_download)
    dm = build_datamodule(data_cfg("cifar10", root=cifar10_root, download=True))
    assert len(dm.train_set) == 50


def test_cifar_missing_data_names_path_and_fix(tmp_path):
    root = str(tmp_path / "nowhere")
    with raises_one_line(r"CIFAR-10 not found in .*nowhere .*cifar-10-batches-py.*data\.download=true"):
        build_datamodule(data_cfg("cifar10", root=root, download=False))
    with raises_one_line(r"CIFAR-100 not found .*nowhere.*data\.download=true"):
        build_datamodule(data_cfg("cifar100", root=root, download=False))


def test_cifar_root_inside_the_dataset_folder_or_partial(cifar10_root, tmp_path):
    inside = os.path.join(cifar10_root, "cifar-10-batches-py")
    with raises_one_line("is the CIFAR-10 folder itself; set data.root"):
        build_datamodule(data_cfg("cifar10", root=inside, download=False))
    partial = make_cifar(tmp_path, n_train=10, n_test=5)
    os.remove(os.path.join(partial, "cifar-10-batches-py", "test_batch"))
    with raises_one_line("lacks test_batch; set data.download=true"):
        build_datamodule(data_cfg("cifar10", root=partial, download=False))


def test_cifar_failed_download_is_a_one_line_data_error(tmp_path, monkeypatch):
    # Mocked: a real attempt offline can hang on DNS or a firewall for far longer than a test may.
    def offline(*args, **kwargs):
        assert socket.getdefaulttimeout() is not None, "a download must not be able to hang forever"
        raise urllib.error.URLError("[Errno -2] Name or service not known\n(second line)")
    monkeypatch.setattr("rednet.data.cifar.download_and_extract_archive", offline)
    before = socket.getdefaulttimeout()
    with raises_one_line(r"could not download CIFAR-10 from https://.* into .*Name or service not known"):
        build_datamodule(data_cfg("cifar10", root=str(tmp_path), download=True))
    assert socket.getdefaulttimeout() == before


def test_cifar_corrupt_batch_file(tmp_path):
    root = make_cifar(tmp_path, n_train=10, n_test=5)
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_2"), "wb") as f:
        f.write(b"not a pickle")
    dm = build_datamodule(data_cfg("cifar10", root=root, download=False))  # cheap: batches load lazily
    with raises_one_line("CIFAR-10 files in .* are unreadable"):
        _ = dm.train_set


def test_channel_count_of_mean_and_std_is_checked(cifar10_root):
    with raises_one_line(r"data\.mean has 1 values .* CIFAR-10 has 3 channel"):
        build_datamodule(data_cfg("cifar10", root=cifar10_root, download=False, mean=[0.5], std=[0.5]))
    with raises_one_line(r"data\.in_chans=1 does not match CIFAR-10, whose in_chans is 3; set data\.in_chans=3"):
        build_datamodule(data_cfg("cifar10", root=cifar10_root, download=False, in_chans=1))


# ImageFolder

def test_imagefolder_shapes_labels_and_class_names(tmp_path):
    root = make_imagefolder(tmp_path, classes=("cat", "dog", "fox"), n_train=4, n_val=2, size=(40, 48))
    dm = build_datamodule(folder_cfg(root))
    assert (dm.class_names, dm.num_classes, dm.in_chans, dm.image_size) == (["cat", "dog", "fox"], 3, 3, 32)
    x, y = next(iter(dm.train_loader(batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x, y = next(iter(dm.val_loader(batch_size=6)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]

    grey = build_datamodule(folder_cfg(root, in_chans=1, mean=[0.5], std=[0.25]))
    assert grey.in_chans == 1 and grey.val_set[0][0].shape == (1, 32, 32) and grey.val_set[0][0].dtype == torch.uint8


def test_imagefolder_bad_image_error_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path, n_train=2, n_val=1)
    bad = write_corrupt_image(os.path.join(root, "val", "dog", "broken.jpg"))
    dm = build_datamodule(folder_cfg(root))
    with raises_one_line(r"unreadable image .*broken\.jpg .*data\.bad_images=skip"):
        list(dm.val_loader(batch_size=4))
    # From a worker process the DataLoader re-raises the same type, the message last.
    dm = build_datamodule(folder_cfg(root, num_workers=1, persistent_workers=False))
    with pytest.raises(DataError) as info:
        list(dm.val_loader(batch_size=4))
    assert bad in str(info.value).strip().splitlines()[-1]


def test_imagefolder_bad_image_skip_drops_it_with_a_warning(tmp_path):
    root = make_imagefolder(tmp_path, n_train=2, n_val=2)
    write_corrupt_image(os.path.join(root, "val", "dog", "dog_000_truncated.jpg"), kind="truncated")
    dm = build_datamodule(folder_cfg(root, bad_images="skip"))
    assert len(dm.val_set) == 7
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*dog_000_truncated\.jpg"):
        batches = list(dm.val_loader(batch_size=7))
    (x, y), = batches
    assert x.shape[0] == 6 and y.tolist() == [0, 0, 1, 1, 2, 2]  # never a substitute, never a wrong label


def test_imagefolder_layout_errors(tmp_path):
    with raises_one_line(r"data\.root=.*missing is not a folder; data\.root must hold train/<class>"):
        build_datamodule(folder_cfg(str(tmp_path / "missing")))

    root = make_imagefolder(tmp_path / "noval", n_train=1, n_val=1)
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))
    with raises_one_line(r"the val split .*noval.val is not a folder; data\.root must hold"):
        build_datamodule(folder_cfg(root))

    root = make_imagefolder(tmp_path / "differ", classes=("cat", "dog", "fox"), n_train=1, n_val=1)
    os.rename(os.path.join(root, "val", "fox"), os.path.join(root, "val", "wolf"))
    with raises_one_line(r"train and val class folders differ \(only in .*train: fox; only in .*val: wolf\)"):
        build_datamodule(folder_cfg(root))

    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
    with raises_one_line(r"no class folders in .*flat.train"):
        build_datamodule(folder_cfg(str(flat)))

    root = make_imagefolder(tmp_path / "empty", classes=("cat", "dog"), n_train=1, n_val=1)
    os.remove(os.path.join(root, "train", "dog", "dog_000.jpg"))
    dm = build_datamodule(folder_cfg(root))
    with raises_one_line(r"no images in .*empty.train for 1 class\(es\): dog"):
        _ = dm.train_set


def test_hidden_folders_are_not_classes(tmp_path):
    root = make_imagefolder(tmp_path, classes=("a", "b"), n_train=1, n_val=1)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    assert build_datamodule(folder_cfg(root)).class_names == ["a", "b"]


# digits

def test_digits_split_is_fixed_stratified_and_normalised():
    dm = build_datamodule(data_cfg("digits", **DIGITS))
    assert (dm.class_names, dm.in_chans, dm.image_size) == ([str(i) for i in range(10)], 1, 8)
    train, val = dm.train_set, dm.val_set
    assert (len(train), len(val)) == (1437, 360)
    counts = {name: torch.bincount(s.targets, minlength=10) for name, s in (("train", train), ("val", val))}
    total = counts["train"] + counts["val"]
    assert total.sum() == 1797 and (counts["val"] > 0).all()
    assert ((counts["val"] - total * 0.2).abs() <= 1).all()  # each class split 80/20

    again = build_datamodule(data_cfg("digits", **DIGITS))
    assert torch.equal(again.val_set.images, val.images) and torch.equal(again.val_set.targets, val.targets)
    other = build_datamodule(data_cfg("digits", seed=1, **DIGITS))
    assert not torch.equal(other.val_set.targets, val.targets)

    x, y = next(iter(dm.val_loader(batch_size=360)))
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    inner = train.images[:, :, 1:-1, 1:-1]  # stored with a one-pixel background margin for the shift
    # scikit-learn's ink counts 0..16 on the 0..255 scale, which data.mean and data.std normalise
    assert set(inner.flatten().tolist()) <= {round(v * 255 / 16) for v in range(17)}
    scaled = inner.float() / 255
    assert abs(scaled.mean().item() - dm.mean[0]) / dm.std[0] < 0.01 and abs(scaled.std().item() / dm.std[0] - 1) < 0.01
    assert torch.equal(train.images[:, :, 0], torch.zeros_like(train.images[:, :, 0]))  # background: no ink

    torch.manual_seed(0)
    crops = torch.stack([train[5][0] for _ in range(50)])
    assert crops.shape[1:] == (1, 8, 8)
    assert any(torch.equal(c, inner[5]) for c in crops)  # the centred image is one of the shifts
    assert len({c.flatten().tolist().__str__() for c in crops}) > 3  # training images are shifted
    # Validation images are not shifted: every draw is the same sklearn image, pixel for pixel.
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    draws = [val[5][0][0].float() * 16 / 255 for _ in range(3)]
    matches = [i for i in range(len(raw)) if torch.allclose(draws[0], raw[i], atol=16 / 255 / 2)]
    assert len(matches) == 1 and all(torch.equal(d, draws[0]) for d in draws)


def test_digits_yaml_matches_the_training_split_statistics():
    cfg = data_cfg("digits")
    assert (cfg.in_chans, cfg.image_size) == (1, 8)
    assert list(cfg.mean) == pytest.approx(DIGITS["mean"], abs=1e-3)
    assert list(cfg.std) == pytest.approx(DIGITS["std"], abs=1e-3)


# fake, names

def test_fake_data():
    dm = build_datamodule(data_cfg("fake", image_size=16, num_classes=5, train_size=20, val_size=10))
    assert (dm.num_classes, dm.class_names[-1], dm.in_chans, dm.image_size) == (5, "class_4", 3, 16)
    x, y = next(iter(dm.train_loader(batch_size=4)))
    assert x.shape == (4, 3, 16, 16) and 0 <= y.min() and y.max() < 5
    assert not torch.equal(dm.train_set[0][0], dm.val_set[0][0])
    grey = build_datamodule(data_cfg("fake", image_size=8, num_classes=2, in_chans=1, mean=[0.5], std=[0.5]))
    assert grey.val_set[0][0].shape == (1, 8, 8)
    with raises_one_line("data=fake needs data.num_classes"):
        build_datamodule(data_cfg("fake", num_classes=None))
    # The schema's dataclass itself is accepted too, as code outside Hydra would build it.
    assert build_datamodule(DataConfig(name="fake", num_classes=2, image_size=4)).num_classes == 2


def test_unknown_dataset_lists_the_valid_names():
    with raises_one_line("data.name=mnist is not a dataset; choose one of: cifar10, cifar100, digits, fake, imagenet"):
        build_datamodule(data_cfg("mnist"))


# Loaders and samplers

def fake_dm(n_train=20, n_val=10, **overrides):
    return build_datamodule(data_cfg("fake", image_size=4, num_classes=3, train_size=n_train, val_size=n_val,
                                     **overrides))


def test_train_sampler_shards_are_disjoint_and_a_function_of_seed_and_epoch():
    dm = fake_dm(n_train=21)

    def order(rank, seed, epoch):
        sampler = dm.train_loader(batch_size=2, rank=rank, world_size=2, seed=seed).sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    rank0, rank1 = order(0, seed=3, epoch=1), order(1, seed=3, epoch=1)
    assert len(rank0) == len(rank1) == 10 and not set(rank0) & set(rank1)  # drop_last: no padding repeats
    assert order(0, seed=3, epoch=1) == rank0
    assert order(0, seed=3, epoch=2) != rank0 and order(0, seed=4, epoch=1) != rank0
    loader = dm.train_loader(batch_size=4)
    assert loader.drop_last and len(loader) == 5


def test_val_sampler_covers_every_index_exactly_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    dm = fake_dm(n_val=10)
    seen = [len(y) for rank in range(3) for _, y in dm.val_loader(batch_size=3, rank=rank, world_size=3)]
    assert sum(seen) == 10


def test_loader_options():
    dm = fake_dm(num_workers=2, pin_memory=True, persistent_workers=True)
    loader = dm.val_loader(batch_size=4)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    loader = fake_dm(num_workers=0, persistent_workers=True).train_loader(batch_size=4)
    assert loader.num_workers == 0 and not loader.persistent_workers


def test_a_training_set_smaller_than_one_batch_is_an_error():
    with raises_one_line(r"training set has 20 images, 10 per rank: fewer than one batch of 16 .*data\.batch_size"):
        fake_dm(n_train=20).train_loader(batch_size=16, rank=0, world_size=2)


def test_building_reads_no_images(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path, n_train=2, n_val=1)
    calls = []
    monkeypatch.setattr("rednet.data.folder.open_image", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("rednet.data.folder.ImageFolder.__init__", lambda *a, **k: calls.append(a))
    dm = build_datamodule(folder_cfg(root))
    assert dm.class_names == ["cat", "dog", "fox"] and calls == []
