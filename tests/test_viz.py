"""Kernel heat-maps, the kernels at one point, misclassified.png and trainer.log_kernels."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rednet.engine.evaluate import evaluate, write_misclassified
from rednet.engine.feed import DeviceFeed
from rednet.engine.trainer import Trainer
from rednet.errors import UserError
from rednet.models import create_model
from rednet.visualize import visualize_checkpoint
from rednet.viz import capture_kernels, kernel_heatmaps, kernels_at
from rednet.viz.kernels import map_position
from tests.conftest import FAST, command_config, compose_config, run_cli, tiny
from tests.fakedata import make_imagefolder

TINY = tiny(data="digits", batch_size=16, train_batches=2, val_batches=1)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A checkpoint as training writes it (weights, config, class names), of an untrained RedNet-18 for digits."""
    from omegaconf import OmegaConf

    from rednet.models import build_model

    cfg = compose_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1, 8)
    path = tmp_path_factory.mktemp("viz") / "digits.pt"
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                "class_names": [str(i) for i in range(10)]}, path)
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two short epochs on digits with trainer.log_kernels=true (one logged image, to save time)."""
    run = tmp_path_factory.mktemp("viz") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rednet.viz.kernels.LOGGED_IMAGES", 1)
        Trainer(compose_config(TINY + ["trainer.max_epochs=2", "trainer.log_kernels=true"]), run).fit()
    return run


def visualize(tmp_path, ckpt, overrides):
    """visualize.py's work in this process: the config as the command line composes it, then the checkpoint's."""
    cfg, trained = command_config("visualize", FAST + [f"ckpt={ckpt}"] + overrides)
    return visualize_checkpoint(cfg, trained, tmp_path / "vis")


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: a truncated PNG fails here
        return image.size


def generator_output(model, path, images):
    """Independent of rednet.viz: the named involution's input, output and generator output (hooked)."""
    layer = model.get_submodule(path)
    seen = {}
    hooks = [layer.conv2.conv.register_forward_hook(lambda m, i, o: seen.update(weight=o)),
             layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen["x"], seen["y"], seen["weight"]


@pytest.mark.parametrize("model_name,path,name,shape", [
    ("rednet18", "backbone.layer1.1.conv2", "layer1.1", (1, 8, 8)),  # digits: 8x8 grey
    ("rednet26", "backbone.layer2.0.conv2", "layer2.0", (3, 20, 28)),  # stride 2, non-square RGB
])
def test_heatmaps_are_the_generated_kernels_summed(model_name, path, name, shape):
    torch.manual_seed(0)
    model = create_model(model_name, 10, in_chans=shape[0], cifar_stem=True, zero_init_residual=False).eval()
    images = torch.randn(2, *shape)
    x, y, weight = generator_output(model, path, images)
    layer = model.get_submodule(path)
    k, groups = layer.kernel_size, layer.groups
    kernels, logits = capture_kernels(model, images, [name])
    b, _, ho, wo = weight.shape
    assert kernels[name].shape == (2, groups, k * k, ho, wo)
    # What the operator used: the layer's output is the involution of its input with these kernels.
    from rednet.ops import involution

    torch.testing.assert_close(involution(x, kernels[name], k, layer.stride, impl="unfold"), y, rtol=1e-4, atol=1e-4)
    # The paper's map: per group, the sum of the K*K values, then upsampled to the image.
    summed = torch.zeros(b, groups, ho, wo)
    for g in range(groups):
        for i in range(k * k):
            summed[:, g] += weight[:, g * k * k + i]
    expected = F.interpolate(summed, size=shape[1:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(kernel_heatmaps(kernels[name], shape[1:]), expected, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 10)
    if layer.stride == 2:
        assert (ho, wo) == (math.ceil(x.shape[2] / 2), math.ceil(x.shape[3] / 2))


def test_kernel_at_a_point_is_the_one_applied_there():
    torch.manual_seed(0)
    model = create_model("rednet26", 10, in_chans=1, cifar_stem=True, zero_init_residual=False).eval()
    images = torch.randn(1, 1, 8, 8)
    x, y, _ = generator_output(model, "backbone.layer2.0.conv2", images)  # stride 2: an 8x8 map to 4x4
    kernels, _ = capture_kernels(model, images, ["layer2.0"])
    point = (7, 3)  # image pixel -> the map pixel covering it: (7 * 4 // 8, 3 * 4 // 8), not rounded
    assert map_position(point, (8, 8), (4, 4)) == (3, 1)
    kernel = kernels_at(kernels["layer2.0"], (3, 1))[0]  # (G, 7, 7), row = vertical offset
    padded = F.pad(x, (3, 3, 3, 3))
    per_group = x.shape[1] // kernel.shape[0]
    for c in (0, per_group, x.shape[1] - 1):  # channels of the first, second and last group
        window = padded[0, c, 3 * 2:3 * 2 + 7, 1 * 2:1 * 2 + 7]  # stride 2, the padding of 3 included
        assert float((kernel[c // per_group] * window).sum()) == pytest.approx(float(y[0, c, 3, 1]), abs=1e-4)


def test_visualize_on_digits_validation_images(tmp_path, digits_ckpt):
    written = visualize(tmp_path, digits_ckpt, ["num_images=1"])
    assert [p.name for p in written] == ["val00000_heatmaps.png", "val00000_kernels.png"]
    heat, kernels = png_size(written[0]), png_size(written[1])
    # 13 inches at 100 dpi; rows: four stages of 4, 8, 16 and 32 groups, 8 maps or 16 kernels a row.
    assert heat[0] == kernels[0] == 1300
    assert 900 < heat[1] < 1400 and 400 < kernels[1] < 800


def test_imagefolder_non_square_official_checkpoint_stride_2(tmp_path):
    root = make_imagefolder(tmp_path / "folder", classes=("cat", "dog"), n_train=1, n_val=1, size=(40, 56))
    assert len(os.listdir(f"{root}/val")) == 2
    # An official mmcls release: a state_dict and no config, so model= and data= come from the command line.
    model = create_model("rednet26", num_classes=2, cifar_stem=True)
    torch.save({"meta": {}, "state_dict": model.state_dict()}, tmp_path / "official.pth")
    written = visualize(tmp_path, tmp_path / "official.pth",
                        ["model=rednet26", "data=imagenet", f"data.root={root}", "data.image_size=32",
                         "data.val_resize=36", f"images={root}/val", "num_images=1", "layers=[layer2.0]",
                         "point=[30,40]"])
    assert [p.name for p in written] == ["cat_cat_000_heatmaps.png", "cat_cat_000_kernels.png"]
    for path in written:
        width, height = png_size(path)
        assert width == 1300 and 300 <= height < 500  # one layer of 8 groups: one row


@pytest.mark.parametrize("override,fragments", [
    ("layers=[layer1.1,layer9.0]", ["layers=['layer1.1', 'layer9.0']", "'layer9.0' is not an involution layer of "
                                    "rednet18", "choose from: stem.1, layer1.0, layer1.1, layer2.0"]),
    ("layers=[]", ["layers=[]", "choose from: stem.1, layer1.0"]),
    ("point=[8,3]", ["point=[8, 3]", "8x8", "y in 0..7 and x in 0..7"]),
    ("point=[1]", ["point=[1]", "point=[y,x]"]),
    ("images=/no/such/place", ["images=/no/such/place: no such file or folder", ".jpg, .jpeg, .png"]),
    ("images=EMPTY", ["holds no image files", ".jpg, .jpeg, .png"]),
    ("images=NOT_AN_IMAGE", ["broken.png is not a readable image", ".jpg, .jpeg, .png"]),
    ("num_images=0", ["num_images=0 must be at least 1"]),
])
def test_bad_values_are_one_line_errors(tmp_path, digits_ckpt, override, fragments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png\n" * 4)
    override = override.replace("EMPTY", str(tmp_path / "empty")).replace("NOT_AN_IMAGE", str(tmp_path / "broken.png"))
    with pytest.raises(UserError) as error:
        visualize(tmp_path, digits_ckpt, [override])
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "vis").exists()  # checked before anything is drawn


@pytest.mark.slow
def test_visualize_command_line(tmp_path, digits_run):
    ckpt = f"ckpt={digits_run}/checkpoints/best.pt"
    result = run_cli("visualize.py", ckpt, "num_images=2", f"hydra.run.dir={tmp_path}/vis")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == [
        "val00000_heatmaps.png", "val00000_kernels.png", "val00001_heatmaps.png", "val00001_kernels.png"]
    result = run_cli("visualize.py", ckpt, "layers=layer7.1", f"hydra.run.dir={tmp_path}/bad")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["error: layers=['layer7.1']: 'layer7.1' is not an involution layer of rednet18; choose from: "
                      "stem.1, layer1.0, layer1.1, layer2.0, layer2.1, layer3.0, layer3.1, layer4.0, layer4.1"]
    assert not list((tmp_path / "bad").glob("*.png"))


@pytest.mark.slow
def test_log_kernels_writes_heatmaps_at_every_validation(digits_run):
    events = EventAccumulator(str(digits_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "kernels/val00000" in events.Tags()["images"]
    logged = events.Images("kernels/val00000")
    assert [e.step for e in logged] == [1, 2]
    assert logged[0].width == 1300


@pytest.fixture(scope="module")
def digits():
    from rednet.data import build_datamodule

    return build_datamodule(compose_config(TINY).data)


def test_misclassified_are_the_most_confident_mistakes(tmp_path, digits):
    torch.manual_seed(0)
    model = create_model("rednet18", 10, in_chans=1, cifar_stem=True, zero_init_residual=False).eval()
    data = digits
    # two batches: the running top-5 is merged
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data.val_set, range(32)), batch_size=16)
    batches = DeviceFeed(loader, "cpu", data.mean, data.std)
    result = evaluate(model, batches, torch.device("cpu"), None, list(data.class_names), keep_mistakes=5)
    # Independently: every image's prediction, the wrong ones ranked by the softmax of the prediction.
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    images = (torch.stack([data.val_set[i][0] for i in range(32)]).double() / 255 - mean) / std
    targets = torch.tensor([data.val_set[i][1] for i in range(32)])
    with torch.no_grad():
        probs = model(images.float()).softmax(1)
    ranked = sorted(((float(probs[i].max()), i) for i in range(32) if int(probs[i].argmax()) != int(targets[i])),
                    reverse=True)[:5]
    assert len(ranked) == 5
    assert [m.confidence for m in result.mistakes] == pytest.approx([c for c, _ in ranked], abs=1e-5)
    assert [(m.target, m.pred) for m in result.mistakes] == [(int(targets[i]), int(probs[i].argmax()))
                                                              for _, i in ranked]
    for m, (_, i) in zip(result.mistakes, ranked):
        torch.testing.assert_close(m.image.double(), images[i], rtol=0, atol=1e-6)
    path = write_misclassified(result, list(data.class_names), compose_config(TINY).data, tmp_path)
    width, height = png_size(path)
    assert width > 5 * 150 and height > 200  # five images in one row, titled


def test_no_mistakes_gives_a_note(tmp_path, capsys, digits):
    model = create_model("rednet18", 10, in_chans=1, cifar_stem=True)
    with torch.no_grad():  # always "0", and every image here is a 0
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.arange(10, 0, -1).float())
    data = digits
    zeros = [i for i in range(len(data.val_set)) if data.val_set[i][1] == 0][:6]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data.val_set, zeros), batch_size=4)  # two batches
    batches = DeviceFeed(loader, "cpu", data.mean, data.std)
    result = evaluate(model, batches, torch.device("cpu"), None, list(data.class_names), keep_mistakes=16)
    assert result.acc1 == 1.0 and result.mistakes == []
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as writer:
        path = write_misclassified(result, list(data.class_names), compose_config(TINY).data, tmp_path, writer)
    assert "no mistakes: all 6 images were classified correctly" in capsys.readouterr().out
    assert png_size(path) == (600, 160)  # the note, not a grid
    assert "eval/misclassified" in EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["images"]


@pytest.mark.slow
def test_ddp_eval_gathers_the_mistakes_of_every_rank(tmp_path, digits_run):
    import subprocess
    import sys

    from tests.conftest import ROOT

    ckpt = f"ckpt={digits_run}/checkpoints/last.pt"
    single = run_cli("eval.py", ckpt, "trainer=cpu", f"hydra.run.dir={tmp_path}/one", timeout=1200)
    assert single.returncode == 0, single.stderr
    both = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "eval.py"), ckpt, "trainer=ddp", f"hydra.run.dir={tmp_path}/two"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert both.returncode == 0, both.stderr[-3000:]
    one, two = (np.asarray(Image.open(tmp_path / d / "misclassified.png")) for d in ("one", "two"))
    assert one.shape == two.shape and (one == two).all()


def test_log_kernels_needs_a_rednet():
    from rednet.config import validate

    validate(compose_config(["model=rednet26", "trainer.log_kernels=true"]))
    with pytest.raises(UserError, match=r"trainer.log_kernels=true draws involution kernels, and model=resnet26 "
                                        r"has none; use a RedNet model or trainer.log_kernels=false"):
        validate(compose_config(["model=resnet26", "trainer.log_kernels=true"]))
