"""Export to ONNX and evaluation through ONNX Runtime: the file must give PyTorch's logits, hold only
standard operators and no BatchNorm, accept any batch and size, and eval.py must report on it what
it reports on the checkpoint."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rednet.errors import DeployError, WriteError
from rednet.models import Involution, create_model
from tests.conftest import command_config, compose_config, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rednet.deploy import OnnxClassifier, export_onnx, to_onnx  # noqa: E402
from rednet.deploy.export import op_types  # noqa: E402
from rednet.deploy.involution import DEFAULT, FORMULATIONS  # noqa: E402
from rednet.deploy.runtime import session  # noqa: E402
from rednet.ops.involution import involution_unfold  # noqa: E402

# Operators of the ONNX standard (ai.onnx) that an exported model may use.
STANDARD = {"Conv", "Relu", "Add", "Mul", "Sum", "Gemm", "Flatten", "ReduceMean", "ReduceSum", "MaxPool",
            "AveragePool", "Pad", "Slice", "Split", "Concat", "Reshape", "Shape", "Squeeze", "Unsqueeze", "Div",
            "Loop", "Identity", "Max", "Sub", "MatMul", "Gather", "Transpose", "Range"}


def trained_like(name: str, size: int, num_classes: int = 10, in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    """A model whose BatchNorms hold the statistics of its own activations, as after training (a
    fresh one has mean 0, var 1 and zero-initialised last BNs, which would hide a wrongly folded BN
    or a wrong involution), and whose involutions run the ``unfold`` reference: the official
    code's math, independent of both the fast PyTorch operator and the ONNX formulation."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, cifar_stem=size <= 64,
                         zero_init_residual=False).eval()

    def calibrate(bn, inputs):  # runs just before the BN, so every later BN sees normalised inputs
        x = inputs[0].double()
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3)))

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            hooks.append(m.register_forward_pre_hook(calibrate))
        if isinstance(m, Involution):
            m.impl = "unfold"
            # Kernels mostly from the bias (distinct per tap and group), partly from the input: an
            # involution is quadratic in its input, and nine of them in a row with random weights
            # would blow a sample's logits up to 1e10, where a trained network stays bounded.
            m.conv2.conv.weight.data.mul_(0.05)
            m.conv2.conv.bias.data.normal_(0, 0.5)
    with torch.no_grad():
        model(torch.randn(8, in_chans, size, size))
    for hook in hooks:
        hook.remove()
    return model


def assert_matches(model, proto, shapes, atol=1e-4):
    run = session(proto.SerializeToString())
    for batch, in_chans, size in shapes:
        x = torch.randn(batch, in_chans, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(expected).max() > 0.1  # logits that are not all ~0
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def assert_standard(proto):
    types = op_types(proto)
    assert set(types) <= STANDARD, set(types) - STANDARD
    assert "BatchNormalization" not in types
    assert [o.domain for o in proto.opset_import] in ([""], ["ai.onnx"])
    onnx.checker.check_model(proto, full_check=True)


class Layer(torch.nn.Module):
    """One involution (32 channels in 4 groups): a module that exports in a fraction of a second."""

    def __init__(self, stride: int = 1, k: int = 3):
        super().__init__()
        self.inv = Involution(32, k, stride, group_channels=8, reduction_ratio=4)

    def forward(self, x):
        return self.inv(x)


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS) + [DEFAULT])
def test_every_formulation_computes_involution(formulation, monkeypatch):
    """Each way of writing the operator, alone, against the unfold reference: strides 1 and 2,
    K = 3 and 7, odd sizes, one and several samples and groups. Loops get chunks of 3 and 5 (sample,
    group) pairs for 8 and 12 pairs, and band's Loop chunks of 1 and 2 samples for 2 and 3: several
    trips, one of them padded. band's tiles are of 7 pixels for output widths 11, 4 and 5 (none a
    whole number of tiles), and of 8 for a width of 16."""
    import rednet.deploy.involution as formulations

    monkeypatch.setattr(formulations, "CHUNK_ELEMENTS", 3000)  # 3000 // (8 channels * 11 * 11) = 3
    # band's windows hold 56448 values a sample at 9x11 (K=7, s=1), 23520 at 9x8 (s=2), 6720 at 5x5
    monkeypatch.setattr(formulations, "BAND_ELEMENTS", 50000)
    torch.manual_seed(0)
    for stride, k, shape in ((1, 7, (2, 32, 9, 11)), (2, 7, (3, 32, 9, 8)), (1, 3, (1, 32, 5, 5)),
                             (1, 7, (3, 32, 6, 16))):
        layer = Layer(stride, k).eval()
        proto = to_onnx(layer, 32, shape[-1], formulation)
        x = torch.randn(*shape)
        with torch.no_grad():
            kernels = layer.inv.conv2(layer.inv.conv1(layer.inv.avgpool(x)))
            b, _, ho, wo = kernels.shape
            expected = involution_unfold(x, kernels.view(b, 4, k * k, ho, wo), k, stride).numpy()
        got = session(proto.SerializeToString()).run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("producer", ["graph input", "3x3 convolution", "1x1 convolution without bias"])
def test_auto_takes_band_only_for_a_1x1_generator(producer):
    """``band`` computes the kernels from the generator's 1x1 convolution (a bias is optional); a
    kernel map from anything else (an input of the graph, a 3x3 convolution) is expanded with
    ``flat`` by ``auto``, and refused by ``band`` with its reason. Each against the reference."""
    from onnx import TensorProto, helper, numpy_helper

    from rednet.deploy.involution import DOMAIN, OP_TYPE, expand_involutions

    rng = np.random.default_rng(0)
    x, r = rng.standard_normal((2, 16, 7, 9), np.float32), rng.standard_normal((2, 4, 7, 9), np.float32)
    size = 1 if producer.startswith("1x1") else 3
    weight = rng.standard_normal((18, 4, size, size), np.float32) * 0.3
    inits, nodes, feeds = [], [], {"x": x}
    if producer == "graph input":
        kernels = rng.standard_normal((2, 18, 7, 9), np.float32)
        feeds["k"] = kernels
    else:
        inits = [numpy_helper.from_array(weight, "w")]
        nodes.append(helper.make_node("Conv", ["r", "w"], ["k"], pads=[size // 2] * 4))
        feeds["r"] = r
        kernels = torch.nn.functional.conv2d(torch.from_numpy(r), torch.from_numpy(weight), padding=size // 2).numpy()
    nodes.append(helper.make_node(OP_TYPE, ["x", "k"], ["y"], domain=DOMAIN, kernel_size=3, stride=1, dilation=1,
                                  channels=16, groups=2, chunk=1, samples=1))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))
              for name, value in feeds.items()]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])

    if size == 1:
        expand_involutions(model)
        assert "Conv" not in op_types(model) and op_types(model)["MatMul"] == 2  # band, the Conv inside it
        assert not model.graph.initializer or "w" not in {i.name for i in model.graph.initializer}
    else:
        with pytest.raises(ValueError, match="'band' formulation needs the kernel generator's 1x1 convolution"):
            expand_involutions(onnx.ModelProto.FromString(model.SerializeToString()), "band")
        expand_involutions(model)
        types = op_types(model)
        assert "Loop" in types and "MatMul" not in types and "Gather" not in types  # flat's, not band's
    got = session(model.SerializeToString()).run(None, feeds)[0]
    expected = involution_unfold(torch.from_numpy(x), torch.from_numpy(kernels).view(2, 2, 9, 7, 9), 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """A RedNet-18 checkpoint for digits, in the trainer's format, and its export."""
    from rednet.deploy.export import export_checkpoint
    from rednet.engine.trained import open_trained
    from rednet.io import save_checkpoint

    root = tmp_path_factory.mktemp("digits")
    cfg = compose_config(["model=rednet18", "data=digits", "trainer.device=cpu"])
    model = trained_like("rednet18", 8, in_chans=1)
    ckpt = {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "class_names": [str(i) for i in range(10)]}
    save_checkpoint(ckpt, root / "best.pt")
    # Trained with the fused generator: its Triton operator has no ONNX counterpart, so export runs unfused.
    export_cfg = compose_config(["model=rednet18", "model.fused_generator=true", "data=digits", f"ckpt={root}/best.pt"],
                                name="export")
    export_checkpoint(export_cfg, open_trained(root / "best.pt"))
    return root, model


@pytest.fixture
def digits_dir(digits_export):
    return digits_export[0]


def test_digits_export_matches_pytorch_and_has_a_sidecar(digits_export):
    """Standard operators only, no BatchNorm, a Loop per involution, and PyTorch's logits (of the
    unfold reference) at two batch sizes and two image sizes from the one file."""
    root, model = digits_export
    proto = onnx.load(str(root / "model.onnx"))
    assert_standard(proto)
    # The default formulation, band: a Loop over samples for each involution, in which the kernel
    # generator's last convolution became a MatMul.
    assert op_types(proto)["Loop"] == 9
    assert op_types(proto)["MatMul"] == 2 * 9
    assert_matches(model, proto, [(1, 1, 8), (3, 1, 8), (2, 1, 7)])

    info = json.loads((root / "model.json").read_text())
    assert info["model"] == "rednet18" and info["num_classes"] == 10
    assert info["class_names"] == [str(i) for i in range(10)]
    assert (info["in_chans"], info["image_size"]) == (1, 8)
    assert info["mean"] == pytest.approx([0.3054]) and info["std"] == pytest.approx([0.3761])
    assert info["config"]["data"]["name"] == "digits"
    assert info["verified"]["max_difference"] <= 1e-4
    assert not list(root.glob(".*tmp*"))


def test_a_second_runtime_gives_the_same_logits(digits_export):
    """Standard operators only, so any ONNX runtime runs the file: onnx's reference runtime (its
    own Python implementation of every operator, Loop included) gives PyTorch's logits too."""
    from onnx.reference import ReferenceEvaluator

    root, model = digits_export
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ReferenceEvaluator(str(root / "model.onnx")).run(None, {"images": x.numpy()})[0]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_eval_through_onnxruntime_equals_eval_through_pytorch(digits_dir, tmp_path):
    """What eval.py does for ckpt=best.pt and for ckpt=model.onnx (the command line's dispatch
    is tested below), on the same two batches of 32 of the 360 test images."""
    from rednet.data import build_datamodule
    from rednet.engine.evaluate import evaluate, evaluate_trained
    from rednet.engine.feed import DeviceFeed
    from rednet.models import load_weights

    data = build_datamodule(compose_config(["data=digits"]).data)
    model = load_weights(create_model("rednet18", num_classes=10, in_chans=1, cifar_stem=True), digits_dir / "best.pt")
    batches = DeviceFeed(data.val_loader(32), "cpu", data.mean, data.std)
    expected = evaluate(model, batches, torch.device("cpu"), None, data.class_names, limit_batches=2)
    assert int((expected.confusion.matrix.sum(0) > 0).sum()) > 1  # it does not predict one class only

    overrides = [f"ckpt={digits_dir}/model.onnx", "data.batch_size=32", "trainer.progress=none",
                 "trainer.limit_val_batches=2"]
    cfg, trained = command_config("eval", overrides)
    result = evaluate_trained(cfg, trained, tmp_path / "onnx")
    assert result.count == 64 and result.acc1 == expected.acc1 and result.acc5 == expected.acc5
    assert torch.equal(result.confusion.matrix, expected.confusion.matrix)
    assert result.loss == pytest.approx(expected.loss, rel=1e-4)

    metrics = json.loads((tmp_path / "onnx/metrics.json").read_text())
    assert metrics["runtime"] == "onnxruntime" and metrics["acc1"] == expected.acc1
    assert len(metrics["per_class"]) == 10
    with open(tmp_path / "onnx/confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == expected.confusion.matrix.tolist()
    assert (tmp_path / "onnx/confusion_matrix.png").stat().st_size > 0


def test_eval_refuses_an_onnx_file_for_other_classes(digits_dir, tmp_path):
    result = run_cli("eval.py", f"ckpt={digits_dir}/model.onnx", "data=fake", "data.num_classes=3",
                     "data.in_chans=1", "data.image_size=8", "data.mean=[0.5]", "data.std=[0.5]",
                     f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {digits_dir}/model.onnx has 10 classes but data=fake has 3; use data "
                      f"with the same classes"]
    assert not (tmp_path / "eval/metrics.json").exists()


@pytest.mark.slow
def test_official_layout_state_dict(tmp_path):
    """An mmcls file (``state_dict`` with backbone./head. keys, no config) exports with model=:
    RedNet-26, an official model at 224 px: slow; the fast tests export our own checkpoint format."""
    from rednet.deploy.export import export_checkpoint
    from rednet.engine.trained import open_trained

    name, size = "rednet26", 224
    model = trained_like(name, size, num_classes=1000)
    torch.save({"meta": {"mmcls_version": "0.x"}, "state_dict": model.state_dict()}, tmp_path / "official.pth")
    cfg = compose_config([f"model={name}", f"data.image_size={size}", f"ckpt={tmp_path}/official.pth",
                          f"out={tmp_path}/deploy/{name}.onnx"], name="export")
    export_checkpoint(cfg, open_trained(tmp_path / "official.pth"))
    info = json.loads((tmp_path / f"deploy/{name}.json").read_text())
    assert info["num_classes"] == 1000 and info["class_names"] is None and info["mean"] == [0.485, 0.456, 0.406]
    classifier = OnnxClassifier(tmp_path / f"deploy/{name}.onnx")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), model(x), rtol=0, atol=1e-4)


def test_export_refuses_a_file_that_disagrees_and_leaves_nothing(tmp_path, monkeypatch):
    import rednet.deploy.involution as formulations

    build, grouped = FORMULATIONS["shift"]

    def off_by_a_little(b, x, kernels, geo):
        return b.op("Mul", [build(b, x, kernels, geo), b.const(1.001, np.float32)])

    monkeypatch.setitem(formulations.FORMULATIONS, "shift", (off_by_a_little, grouped))
    with pytest.raises(DeployError, match=r"disagrees with PyTorch .* nothing was written"):
        export_onnx(Layer().eval(), tmp_path / "model.onnx", 32, 8, formulation="shift")
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_path_that_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DeployError) as error:
        export_onnx(create_model("rednet18", num_classes=2), tmp_path / "a_file/model.onnx", 3, 8)
    assert str(error.value).startswith(f"cannot write {tmp_path}/a_file/model.onnx: ")
    assert "choose another out=" in str(error.value) and "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_a_failed_write_keeps_the_previous_export(tmp_path, monkeypatch):
    # A full disk while the new pair is written: the earlier model.onnx and its sidecar stay as they were.
    import rednet.io

    (tmp_path / "model.onnx").write_bytes(b"the earlier export")
    (tmp_path / "model.json").write_text("{}")
    write = rednet.io._write_temporary

    def disk_full_on_the_sidecar(path, data):
        if path.name.startswith(".model.json"):
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(rednet.io, "_write_temporary", disk_full_on_the_sidecar)
    with pytest.raises(WriteError, match=r"could not write export .*model.onnx: No space left on device; the "
                                         r"previous export there is intact"):
        export_onnx(Layer().eval(), tmp_path / "model.onnx", 32, 8)
    assert (tmp_path / "model.onnx").read_bytes() == b"the earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    result = run_cli("export.py", f"ckpt={tmp_path}/notes.pt", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "notes.pt is not a checkpoint" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt", "run"]


def test_without_the_deploy_extra_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(DeployError) as error:
        to_onnx(create_model("rednet18", num_classes=2), 3, 8)
    assert str(error.value) == ('ONNX export and ONNX Runtime need the [deploy] extra (onnx is missing): '
                                'pip install -e ".[deploy]"')


MATRIX = ["rednet18", "rednet26", "rednet50", "resnet50"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MATRIX)
def test_models_match_pytorch_at_224_and_200(name):
    """Logits within 1e-4 in fp32: one file, the export size and an odd size, two batch sizes."""
    model = trained_like(name, 224, num_classes=1000)
    proto = to_onnx(model, 3, 224)
    assert_standard(proto)
    assert_matches(model, proto, [(1, 3, 224), (2, 3, 224), (2, 3, 200)])
