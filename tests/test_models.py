import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rednet.errors import CheckpointError
from rednet.models import Involution, create_model, list_models, load_weights
from rednet.models.complexity import count_macs, count_params

REFERENCE = json.loads((Path(__file__).parents[2] / "shared/reference/official_rednet_state_dict.json").read_text()) \
    if (Path(__file__).parents[2] / "shared/reference/official_rednet_state_dict.json").exists() else None
OFFICIAL = ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]
needs_reference = pytest.mark.skipif(REFERENCE is None, reason="../shared/reference is not beside this checkout")


def test_list_models():
    assert list_models() == ["rednet18", "rednet26", "rednet38", "rednet50", "rednet101", "rednet152",
                             "resnet18", "resnet26", "resnet50"]


@needs_reference
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_layout_and_param_count(name):
    model = create_model(name)
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert layout == REFERENCE["models"][name]
    assert count_params(model) == REFERENCE["param_counts"][name]


@needs_reference
def test_official_mmcls_checkpoint_loads_strictly(tmp_path):
    # A file in the release format: {'meta', 'state_dict'} with the reference's keys and shapes.
    state = {k: torch.randn(s) if s else torch.tensor(7) for k, s in REFERENCE["models"]["rednet26"].items()}
    torch.save({"meta": {"epoch": 130}, "state_dict": state}, tmp_path / "rednet26.pth")
    model = load_weights(create_model("rednet26"), tmp_path / "rednet26.pth")
    torch.testing.assert_close(model.state_dict()["head.fc.weight"], state["head.fc.weight"])
    torch.testing.assert_close(model.backbone.layer3[2].conv2.conv2.conv.bias,
                               state["backbone.layer3.2.conv2.conv2.conv.bias"])


def test_resnet50_matches_torchvision_params():
    assert count_params(create_model("resnet50")) == count_params(torchvision.models.resnet50()) == 25_557_032


@pytest.mark.parametrize("name,official", [("rednet26", 1.73), ("rednet50", 2.71)])
def test_gmacs_within_5_percent_of_official(name, official):
    assert count_macs(create_model(name)) / 1e9 == pytest.approx(official, rel=0.05)


def test_involution_macs_are_counted():
    model = nn.Sequential(Involution(32, 7))
    # The generator's two 1x1 convs plus K*K per output element.
    expected = 10 * 10 * (32 * 8 + 8 * 2 * 49 + 32 * 49)
    assert count_macs(model, (32, 10, 10)) == expected


def test_rednet26_takes_any_input_size():
    # 200 px gives odd maps (25 -> 13 -> 7 -> 4) at the stride-2 involutions; the official code crashes.
    model = create_model("rednet26").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 200, 200)).shape == (1, 1000)
        assert model(torch.randn(2, 3, 97, 131)).shape == (2, 1000)


def official_involution_forward(inv: Involution, x: torch.Tensor) -> torch.Tensor:
    """The official naive forward, written out independently: AvgPool2d(s, s), then unfold."""
    k, s, g = inv.kernel_size, inv.stride, inv.groups
    pooled = F.avg_pool2d(x, s, s) if s > 1 else x
    weight = inv.conv2(inv.conv1(pooled))
    b, c, h, w = weight.shape
    weight = weight.view(b, g, k * k, h, w).unsqueeze(2)
    cols = F.unfold(x, k, 1, (k - 1) // 2, s).view(b, g, x.shape[1] // g, k * k, h, w)
    return (weight * cols).sum(dim=3).view(b, x.shape[1], h, w)


@pytest.mark.parametrize("stride", [1, 2])
def test_involution_module_matches_official_math_on_even_maps(stride):
    torch.manual_seed(0)
    inv = Involution(64, 7, stride).eval()
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(inv(x), official_involution_forward(inv, x), rtol=1e-4, atol=1e-4)


def test_involution_stride2_odd_map_has_ceil_size():
    inv = Involution(32, 7, 2)
    assert inv(torch.randn(1, 32, 7, 7)).shape == (1, 32, 4, 4)


def test_cifar_stem_keeps_names_and_resolution():
    imagenet, cifar = create_model("rednet26"), create_model("rednet26", num_classes=10, cifar_stem=True)
    assert list(imagenet.state_dict()) == list(cifar.state_dict())
    assert isinstance(cifar.backbone.maxpool, nn.Identity)
    assert cifar.backbone.stem[0].conv.stride == (1, 1)
    with torch.no_grad():
        assert cifar.eval().forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 2048, 4, 4)


def test_rednet18_is_basicblocks_with_7x7_involution():
    model = create_model("rednet18", num_classes=10)
    backbone = model.backbone
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert len(blocks) == 8
    assert all(isinstance(b.conv2, Involution) and b.conv2.kernel_size == 7 for b in blocks)
    assert all(isinstance(b.conv1, nn.Conv2d) and b.conv1.kernel_size == (3, 3) for b in blocks)
    assert isinstance(model.backbone.stem[1], Involution)


def test_resnet_has_no_involution_and_same_key_scheme():
    model = create_model("resnet26")
    assert not any(isinstance(m, Involution) for m in model.modules())
    assert set(k.split(".")[0] for k in model.state_dict()) == {"backbone", "head"}


def test_zero_init_last_bn():
    model = create_model("rednet26")
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in model.backbone.layer1)
    model = create_model("rednet26", zero_init_residual=False)
    assert all(float(b.bn3.weight.detach().abs().sum()) > 0 for b in model.backbone.layer1)


def test_keyword_arguments():
    model = create_model("rednet26", num_classes=5, in_chans=1, kernel_size=5, group_channels=32,
                         reduction_ratio=2, drop_path_rate=0.1)
    inv = model.backbone.layer1[0].conv2
    assert (inv.kernel_size, inv.groups, inv.conv1.conv.out_channels) == (5, 2, 32)
    assert model.backbone.layer4[0].drop_path.p == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_drop_path_drops_whole_residual_branches():
    model = create_model("rednet18", num_classes=10, cifar_stem=True, drop_path_rate=0.3, zero_init_residual=False)
    backbone = model.backbone
    blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer]
    assert [b.drop_path.p for b in blocks] == pytest.approx([0.3 * i / 7 for i in range(8)])  # linear in depth
    seen = []
    blocks[-1].drop_path.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    model.train()(x)
    ((branch, out),) = seen
    dropped = [bool((o == 0).all()) for o in out]
    for o, b, d in zip(out, branch, dropped):  # each sample's branch is dropped whole, or kept and rescaled
        if not d:
            torch.testing.assert_close(o, b / 0.7)
    assert 0.1 < sum(dropped) / 64 < 0.5  # p = 0.3 for 64 samples
    model.eval()(x)
    torch.testing.assert_close(seen[1][1], seen[1][0], rtol=0, atol=0)  # identity at evaluation


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'rednet27'; choose one of: rednet18, rednet26"):
        create_model("rednet27")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['groups'\]"):
        create_model("rednet26", groups=4)
    with pytest.raises(ValueError, match="32 channels are not divisible into groups of 24"):
        create_model("rednet26", group_channels=24)
    with pytest.raises(ValueError, match="reduction_ratio=64 leaves 32 channels with no kernel-generator channels"):
        create_model("rednet26", reduction_ratio=64)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        create_model("rednet26", drop_path_rate=1.0)
    with pytest.raises(ValueError, match="num_classes must be at least 1, or 0 for no classifier, got -1"):
        create_model("rednet18", num_classes=3).reset_classifier(-1)


def test_reset_classifier_keeps_dtype_and_device():
    model = create_model("rednet18", num_classes=3, cifar_stem=True).double().eval()
    model.reset_classifier(5)
    assert model.head.fc.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 16, 16, dtype=torch.float64)).shape == (1, 5)


def test_load_weights_round_trip_and_ddp_prefix(tmp_path):
    src = create_model("rednet18", num_classes=10)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ours.pt")
    dst = load_weights(create_model("rednet18", num_classes=10), tmp_path / "ours.pt")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_load_weights_other_model_lists_keys():
    with pytest.raises(CheckpointError, match=r"unexpected: backbone\.layer1\.1\..*different model"):
        load_weights(create_model("rednet26"), create_model("rednet50").state_dict())


def test_load_weights_other_head_and_drop_head():
    src = create_model("rednet26").state_dict()
    model = create_model("rednet26", num_classes=10)
    with pytest.raises(CheckpointError, match=r"mis-shaped: head\.fc\.weight \(checkpoint \[1000, 2048\], model "
                                              r"\[10, 2048\]\).*drop_head=True, or model\.drop_head=true "
                                              r"on the command line"):
        load_weights(model, src)
    fc_before = model.head.fc.weight.clone()
    load_weights(model, src, drop_head=True)
    torch.testing.assert_close(model.head.fc.weight, fc_before)
    torch.testing.assert_close(model.backbone.stem[0].conv.weight, src["backbone.stem.0.conv.weight"])


def test_torch_compile_sees_each_involution_as_one_operator():
    # trainer.compile=true: the involution is a custom operator, so Dynamo captures the whole model
    # in one graph (a graph break per involution made Dynamo recompile per block shape and, past
    # its recompile limit, run the deeper RedNets eagerly) and never traces into the implementation
    # (Inductor failed inside AOTAutograd on shift's buffer views).
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.manual_seed(0)
    model = create_model("rednet18", num_classes=10, cifar_stem=True)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    out = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    torch.testing.assert_close(out, expected)
    assert len(graphs) == 1
    assert graphs[0].count("rednet.involution") == sum(isinstance(m, Involution) for m in model.modules())
    assert "addcmul" not in graphs[0] and "unfold" not in graphs[0]


@pytest.mark.slow  # Inductor compiles a RedNet
def test_compiled_channels_last_training_step_matches_eager():
    # aot_eager runs AOTAutograd (fake tensors, the joint forward/backward graph, the backward
    # operator) without Inductor's code generation, which keeps the test fast. NCHW is covered
    # through the Trainer (test_trainer_options.py); channels_last is where a wrong weight-gradient
    # layout in the fake kernels once broke compiled training.
    torch.manual_seed(0)
    model = create_model("rednet18", num_classes=10, cifar_stem=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)

    def grads(run):
        model.zero_grad()
        run(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_with_inductor_trains():
    # Inductor generates and compiles C++ for the whole model: minutes on a 2-core CPU.
    torch.manual_seed(0)
    model = create_model("rednet18", num_classes=10, cifar_stem=True)
    x = torch.randn(2, 3, 16, 16)

    def grads(run):
        model.zero_grad()
        run(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = grads(model)
    compiled = grads(torch.compile(model))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
