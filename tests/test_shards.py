"""Packed shards (rednet/data/shards.py): pack.py writes an ImageFolder tree into tar shards, and
data=shards trains from them: every sample back with its label, each exactly once per epoch
across ranks and workers, equal batch counts per rank, a buffer shuffle, mid-epoch resume, and
one line for each kind of bad input."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rednet.data import build_datamodule
from rednet.data import shards as shards_module
from rednet.data.folder import build_imagefolder
from rednet.data.shards import pack
from rednet.data.transforms import ValTransform
from rednet.errors import ConfigError
from tests.conftest import data_cfg, raises_one_line, run_cli

pytest.importorskip("webdataset")  # the [shards] extra, for packing

# (width, height): ImageNet-like sizes, in both orientations, with a few larger pictures.
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (300, 200))
QUALITIES = (75, 80, 85, 90, 95)


def photo(index: int) -> tuple[Image.Image, int]:
    """A JPEG-able crop of one of scikit-learn's two real photographs at an ImageNet-like size, and its quality."""
    from sklearn.datasets import load_sample_images

    sources = photo.sources = getattr(photo, "sources", None) or load_sample_images().images
    rng = np.random.default_rng(index)
    source = Image.fromarray(sources[index % 2])
    width, height = PHOTO_SIZES[index % len(PHOTO_SIZES)]
    fit = min(source.width / width, source.height / height) * rng.uniform(0.7, 1.0)
    left, top = rng.uniform(0, source.width - width * fit), rng.uniform(0, source.height - height * fit)
    image = source.resize((width, height), Image.Resampling.BICUBIC,
                          box=(left, top, left + width * fit, top + height * fit))
    return image, QUALITIES[index % len(QUALITIES)]


def write_photo_tree(root: Path, classes: int = 2, train_per_class: int = 6, val_per_class: int = 3) -> Path:
    """An ImageFolder tree ``root/{train,val}/class_<k>/photo_<i>.jpg`` of distinct real-photograph JPEGs."""
    index = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class):
                image, quality = photo(index)
                image.save(folder / f"photo_{index:05d}.jpg", "JPEG", quality=quality)
                index += 1
    return root


def write_id_tree(root: Path, train: int, val: int, classes: int = 3) -> Path:
    """Tiny solid-colour PNGs whose pixels say which image they are (red + 256 * green) and which
    class (blue): any crop or resize of them keeps those values, so a loader's output names its samples."""
    index = 0
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            k = i % classes
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8 + index % 3, 8), (index % 256, index // 256, k)).save(folder / f"{index:05d}.png")
            index += 1
    return root


def ids(images: torch.Tensor, labels: torch.Tensor) -> list[int]:
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert (images[:, 2, 0, 0].long() == labels).all(), "a label that is not the image's class"
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def shards_cfg(root, **overrides):
    return data_cfg("shards", **{"root": str(root), "image_size": 8, "val_resize": 8, "batch_size": 4, **overrides})


def pack_tree(src: Path, out: Path, **kwargs):
    return pack(data_cfg("imagenet", root=str(src), image_size=8, val_resize=8), out, num_workers=0, **kwargs)


def packed_ids(tmp_path, train, val, shard_samples, **cfg):
    src = write_id_tree(tmp_path / "src", train, val)
    pack_tree(src, tmp_path / "out", shard_samples=shard_samples)
    return build_datamodule(shards_cfg(tmp_path / "out", **cfg))


def epoch_ids(loader, epoch):
    loader.set_epoch(epoch)
    return [ids(*batch) for batch in loader]


def members(path: Path) -> list[tuple[str, bytes]]:
    """A shard's members, read with the standard library alone."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def sources(src: Path, split: str) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in (src / "train").iterdir())
    return [(path, classes.index(path.parent.name)) for path in sorted((src / split).glob("*/*"))]


# -- packing ------------------------------------------------------------------------------------------------


def test_pack_round_trip_gives_back_every_file_and_label(tmp_path, capsys):
    src = write_photo_tree(tmp_path / "src")
    result = pack_tree(src, tmp_path / "out", shard_samples=5)
    progress = capsys.readouterr().err
    assert f"packing into {tmp_path / 'out'}" in progress and "18/18" in progress, "no progress bar"
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["train"]["classes"] == ["class_0", "class_1"]
    for split in ("train", "val"):
        expected = sorted((path.read_bytes(), label) for path, label in sources(src, split))
        got, keys = [], []
        for entry in index["splits"][split]["shards"]:
            shard = members(tmp_path / "out" / entry["name"])
            assert entry["samples"] == len(shard) // 2
            assert entry["bytes"] == (tmp_path / "out" / entry["name"]).stat().st_size
            named = dict(shard)
            for name, _ in shard[::2]:
                key = name.split(".")[0]
                keys.append(key)
                got.append((named[f"{key}.jpg"], int(named[f"{key}.cls"])))
        assert sorted(got) == expected, f"{split}: not every file came back with its label"
        assert len(set(keys)) == len(keys)
    assert result.samples == {"train": 12, "val": 6} and result.skipped == 0

    # data=shards reads the validation images in the folder's order, decoded as from the files.
    data = build_datamodule(data_cfg("shards", root=str(tmp_path / "out"), image_size=64, val_resize=72))
    transform = ValTransform(64, 72)
    for i, (path, label) in enumerate(sources(src, "val")):
        image, target = data.val_set[i]
        assert target == label and torch.equal(image, transform(str(path)))


def test_max_side_reencodes_larger_images_only(tmp_path):
    src = write_photo_tree(tmp_path / "src", classes=1, train_per_class=6, val_per_class=6)
    pack_tree(src, tmp_path / "out", max_side=400, shard_samples=100)

    def expected(path):
        w, h = Image.open(path).size
        scale = min(1, 400 / max(w, h))
        return round(w * scale), round(h * scale)

    for split in ("train", "val"):
        files = sources(src, split)
        shard = [(name, data) for name, data in members(tmp_path / "out" / f"{split}-000000.tar")
                 if not name.endswith(".cls")]
        got = sorted(Image.open(io.BytesIO(data)).size for _, data in shard)
        assert got == sorted(expected(path) for path, _ in files)
        assert sum(max(size) == 400 for size in got) == 5  # 500x375, 375x500, 500x333, 640x480, 800x600
        small = {path.read_bytes() for path, _ in files if max(Image.open(path).size) <= 400}
        assert small == {data for _, data in shard if max(Image.open(io.BytesIO(data)).size) < 400}
        assert all(name.endswith(".jpg") for name, _ in shard)


def test_an_unreadable_source_image_stops_packing_or_is_counted(tmp_path):
    src = write_id_tree(tmp_path / "src", train=12, val=3)
    bad = src / "train" / "class_1" / "00004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with raises_one_line(f"unreadable image {bad} .*data.bad_images=skip"):
        pack_tree(src, tmp_path / "out")
    result = pack(data_cfg("imagenet", root=str(src), bad_images="skip"), tmp_path / "out", num_workers=0)
    assert result.skipped == 1 and result.skipped_paths == [str(bad)] and result.samples["train"] == 11
    assert "left out 1 unreadable image(s)" in result.summary()
    data = build_datamodule(shards_cfg(tmp_path / "out", batch_size=1))
    assert sorted(i for batch in epoch_ids(data.train_loader(1), 0) for i in batch) == [i for i in range(12) if i != 4]


def test_a_shard_file_appears_only_when_whole(tmp_path):
    # Packing stops at an unreadable image of the third training shard, as a kill would mid-shard.
    src = write_id_tree(tmp_path / "src", train=20, val=4)
    listing = build_imagefolder(data_cfg("imagenet", root=str(src))).train_set.samples
    order = np.random.default_rng(shards_module.PACK_ORDER_SEED).permutation(len(listing))
    bad = Path(listing[order[12]][0])  # position 12: the third of four shards of 5
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    out = tmp_path / "out"
    with raises_one_line(f"unreadable image {bad}"):
        pack_tree(src, out, shard_samples=5)
    assert sorted(p.name for p in out.iterdir()) == ["pack.json", "train-000000.tar", "train-000001.tar"]
    for name in ("train-000000.tar", "train-000001.tar"):
        assert len(members(out / name)) == 10, f"{name} is not whole"


def test_rerunning_an_interrupted_packing_keeps_its_shards(tmp_path):
    src = write_id_tree(tmp_path / "src", train=20, val=4)
    out = tmp_path / "out"
    pack_tree(src, out, shard_samples=5)
    whole = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    # As if stopped while writing train-000002.tar: the index comes last, the shard never appeared.
    (out / "index.json").unlink()
    (out / "train-000002.tar").unlink()
    kept = (out / "train-000001.tar").stat().st_mtime_ns
    with raises_one_line("an interrupted packing, which re-running the same pack.py command completes"):
        build_datamodule(shards_cfg(out))
    result = pack_tree(src, out, shard_samples=5)
    assert (result.written, result.kept) == (1, 4)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == whole
    assert (out / "train-000001.tar").stat().st_mtime_ns == kept
    with raises_one_line("holds a packing of max_side=None"):
        pack_tree(src, out, shard_samples=5, max_side=4)
    with raises_one_line("is not empty and holds no packing"):
        pack_tree(src, src / "train")


# -- reading: exactly once, equal batches, shuffle, resume ------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, workers):
    # 103 training images in 9 shards of 11 or 12: ranks split shards, and some shards between two ranks.
    data = packed_ids(tmp_path, train=103, val=17, shard_samples=12, shuffle_buffer=5, num_workers=workers)
    batch = 4
    for world in (1, 2, 3):
        seen, batches = [], []
        for rank in range(world):
            loader = data.train_loader(batch, rank, world, seed=7)
            got = epoch_ids(loader, epoch=2)
            assert all(len(b) == batch for b in got)
            batches.append((len(got), len(loader)))
            seen += [i for b in got for i in b]
        per_rank = 103 // (world * batch)
        assert batches == [(per_rank, per_rank)] * world, "ranks must yield the same number of batches"
        assert len(set(seen)) == len(seen), "a sample was read twice in one epoch"
        assert set(seen) <= set(range(103)) and 103 - len(seen) < world * batch  # fewer than a global batch left out
        val = [i for rank in range(world) for b in epoch_ids(data.val_loader(batch, rank, world), 0) for i in b]
        assert sorted(val) == list(range(103, 120)), "every validation sample exactly once"


def log_reads(monkeypatch, log: Path):
    """Makes every read_shard, in this process or a forked loader worker, append to ``log`` a line
    [worker, shard, None] when it opens a shard and [worker, shard, j] when it reads sample j's image."""
    read_shard = shards_module.read_shard

    def write(*entry):
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def logged(path, num_classes, wanted=lambda j: True):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        write(worker, Path(path).name, None)
        for j, sample in enumerate(read_shard(path, num_classes, wanted)):
            if sample.image is not None:
                write(worker, Path(path).name, j)
            yield sample

    monkeypatch.setattr(shards_module, "read_shard", logged)


def read_log(log: Path) -> tuple[set, list]:
    """The (worker, shard) pairs that opened a shard, and the (worker, shard, j) images read, since the last call."""
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return {(w, s) for w, s, j in lines if j is None}, [(w, s, j) for w, s, j in lines if j is not None]


def test_ranks_and_workers_read_disjoint_shards(tmp_path, monkeypatch):
    data = packed_ids(tmp_path, train=103, val=17, shard_samples=12, shuffle_buffer=5, num_workers=2)
    log = tmp_path / "reads.jsonl"
    log_reads(monkeypatch, log)
    readers, read = {}, []
    for rank in range(2):
        epoch_ids(data.train_loader(4, rank, 2, seed=7), epoch=1)
        opened, images = read_log(log)
        for worker, shard in opened:
            readers.setdefault(shard, set()).add((rank, worker))
        read += [(shard, j) for _, shard, j in images]
    assert len(set(read)) == len(read) == 96, "a sample's image was read twice, or not at all"
    assert len(readers) == 9
    for shard, who in readers.items():
        assert len({w for r, w in who if r == 0}) <= 1 and len({w for r, w in who if r == 1}) <= 1, \
            f"two workers of one rank read {shard}"
    # Equal batch counts need one shard between the two ranks, read in two disjoint parts.
    assert sum(len(who) > 1 for who in readers.values()) <= 1


def test_shuffle_changes_the_order_between_epochs_not_the_set(tmp_path):
    data = packed_ids(tmp_path, train=96, val=10, shard_samples=10, shuffle_buffer=8)
    loader = data.train_loader(4, 0, 2, seed=3)
    first, second, again = epoch_ids(loader, 0), epoch_ids(loader, 1), epoch_ids(loader, 0)
    flat = [[i for b in e for i in b] for e in (first, second)]
    other_rank = [i for b in epoch_ids(data.train_loader(4, 1, 2, seed=3), 0) for i in b]
    assert sorted(flat[0] + other_rank) == list(range(96))  # 96 = 12 global batches: nothing left out
    assert flat[0] != flat[1] and first == again
    # Not just the shards' order: the buffer breaks up each shard's sequence (read here with tarfile and PIL).
    neighbours = set()
    for shard in sorted((tmp_path / "out").glob("train-*.tar")):
        sequence = [Image.open(io.BytesIO(data)).getpixel((0, 0))[0] for name, data in members(shard)
                    if name.endswith(".png")]
        neighbours |= set(zip(sequence, sequence[1:]))
    mixed = sum(pair not in neighbours for pair in zip(flat[0], flat[0][1:]))
    assert mixed > 10, f"only {mixed} of 47 neighbours were not neighbours in a shard: no shuffle buffer"
    val = data.val_loader(4)
    assert epoch_ids(val, 0) == epoch_ids(val, 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_skips_what_was_trained(tmp_path, monkeypatch, workers):
    data = packed_ids(tmp_path, train=90, val=4, shard_samples=7, shuffle_buffer=6, num_workers=workers)
    log = tmp_path / "reads.jsonl"
    log_reads(monkeypatch, log)
    loader = data.train_loader(4, 1, 2, seed=5)
    whole = epoch_ids(loader, 3)
    assert len(whole) == 11
    opened = {shard for _, shard in read_log(log)[0]}
    resumed = data.train_loader(4, 1, 2, seed=5)
    resumed.set_epoch(3)
    resumed.skip_next(7 * 4)
    assert len(resumed) == 4
    rest = [ids(*batch) for batch in resumed]
    # The 28 samples trained before the interruption are not read again: at least one whole shard (of 7) is
    # not even opened, and the images read are exactly those of the 16 samples left.
    reopened, images = read_log(log)
    assert len({shard for _, shard in reopened}) < len(opened)
    assert len(images) == 16
    assert len(rest) == 4 and all(len(b) == 4 for b in rest)
    if workers == 0:
        assert rest == whole[7:]
    else:  # the same samples, possibly batched otherwise
        assert sorted(i for b in rest for i in b) == sorted(i for b in whole[7:] for i in b)
    assert len(resumed) == 11 and len(epoch_ids(resumed, 3)) == 11  # the skip was for one iteration


# -- bad input: one line, never a wrong label -------------------------------------------------------------


def write_shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    """A tar file of ``samples`` (name, bytes), written with the standard library."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_index(out: Path, train: dict, classes=("a", "b", "c")) -> None:
    """index.json for the train shards ``train`` (name: samples); val gets a copy of each."""
    val = {}
    for name, n in train.items():
        val[name.replace("train-", "val-")] = n
        (out / name.replace("train-", "val-")).write_bytes((out / name).read_bytes())
    splits = {}
    for split, shard_counts in (("train", train), ("val", val)):
        shards = [{"name": name, "samples": n, "bytes": (out / name).stat().st_size}
                  for name, n in shard_counts.items()]
        splits[split] = {"classes": list(classes), "shards": shards}
    (out / "index.json").write_text(json.dumps({"format": "rednet-shards", "version": 1, "splits": splits}))


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, value % 3)).save(buffer, "PNG")
    return buffer.getvalue()


def one_shard(tmp_path, samples, **cfg):
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "train-000000.tar", samples)
    write_index(out, {"train-000000.tar": len({name.split(".")[0] for name, _ in samples})})
    return build_datamodule(shards_cfg(out, batch_size=1, **cfg))


def good(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:09d}.cls", str(i % 3).encode()), (f"{i:09d}.png", png(i))]


def read_all(data):
    return epoch_ids(data.train_loader(1), 0)


def test_a_folder_without_shards(tmp_path):
    with raises_one_line(f"no packed shards in data.root={tmp_path}: it has no shards and no index.json; pack an "
                         f"ImageFolder tree there with: python pack.py"):
        build_datamodule(shards_cfg(tmp_path))
    with raises_one_line("is not a folder"):
        build_datamodule(shards_cfg(tmp_path / "nope"))


def test_a_truncated_shard(tmp_path):
    out = tmp_path / "out"
    pack_tree(write_id_tree(tmp_path / "src", train=30, val=3), out, shard_samples=10)
    shard = out / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with raises_one_line(f"shard {shard} is {len(data) // 2} bytes but .*index.json says {len(data)}: it is truncated"):
        build_datamodule(shards_cfg(out))
    # Cut at a member boundary, and an index edited to match: the shard ends too soon while reading.
    names = [m.name for m in tarfile.open(out / "train-000000.tar")]
    write_shard(shard, [(n, d) for n, d in members(out / "train-000000.tar")][:8])
    assert len(names) == 20
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["shards"][1]["bytes"] = shard.stat().st_size
    (out / "index.json").write_text(json.dumps(index))
    with raises_one_line(f"shard {shard} ends after 4 samples but the index says it holds 10: it is truncated"):
        read_all(build_datamodule(shards_cfg(out, batch_size=1)))


def test_a_member_that_is_not_an_image(tmp_path):
    samples = good(0) + [("000000001.cls", b"1"), ("000000001.jpg", b"this is not a JPEG")] + good(2)
    with raises_one_line(r"unreadable image .*train-000000.tar:000000001.jpg \(UnidentifiedImageError: .*"
                         r"data.bad_images=skip"):
        read_all(one_shard(tmp_path, samples))
    with pytest.warns(UserWarning, match="skipping unreadable image .*000000001.jpg"):
        batches = read_all(build_datamodule(shards_cfg(tmp_path / "out", batch_size=1, bad_images="skip")))
    # The batch count holds (DDP needs it): the bad sample is left out of its batch, not replaced.
    assert sorted(batches) == [[], [0], [2]]


@pytest.mark.parametrize("samples,message", [
    (good(0) + [("000000001.cls", b"3"), ("000000001.png", png(1))], "000000001.cls is class 3, but the index has 3"),
    (good(0) + [("000000001.cls", b"-1"), ("000000001.png", png(1))], "000000001.cls holds b'-1', not a class index"),
    (good(0) + [("000000001.png", png(1))], "sample 000000001 has members png, not one image and one .cls"),
    (good(1) + good(0), "key 000000000 comes after 000000001"),
    (good(0) + [("../000000001.cls", b"1"), ("../000000001.png", png(1))], "member '../000000001.cls' is a regular"),
    (good(0) + [("000000001.cls", b"1")] + good(1)[1:] * 2, "member 000000001.png appears twice"),
])
def test_a_malformed_shard_is_refused(tmp_path, samples, message):
    with raises_one_line(f"shard .*train-000000.tar is not a valid RedNet shard: {message}.*re-pack it"):
        read_all(one_shard(tmp_path, samples))


def test_links_and_oversized_members_are_refused_unread(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(out / "train-000000.tar", "w") as tar:
        link = tarfile.TarInfo("000000000.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    write_index(out, {"train-000000.tar": 1})
    with raises_one_line("member '000000000.png' is not a regular file"):
        read_all(build_datamodule(shards_cfg(out, batch_size=1)))
    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", 50)
    (out / "train-000000.tar").unlink()
    write_shard(out / "train-000000.tar", good(0))
    write_index(out, {"train-000000.tar": 1})
    with raises_one_line(f"member 000000000.png is {len(png(0))} bytes, more than the 50 allowed"):
        read_all(build_datamodule(shards_cfg(out, batch_size=1)))


def test_garbage_instead_of_a_shard(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"x" * 1000)
    write_index(out, {"train-000000.tar": 1})
    with raises_one_line("shard .*train-000000.tar is truncated or damaged"):
        read_all(build_datamodule(shards_cfg(out, batch_size=1)))
    (out / "index.json").write_text("{not json")
    with raises_one_line("index.json is not a RedNet shard index"):
        build_datamodule(shards_cfg(out))


def test_val_classes_that_differ_from_train(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "train-000000.tar", good(0))
    write_index(out, {"train-000000.tar": 1})
    index = json.loads((out / "index.json").read_text())
    index["splits"]["val"]["classes"] = ["a", "b", "d"]
    (out / "index.json").write_text(json.dumps(index))
    with raises_one_line("the train and val shards in .* have different classes "
                         r"\(only in train: c; only in val: d\)"):
        build_datamodule(shards_cfg(out))
    index["splits"]["val"]["classes"] = ["b", "a", "c"]
    (out / "index.json").write_text(json.dumps(index))
    with raises_one_line("different classes \\(the same names in another order\\)"):
        build_datamodule(shards_cfg(out))


def test_pack_refuses_a_tree_whose_splits_differ_and_bad_settings(tmp_path):
    src = write_id_tree(tmp_path / "src", train=6, val=3)
    (src / "val" / "class_9").mkdir()
    with raises_one_line("train and val class folders differ"):
        pack_tree(src, tmp_path / "out")
    with pytest.raises(ConfigError, match="max_side=0 must be positive"):
        pack_tree(src, tmp_path / "out", max_side=0)
    with pytest.raises(ConfigError, match="data=digits is not one"):
        pack(data_cfg("digits"), tmp_path / "out")


# -- the commands -----------------------------------------------------------------------------------------


def test_pack_py(tmp_path):
    src = write_photo_tree(tmp_path / "src", classes=2, train_per_class=2, val_per_class=1)
    out = tmp_path / "out"
    result = run_cli("pack.py", "data=imagenet", f"data.root={src}", f"out={out}", "max_side=320",
                     "data.num_workers=0", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"packed 4 train and 2 val images into 1 + 1 shards in {out}" in result.stdout + result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["max_side"] == 320 and [s["samples"] for s in index["splits"]["train"]["shards"]] == [4]
    result = run_cli("pack.py", "data=imagenet", f"data.root={tmp_path}/nope", f"out={out}",
                     f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"data.root={tmp_path}/nope is not a folder" in result.stderr


def test_train_py_on_a_folder_without_shards(tmp_path):
    result = run_cli("train.py", "data=shards", f"data.root={tmp_path}", "trainer.device=cpu",
                     f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"no packed shards in data.root={tmp_path}: it has no shards and no index.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_py_on_shards(tmp_path):
    out = tmp_path / "out"
    pack_tree(write_id_tree(tmp_path / "src", train=16, val=6), out, shard_samples=5)
    result = run_cli("train.py", "model=resnet18", "data=shards", f"data.root={out}", "data.image_size=32",
                     "data.val_resize=32", "data.batch_size=8", "trainer.max_epochs=1", "trainer.progress=none",
                     "trainer.device=cpu", "data.num_workers=0", "trainer.compile=false",
                     f"hydra.run.dir={tmp_path}/run", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["count"] == 6
