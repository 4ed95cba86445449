"""Data folders from elsewhere: a CIFAR pickle cannot run code or fill memory, and images cannot
decompress into gigabytes, load half-decoded, or send the folder listing round a symlink loop."""

import os
import pickle
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from rednet.data import build_datamodule, safe_pickle
from rednet.data.cifar import MAX_FILE_BYTES
from rednet.errors import DataError
from tests.conftest import RunsCommand, data_cfg, folder_cfg, raises_one_line, run_cli
from tests.fakedata import make_cifar, make_imagefolder, write_corrupt_image

CIFAR_FILES = [("cifar10", "cifar-10-batches-py", name) for name in ("data_batch_1", "test_batch", "batches.meta")] + \
              [("cifar100", "cifar-100-python", name) for name in ("train", "test", "meta")]


def load_everything(name, root):
    """What train.py reads: the meta file at build time, then the training and validation batches."""
    dm = build_datamodule(data_cfg(name, root=root, download=False))
    return dm.train_set, dm.val_set


def plant(path, payload, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=protocol)


@pytest.mark.parametrize("name,folder,filename", CIFAR_FILES)
def test_a_planted_pickle_never_runs(tmp_path, name, folder, filename):
    root = make_cifar(tmp_path / "data", name, n_train=10 if name == "cifar10" else 100, n_test=10)
    marker = tmp_path / "pwned"
    path = os.path.join(root, folder, filename)
    plant(path, {"data": RunsCommand(f"touch {marker}"), "labels": [0], "label_names": ["x"]})
    with raises_one_line(None) as info:
        load_everything(name, root)
    message = str(info.value)
    assert not marker.exists(), "the payload ran"
    assert message.startswith(f"refusing to load the {'CIFAR-10' if name == 'cifar10' else 'CIFAR-100'} file {path}: ")
    assert "posix.system" in message and "data.download=true" in message


def test_train_py_refuses_a_planted_pickle_with_one_line_and_exit_code_2(tmp_path):
    root = make_cifar(tmp_path / "data", "cifar10", n_train=10, n_test=10)
    marker = tmp_path / "pwned"
    plant(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), {"data": RunsCommand(f"touch {marker}")})
    result = run_cli("train.py", "data=cifar10", f"data.root={root}", "data.download=false", "model=rednet18",
                     "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.device=cpu",
                     "data.num_workers=0", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not marker.exists()
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load the CIFAR-10 file "), lines
    assert "data_batch_1" in lines[0] and "posix.system" in lines[0]


@pytest.mark.parametrize("payload,refused", [
    (RunsCommand("true"), "posix.system"),                                    # the classic, protocol 2
    (np.load, "numpy.load"),                                                   # numpy, but not a reconstructor
    (np.array([1, "a"], dtype=object), "dtype 'O8'"),                          # objects inside an array
    (np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]), "fields or sub-arrays"),   # a record dtype
])
def test_only_plain_data_is_accepted(tmp_path, payload, refused):
    plant(tmp_path / "batch", {"data": payload}, protocol=4)
    with pytest.raises(safe_pickle.RefusedPickle, match=refused):
        safe_pickle.load(tmp_path / "batch", MAX_FILE_BYTES)


# Python 2's cPickle, protocol 2, as it wrote the official CIFAR files: str is a byte string and
# numpy 1's arrays are numpy.core.multiarray._reconstruct + a state whose data is such a string.

def _py2_str(text):
    data = text.encode("latin1") if isinstance(text, str) else text
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def _py2_int(n):
    return b"K" + bytes([n]) if 0 <= n < 256 else b"M" + struct.pack("<H", n) if 0 <= n < 65536 else \
        b"J" + struct.pack("<i", n)


def _py2(obj):
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, (str, bytes)):
        return _py2_str(obj)
    if isinstance(obj, int):
        return _py2_int(obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    shape = b"(" + b"".join(_py2_int(n) for n in obj.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + _py2_str("u1") + _py2_int(0) + _py2_int(1) + b"\x87R" + \
        b"(" + _py2_int(3) + _py2_str("|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0) + b"tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str("b") +
            b"\x87R(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(obj.tobytes()) + b"tb")


def test_the_official_python2_format_and_python3_repacks_load_as_pickle_loads_them(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {"batch_label": f"{name} of 6", "labels": rng.integers(0, 10, 4).tolist(),
                 "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(4)]}
        (folder / name).write_bytes(b"\x80\x02" + _py2(entry) + b".")
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 4, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(b"\x80\x02" + _py2(meta) + b".")

    for name in ["test_batch", "batches.meta"]:  # the reference: the standard unpickler, on files we made
        expected = pickle.loads((folder / name).read_bytes(), encoding="latin1")
        got = safe_pickle.load(folder / name, MAX_FILE_BYTES)
        assert got.keys() == expected.keys()
        for key in expected:
            assert np.array_equal(got[key], expected[key]) if key == "data" else got[key] == expected[key]
    expected = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")
    dm = build_datamodule(data_cfg("cifar10", root=tmp_path, download=False))
    assert dm.class_names == meta["label_names"]
    images, labels = zip(*[dm.val_set[i] for i in range(4)])
    assert list(labels) == expected["labels"]
    assert np.array_equal(np.stack([x.numpy() for x in images]).reshape(4, 3072), expected["data"])

    # Re-packed by Python 3 with numpy 2, at every protocol, with numpy integers as labels.
    repack = {"data": expected["data"], "labels": [np.int64(v) for v in expected["labels"]], "batch_label": b"bytes"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        plant(folder / "test_batch", repack, protocol)
        got = safe_pickle.load(folder / "test_batch", MAX_FILE_BYTES)
        assert np.array_equal(got["data"], expected["data"]) and got["labels"] == expected["labels"]
        assert got["batch_label"] == b"bytes"


def test_sizes_a_file_claims_are_bounded_by_what_it_holds(tmp_path):
    huge = tmp_path / "data_batch_1"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used, never read
    with pytest.raises(safe_pickle.RefusedPickle, match=r"it is 512 MiB, more than the 512 MiB"):
        safe_pickle.load(huge, MAX_FILE_BYTES)

    class Array:  # numpy's own pickled form of an array, with the state the file chooses
        def __init__(self, shape, data):
            self.shape, self.data = shape, data

        def __reduce__(self):
            return np.zeros(0).__reduce__()[0], (np.ndarray, (0,), b"b"), \
                (1, self.shape, np.dtype("u1"), False, self.data)

    plant(tmp_path / "absurd", {"data": Array((10**12,), b"")})
    with pytest.raises(safe_pickle.RefusedPickle, match=r"shape \(1000000000000,\).*more than the file holds"):
        safe_pickle.load(tmp_path / "absurd", MAX_FILE_BYTES)
    # One 1 MB string in the memo, rebuilt into 1,000 arrays: 1 GB from a 1 MB file with pickle.load.
    chunk = "x" * 2**20
    plant(tmp_path / "copies", {"data": [Array((2**20,), chunk) for _ in range(1000)]})
    assert os.path.getsize(tmp_path / "copies") < 2 * 2**20
    with pytest.raises(safe_pickle.RefusedPickle, match="more (bytes )?than the file holds"):
        safe_pickle.load(tmp_path / "copies", MAX_FILE_BYTES)


def test_a_memo_index_cannot_allocate_gigabytes(tmp_path):
    # LONG_BINPUT 2**26: the C unpickler grows its memo array to 2**27 pointers (1 GiB) and zeroes it.
    path = tmp_path / "memo"
    path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2**26) + b".")
    # A fresh process, so that its peak memory is the load's; the module alone, without torch.
    code = ("import importlib.util as u, resource, sys; spec = u.spec_from_file_location('sp', sys.argv[1]); "
            "sp = u.module_from_spec(spec); spec.loader.exec_module(sp); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; assert sp.load(sys.argv[2], 2**20) is None; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    result = subprocess.run([sys.executable, "-c", code, safe_pickle.__file__, str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 100 * 1024  # KiB of peak memory the load added


# Images

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, below 2 x its limit
def test_a_decompression_bomb_is_an_error_naming_the_file_or_skipped(tmp_path):
    root = make_imagefolder(tmp_path, n_train=1, n_val=1)
    bomb = os.path.join(root, "val", "dog", "bomb.png")
    # 96 megapixels in a few kB; PIL itself only warns below 2 x its limit.
    Image.new("1", (12000, 8000)).save(bomb)
    assert os.path.getsize(bomb) < 100_000
    dm = build_datamodule(folder_cfg(root))
    index = [path for path, _ in dm.val_set.samples].index(bomb)
    with raises_one_line(r"unreadable image .*bomb\.png \(DecompressionBombError: 12000 x 8000 pixels"
                         r" is more than the 89478485 allowed"):
        dm.val_set[index]
    skipping = build_datamodule(folder_cfg(root, bad_images="skip"))
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*bomb\.png"):
        assert skipping.val_set[index] is None


def test_a_truncated_image_is_an_error_even_if_someone_allowed_them(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path, n_train=1, n_val=1)
    cut = write_corrupt_image(os.path.join(root, "val", "cat", "cut.jpg"), kind="truncated")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries and notebooks do
    dm = build_datamodule(folder_cfg(root))
    index = [path for path, _ in dm.val_set.samples].index(cut)
    with pytest.raises(DataError, match=r"unreadable image .*cut\.jpg \(OSError: image file is truncated"):
        dm.val_set[index]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the user's setting is theirs again afterwards


def test_a_symlink_loop_is_an_error_not_a_hang(tmp_path):
    root = make_imagefolder(tmp_path, n_train=1, n_val=1)
    elsewhere = make_imagefolder(tmp_path / "elsewhere", classes=("more",), n_train=2, n_val=1)
    os.symlink(os.path.join(elsewhere, "train", "more"), os.path.join(root, "train", "dog", "more"))  # not a loop
    assert len(build_datamodule(folder_cfg(root)).train_set) == 5

    # Two links back up double the walk at every level: torchvision's os.walk never finishes.
    os.symlink("..", os.path.join(root, "train", "cat", "up"))
    os.symlink("../..", os.path.join(root, "train", "cat", "way_up"))

    class Hang(Exception):  # not an OSError, which os.walk would swallow
        pass

    def hang(signum, frame):
        raise Hang("the listing did not finish in 30 s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        with pytest.raises(DataError, match=r"symlink loop in the image folder: \S*/train/cat/\S+ leads back to "
                                            r"\S+, which contains it; remove or replace the link"):
            _ = build_datamodule(folder_cfg(root)).train_set
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
