"""RedNet inside timm: registered by ``import rednet`` once timm is imported, built by timm's factory,
described by a pretrained_cfg that timm's data tools read, and loading official weights from a file."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import rednet  # noqa: F401  (registers the models with timm when timm is imported)
from rednet.models import create_model
from rednet.models.resnet import ResNet
from tests.conftest import ROOT

timm = pytest.importorskip("timm")

IMAGENET = OmegaConf.load(ROOT / "configs/data/imagenet.yaml")


def test_create_model_builds_this_projects_rednet():
    assert timm.list_models("rednet*") == ["rednet18", "rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]
    model = timm.create_model("rednet26", pretrained=False, num_classes=10)
    assert type(model) is ResNet and model.num_classes == 10
    ours = create_model("rednet26", num_classes=10)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    # 9.23M, as the official release
    assert sum(p.numel() for p in timm.create_model("rednet26").parameters()) == 9_233_166


def test_pretrained_cfg_describes_the_official_evaluation():
    model = timm.create_model("rednet50")
    cfg = model.pretrained_cfg
    assert cfg["classifier"] == "head.fc" and model.get_classifier() is model.head.fc
    assert cfg["first_conv"] == "backbone.stem.0.conv" and model.get_submodule(cfg["first_conv"]).in_channels == 3
    data = timm.data.resolve_data_config(model=model)
    # The ImageNet data config the official recipe trains and evaluates with: 224 px out of 256.
    assert data["input_size"] == (3, IMAGENET.image_size, IMAGENET.image_size)
    assert data["crop_pct"] == IMAGENET.image_size / IMAGENET.val_resize
    assert list(data["mean"]) == pytest.approx(list(IMAGENET.mean), abs=1e-3)
    assert list(data["std"]) == pytest.approx(list(IMAGENET.std), abs=1e-3)
    assert data["interpolation"] == "bilinear"


def test_reset_classifier_follows_timm():
    model = timm.create_model("rednet18", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    model.reset_classifier(0)  # timm's convention: no classifier, the pooled features
    features = model(x)
    assert features.shape == (2, model.num_features) == (2, 512)
    torch.testing.assert_close(features, model.forward_features(x).mean((2, 3)))
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (2, 7)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), features)
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        model.reset_classifier(7, global_pool="max")
    with pytest.raises(ValueError, match="has no dropout before its classifier: drop_rate must be 0"):
        timm.create_model("rednet18", drop_rate=0.2)


def test_official_weights_load_from_a_local_file(tmp_path):
    official = create_model("rednet26").eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initialisation timm would produce
    path = tmp_path / "rednet26_8xb32_in1k.pth"
    torch.save({"meta": {"mmcls_version": "0.12.0"}, "state_dict": official.state_dict()}, path)  # mmcls's layout
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("rednet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(model(x), official(x), rtol=0, atol=0)
    finetune = timm.create_model("rednet26", pretrained=True, num_classes=10,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(finetune.forward_features(x), official.forward_features(x), rtol=0, atol=0)
    assert finetune(x).shape == (2, 10)  # the 1000-class head was dropped


def test_import_rednet_does_not_import_timm_and_either_order_registers():
    # This process imported rednet before timm; a fresh one checks the cost and the other order.
    code = "import sys, rednet; print([m for m in ('timm', 'torch') if m in sys.modules])"
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert alone.returncode == 0 and alone.stdout.strip() == "[]", alone.stderr[-2000:]
    code = "import timm, rednet; print(type(timm.create_model('rednet18')).__name__)"
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert after.returncode == 0 and after.stdout.split() == ["ResNet"], after.stderr[-2000:]
