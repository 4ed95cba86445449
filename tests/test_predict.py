"""predict.py and rednet.Predictor: the classes eval.py's pipeline gives, image by image; the same top-1
from the exported .onnx as from the checkpoint; the files and the summary; pictures of every kind
converted as a viewer shows them; and each user mistake as one line and exit status 2."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rednet.data.files import find_images
from rednet.data.transforms import normalize_batch
from rednet.errors import ConfigError, DataError
from rednet.io import save_checkpoint
from rednet.models import build_model, create_model
from rednet.predict import Predictor, predict_command
from tests.conftest import ROOT, command_config, compose_config, run_cli
from tests.fakedata import make_imagefolder, write_corrupt_image
from tests.photos import photo, write_formats

README = ROOT / "README.md"
DIGITS_MEAN, DIGITS_STD = [0.3054], [0.3761]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def digits_uint8(x: np.ndarray) -> torch.Tensor:
    """The digits split's uint8 (N, 1, 8, 8) images (rednet.data.digits), the 8-bit pictures a user would have."""
    assert x.dtype == np.uint8
    return torch.from_numpy(x)


def fit_classifier(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, classes: int,
                   ridge: float = 1e-2) -> None:
    """Trains ``model`` in a second or two: its classifier alone, fitted in closed form (ridge
    regression on one-hot targets) to the random network's features: on digits about 90% right,
    with confident answers (no near-ties for a rounding difference to flip)."""
    features = []
    hook = model.head.fc.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, 2 threads took 5x longer than 1
    try:
        with torch.no_grad():
            for chunk in inputs.split(128):
                model(chunk)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    f = torch.cat([torch.cat(features), torch.ones(len(inputs), 1)], 1).double()
    y = torch.nn.functional.one_hot(targets, classes).double()
    w = torch.linalg.solve(f.T @ f + ridge * torch.eye(f.shape[1], dtype=torch.float64), f.T @ y) * 20
    model.head.fc.weight.data.copy_(w[:-1].T.float())
    model.head.fc.bias.data.copy_(w[-1].float())


def as_input(image: torch.Tensor, data_cfg) -> torch.Tensor:
    """A validation set's image as the model's input batch of one: uint8 sets are normalised as
    the trainer does (engine/feed.py), older ones come normalised."""
    if image.dtype == torch.uint8:
        return normalize_batch(image[None], data_cfg.mean, data_cfg.std)
    return image[None]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A RedNet-18 trained a little on digits (in the trainer's checkpoint format), its test split
    as PNG files, and the model and the uint8 images as a reference."""
    from rednet.data.digits import split

    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = split(0)
    train, test = digits_uint8(x_train), digits_uint8(x_test)
    torch.manual_seed(0)
    model = create_model("rednet18", num_classes=10, in_chans=1, cifar_stem=True, zero_init_residual=False).eval()
    fit_classifier(model, torch.cat([normalize_batch(c, DIGITS_MEAN, DIGITS_STD) for c in train.split(128)]),
                   torch.from_numpy(y_train), 10)
    cfg = compose_config(["data=digits", "trainer.device=cpu"])
    save_checkpoint({"model": model.state_dict(), "class_names": [str(i) for i in range(10)],
                     "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}, root / "best.pt")
    images = root / "images"
    images.mkdir()
    files = []
    for k, image in enumerate(test):
        files.append(images / f"{k:03d}.png")
        Image.fromarray(image[0].numpy(), "L").save(files[-1])
    return {"root": root, "ckpt": root / "best.pt", "model": model, "files": files, "images": test,
            "targets": y_test}


@pytest.fixture(scope="module")
def digits_onnx(digits):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rednet.deploy.export import export_checkpoint
    from rednet.engine.trained import open_trained

    cfg = compose_config(["data=digits", f"ckpt={digits['ckpt']}"], name="export")
    export_checkpoint(cfg, open_trained(digits["ckpt"]))
    return digits["root"] / "model.onnx"


# -- the same answers as eval.py's pipeline -------------------------------------------------------------

def test_checkpoint_on_files_gives_the_models_answer_on_the_pixels(digits):
    """The PNG files through predict give what the model says about the same pixels in memory."""
    predictor = Predictor(digits["ckpt"], device="cpu")
    got = predictor.predict(digits["files"])
    with torch.no_grad():
        probs = digits["model"](normalize_batch(digits["images"], DIGITS_MEAN, DIGITS_STD)).softmax(1)
    assert [p.index for p in got] == probs.argmax(1).tolist()
    np.testing.assert_allclose([p.probability for p in got], probs.max(1).values.numpy(), rtol=0, atol=1e-5)
    accuracy = np.mean([p.index == t for p, t in zip(got, digits["targets"])])
    assert accuracy > 0.8  # the files were read as the digits they are
    assert got[0].topk[0] == (got[0].class_name, got[0].index, got[0].probability)
    assert len(got[0].topk) == 5 and sorted([g.probability for g in got[0].topk], reverse=True) == \
        [g.probability for g in got[0].topk]


def test_onnx_gives_the_checkpoints_top1_on_every_digits_image(digits, digits_onnx):
    from_pt = Predictor(digits["ckpt"], device="cpu").predict(digits["files"])
    from_onnx = Predictor(digits_onnx).predict(digits["files"])
    assert len(from_pt) == len(digits["files"]) == 360
    assert [p.index for p in from_onnx] == [p.index for p in from_pt]
    np.testing.assert_allclose([p.probability for p in from_onnx], [p.probability for p in from_pt], atol=1e-4)


def test_an_official_layout_file_with_model_named(digits, tmp_path):
    """An official mmcls-layout .pth carries no config and no class names: model= (and the data
    group) come from the caller, and the classes are shown by index."""
    torch.save({"state_dict": digits["model"].state_dict()}, tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="carries no config"):
        Predictor(tmp_path / "r18.pth")
    official = Predictor(tmp_path / "r18.pth", model="rednet18", overrides=["data=digits"], device="cpu")
    got = official.predict(digits["files"][:20])
    expected = Predictor(digits["ckpt"], device="cpu").predict(digits["files"][:20])
    assert [(p.class_name, p.index) for p in got] == [(str(p.index), p.index) for p in expected]


def test_imagefolder_predict_equals_the_validation_set_and_eval_accuracy(tmp_path):
    """Image by image against the model run on DataModule.val_set (the pipeline eval.py runs), and
    the accuracy against the folder names equals eval.py's metrics.json acc1."""
    from rednet.data import build_datamodule
    from rednet.engine.evaluate import evaluate_trained

    root = make_imagefolder(tmp_path / "data", n_train=2, n_val=5, size=(40, 52))
    cfg = compose_config(["model=resnet18", "data=imagenet", f"data.root={root}", "data.image_size=32",
                          "data.val_resize=36", "data.num_workers=0", "trainer.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, 3, 32).eval()
    val = build_datamodule(cfg.data).val_set
    inputs = [as_input(val[i][0], cfg.data) for i in range(len(val))]
    targets = torch.tensor([target for _, target in val.samples])
    targets[::5] = (targets[::5] + 1) % 3  # taught wrong on 3 of the 15: an accuracy below 100%
    fit_classifier(model, torch.cat(inputs), targets, 3, ridge=1e-6)
    save_checkpoint({"model": model.state_dict(), "class_names": ["cat", "dog", "fox"],
                     "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}, tmp_path / "best.pt")

    pcfg, trained = command_config("predict", [f"ckpt={tmp_path}/best.pt", f"images={root}/val", "topk=2",
                                               "trainer.progress=none", "data.batch_size=4"])
    predictions = predict_command(pcfg, trained, tmp_path / "predict")
    by_path = {p.source: p for p in predictions}

    assert len(predictions) == len(val.samples) == 15
    for (path, _), x in zip(val.samples, inputs):
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        assert by_path[path].index == int(probs.argmax()), path
        # another batch size (and memory layout) than eval's: the same top-1, to a rounding difference
        assert by_path[path].probability == pytest.approx(float(probs.max()), abs=1e-4)
    assert len({p.index for p in predictions}) > 1

    eval_cfg, eval_trained = command_config("eval", [f"ckpt={tmp_path}/best.pt", "trainer.progress=none"])
    evaluate_trained(eval_cfg, eval_trained, tmp_path / "eval")
    acc1 = json.loads((tmp_path / "eval/metrics.json").read_text())["acc1"]
    with open(tmp_path / "predict/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert 0.5 < acc1 < 1
    assert acc1 == pytest.approx(np.mean([Path(r["path"]).parent.name == r["class_1"] for r in rows]))


# -- the command line ---------------------------------------------------------------------------------

def test_command_line_files_summary_and_an_unreadable_image(digits, tmp_path):
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    for k, file in enumerate(digits["files"][:6]):
        shutil.copy(file, images / ("more" if k % 2 else "") / file.name)
    write_corrupt_image(images / "broken.png")
    result = run_cli("predict.py", f"ckpt={digits['ckpt']}", f"images={images}", "topk=3", "show=true",
                     "trainer.device=cpu", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    expected = {str(p.source): p for p in Predictor(digits["ckpt"], device="cpu").predict(
        sorted(images.rglob("*.png")), bad_images="skip")}
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 8  # a line per image, then the summary
    assert [line.split(": ")[0] for line in lines[:-1]] == sorted(str(p) for p in images.rglob("*.png"))
    assert f"{images}/broken.png: unreadable (not an image file that PIL can read)" in lines
    p = expected[str(images / "000.png")]
    assert f"{images}/000.png: " + ", ".join(f"{g.class_name} {g.probability:.1%}" for g in p.topk[:3]) in lines
    good = [p for p in expected.values() if p.error is None]
    counts = {}
    for p in good:
        counts[p.class_name] = counts.get(p.class_name, 0) + 1
    assert lines[-1].startswith("7 images: ") and f"; 1 unreadable; predictions.csv, predictions.json, " \
        f"predictions.png in {run}" in lines[-1]
    for name, n in counts.items():
        assert f"{name} ({n})" in lines[-1]

    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "class_1", "probability_1", "index_1", "class_2", "probability_2", "index_2",
                             "class_3", "probability_3", "index_3", "error"]
    assert [r["path"] for r in rows] == sorted(str(p) for p in images.rglob("*.png"))
    for row in rows:
        p = expected[row["path"]]
        if p.error:
            assert row["error"] and row["class_1"] == ""
            continue
        assert row["error"] == "" and row["class_1"] == p.class_name and int(row["index_1"]) == p.index
        assert float(row["probability_1"]) == pytest.approx(p.probability, abs=1e-6)
        assert [row[f"class_{r}"] for r in (1, 2, 3)] == [g.class_name for g in p.topk[:3]]

    report = json.loads((run / "predictions.json").read_text())
    assert report["count"] == 7 and report["topk"] == 3 and report["checkpoint"] == str(digits["ckpt"])
    assert report["unreadable"] == [{"path": f"{images}/broken.png", "error": expected[f"{images}/broken.png"].error}]
    assert report["per_class"] == counts
    assert [p["topk"][0]["index"] for p in report["predictions"] if p["error"] is None] == [p.index for p in good]
    with Image.open(run / "predictions.png") as png:
        assert png.width > 600 and png.height > 250


def run_predict(tmp_path, *args):
    return run_cli("predict.py", *args, "trainer.device=cpu", f"hydra.run.dir={tmp_path}/run")


def assert_nothing_written(tmp_path):
    assert not list(tmp_path.glob("run/predictions.*"))


def test_no_images_matched(digits, tmp_path):
    result = run_predict(tmp_path, f"ckpt={digits['ckpt']}", f"images={tmp_path}/*.jpg")
    assert_one_line_error(result, f"images={tmp_path}/*.jpg matched no image files")
    assert_nothing_written(tmp_path)


def test_a_checkpoint_that_is_a_directory(digits, tmp_path):
    result = run_predict(tmp_path, f"ckpt={digits['root']}", f"images={digits['files'][0]}")
    assert_one_line_error(result, f"checkpoint {digits['root']} is a directory")
    assert_nothing_written(tmp_path)


def test_a_truncated_checkpoint(digits, tmp_path):
    data = digits["ckpt"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    result = run_predict(tmp_path, f"ckpt={tmp_path}/cut.pt", f"images={digits['files'][0]}")
    assert_one_line_error(result, f"checkpoint {tmp_path}/cut.pt is truncated")
    assert_nothing_written(tmp_path)


def test_topk_larger_than_the_classes(digits, tmp_path):
    result = run_predict(tmp_path, f"ckpt={digits['ckpt']}", f"images={digits['files'][0]}", "topk=11")
    assert_one_line_error(result, "topk=11 but the model has 10 classes; give topk between 1 and 10")
    assert_nothing_written(tmp_path)


def test_an_onnx_file_without_its_sidecar(digits, digits_onnx, tmp_path):
    shutil.copy(digits_onnx, tmp_path / "alone.onnx")
    result = run_predict(tmp_path, f"ckpt={tmp_path}/alone.onnx", f"images={digits['files'][0]}")
    assert_one_line_error(result, f"{tmp_path}/alone.onnx has no sidecar alone.json")
    assert_nothing_written(tmp_path)


def predict_in_process(capsys, monkeypatch, *args) -> str:
    """predict.py through the command's own entry point (cli.predict), in this process: its one
    line on stderr, after exit status 2."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from rednet import cli

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["predict.py", *args, "trainer.device=cpu", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.predict()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_images_error_stops_and_writes_nothing(digits, tmp_path, capsys, monkeypatch):
    write_corrupt_image(tmp_path / "images/bad.jpg", "truncated")
    shutil.copy(digits["files"][0], tmp_path / "images/good.png")
    error = predict_in_process(capsys, monkeypatch, f"ckpt={digits['ckpt']}", f"images={tmp_path}/images",
                               "bad_images=error", f"hydra.run.dir={tmp_path}/run")
    assert error.startswith(f"error: {tmp_path}/images/bad.jpg is not a readable image (")
    assert "bad_images=skip" in error
    assert_nothing_written(tmp_path)


def test_images_left_out(digits, tmp_path, capsys, monkeypatch):
    error = predict_in_process(capsys, monkeypatch, f"ckpt={digits['ckpt']}", f"hydra.run.dir={tmp_path}/run")
    assert error == "error: predict.py needs images: images=photo.jpg, a folder, a glob such as 'photos/*.jpg', " \
                    "or a list [a.jpg,b.png]"


# -- images= ------------------------------------------------------------------------------------------

def test_find_images_takes_files_folders_globs_and_lists(tmp_path):
    for name in ("b.jpg", "a.png", "sub/c.JPEG", ".hidden/d.jpg", "notes.txt", "sub/deeper/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    t = tmp_path
    assert find_images(t) == [t / "a.png", t / "b.jpg", t / "sub/c.JPEG", t / "sub/deeper/e.png"]
    assert find_images(str(t / "*.jpg")) == [t / "b.jpg"]
    assert find_images(str(t / "**/*.png")) == [t / "a.png", t / "sub/deeper/e.png"]
    # a list keeps its order; what two entries both name comes once; a file named outright is taken as it is
    assert find_images([str(t / "b.jpg"), str(t / "sub"), str(t / "notes.txt"), str(t / "b.jpg")]) == \
        [t / "b.jpg", t / "sub/c.JPEG", t / "sub/deeper/e.png", t / "notes.txt"]
    with pytest.raises(DataError, match="no such file or folder"):
        find_images([str(t / "b.jpg"), str(t / "missing.jpg")])
    with pytest.raises(DataError, match=re.escape(f"images={t}/*.gif matched no image files")):
        find_images(str(t / "*.gif"))
    with pytest.raises(DataError, match="images= is empty"):
        find_images([])


# -- pictures of every kind ---------------------------------------------------------------------------

def tiny_predictor(in_chans: int, size: int = 32) -> Predictor:
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(in_chans, 2))
    return Predictor(model, data={"image_size": size, "mean": [0.5] * in_chans, "std": [0.25] * in_chans},
                     class_names=["a", "b"], device="cpu")


def model_input(predictor: Predictor, source) -> torch.Tensor:
    name, image, error = predictor.load(source)
    assert error is None, error
    return image.int()


def test_every_kind_of_picture_is_converted_as_a_viewer_shows_it(tmp_path):
    """Each file's input against the same picture converted by hand (PIL's convert of the RGB or
    grey original: what eval.py reads), and the conversions PIL alone gets wrong: a 16-bit PNG
    (clipped to white) and an EXIF orientation (ignored)."""
    files = write_formats(tmp_path)
    rgb, grey = tiny_predictor(3), tiny_predictor(1)
    original, _ = photo(0)
    reference = model_input(rgb, original)
    reference_grey = model_input(grey, original.convert("L"))

    assert (model_input(rgb, files["rgb.png"]) == reference).all()
    assert (model_input(rgb, files["rgb.jpg"]) - reference).abs().float().mean() < 3
    with Image.open(files["rgba.png"]) as rgba:  # alpha dropped, as torchvision's ImageFolder does
        assert (model_input(rgb, files["rgba.png"]) == model_input(rgb, rgba.convert("RGB"))).all()
    assert (model_input(rgb, files["cmyk.jpg"]) - reference).abs().float().mean() < 6
    # grey for an RGB model: the grey in all three channels
    assert (model_input(rgb, files["grey.png"]) == reference_grey.expand(3, -1, -1)).all()
    assert (model_input(grey, files["rgb.png"]) == reference_grey).all()  # RGB for a grey model: its luma

    # A real 16-bit PNG (0-65535): PIL's own convert would clip nearly all of it to white.
    deep = np.asarray(original.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    with Image.open(tmp_path / "deep16.png") as png:
        assert png.mode.startswith("I")
        assert (model_input(rgb, png.convert("RGB")) > 250).float().mean() > 0.9
    assert (model_input(grey, tmp_path / "deep16.png") == reference_grey).all()
    # 8-bit values in a 16-bit file are near black, as a viewer shows them (out of 65535)
    assert model_input(grey, files["grey16.png"]).max() <= 1

    # A phone's photo: stored on its side, with the EXIF orientation that turns it upright.
    upright = original.crop((0, 0, 480, 320))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    got = model_input(rgb, tmp_path / "phone.jpg").float()
    assert (got - model_input(rgb, upright).float()).abs().mean() < 3
    assert (got - model_input(rgb, upright.transpose(Image.Transpose.ROTATE_90)).float()).abs().mean() > 20


def test_paths_pil_images_arrays_and_tensors_give_the_same_answer(tmp_path):
    predictor = tiny_predictor(3)
    image = photo(1)[0]
    image.save(tmp_path / "p.png")
    array = np.array(image)
    inputs = [tmp_path / "p.png", str(tmp_path / "p.png"), image, array, array / 255.0,
              torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1) / 255.0]
    got = predictor.predict(inputs)
    assert len({(p.index, round(p.probability, 6)) for p in got}) == 1
    assert [p.source for p in got][1:4] == [str(tmp_path / "p.png"), "<image 2>", "<image 3>"]
    assert predictor(array).index == got[0].index  # one image: one Prediction
    with pytest.raises(DataError, match=r"<image 0> \(an array\) has shape \(2, 3, 5\)"):
        predictor(np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(ConfigError, match="topk=3 but the model has 2 classes"):
        predictor(array, topk=3)
    with pytest.raises(DataError, match="not a readable image"):
        predictor(write_corrupt_image(tmp_path / "x.jpg"))
    assert predictor.predict([write_corrupt_image(tmp_path / "x.jpg")], bad_images="skip")[0].error


def test_the_readme_snippet_runs_as_written(digits, tmp_path, monkeypatch, capsys):
    text = README.read_text().split("## Predict your own images", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(snippet.strip().splitlines()) == 3
    paths = re.findall(r'"([^"]+\.(?:pt|png|jpg))"', snippet)
    ckpt, image = paths[0], paths[1]
    monkeypatch.chdir(tmp_path)
    for path in (ckpt, image):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(digits["ckpt"], ckpt)
    shutil.copy(digits["files"][0], image)
    exec(compile(snippet, "README", "exec"), {})
    with torch.no_grad():
        expected = digits["model"](normalize_batch(digits["images"][:1], DIGITS_MEAN, DIGITS_STD)).argmax(1)
    assert capsys.readouterr().out.strip() == str(int(expected))
