"""The roofline's counts (scripts.benchmark.count_step) against FLOPs and bytes worked out by hand, and
the categories that bench_models.py and roofline.py sort operators and GPU kernels into."""

import importlib.util

import pytest
import torch
from torch import nn

from rednet.engine.precision import resolve_auto
from rednet.models import Involution
from scripts.benchmark import categorize, count_step
from tests.conftest import ROOT

F32 = 4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def only(costs, op, phase):
    found = [c for c in costs if c.op == op and c.phase == phase]
    assert len(found) == 1, [(c.op, c.phase) for c in costs]
    return found[0]


def test_convolution_flops_bytes_and_layer_forward_and_backward():
    costs = count_step(Tiny(), torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2,)))
    x, w, y = 2 * 3 * 36 * F32, 8 * 3 * 9 * F32, 2 * 8 * 36 * F32
    macs = 2 * 8 * 36 * 3 * 9  # batch * output elements * (in channels * 3 * 3)
    fwd = only(costs, "aten.convolution", "forward")
    assert (fwd.flops, fwd.bytes, fwd.module, fwd.category, fwd.matrix) == (2 * macs, x + w + y, "conv", "convolution",
                                                                            True)
    # The input needs no gradient: the backward computes only the weight's, reading grad_out, x, w.
    bwd = only(costs, "aten.convolution_backward", "backward")
    assert (bwd.flops, bwd.bytes, bwd.module) == (2 * macs, y + x + w + w, "conv")
    bn = only(costs, "aten.native_batch_norm_backward", "backward")
    assert bn.module == "bn" and bn.category == "batchnorm"
    assert {c.category for c in costs if c.phase == "optimizer"} == {"optimizer"}
    # The counted step is the second: momentum buffers exist, so nothing is cloned.
    assert not [c for c in costs if c.phase == "optimizer" and c.op == "aten.clone"]


def test_bf16_autocast_halves_the_bytes_of_what_runs_in_bf16():
    costs = count_step(Tiny(), torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2,)), torch.bfloat16)
    fwd = only(costs, "aten.convolution", "forward")
    assert fwd.bytes == (2 * 3 * 36 + 8 * 3 * 9 + 2 * 8 * 36) * 2


def test_involution_flops_and_bytes():
    layer = Involution(channels=16, kernel_size=3, group_channels=8, reduction_ratio=4)
    costs = count_step(_Head(layer), torch.randn(2, 16, 5, 5), torch.randint(0, 3, (2,)))
    x = out = 2 * 16 * 25 * F32
    weight = 2 * 2 * 9 * 25 * F32  # (B, G, K*K, H, W)
    fwd = only(costs, "rednet.involution", "forward")
    assert (fwd.flops, fwd.bytes, fwd.category, fwd.matrix) == (2 * 2 * 16 * 25 * 9, x + weight + out, "involution",
                                                                False)
    assert fwd.module == "inv"
    bwd = only(costs, "rednet.involution_backward", "backward")
    # Both gradients: grad_out, x and weight read; grad_x and grad_weight written.
    assert (bwd.flops, bwd.bytes) == (2 * fwd.flops, out + x + weight + x + weight)


class _Head(nn.Module):
    def __init__(self, inv):
        super().__init__()
        self.pre = nn.Conv2d(16, 16, 1)  # so that the involution's input needs a gradient, as in a model
        self.inv = inv
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.inv(self.pre(x)).mean((2, 3)))


@pytest.mark.parametrize("name, category", [
    ("aten::cudnn_convolution", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void at::native::batch_norm_collect_statistics_kernel<float, float, float>", "batchnorm"),
    ("cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>", "batchnorm"),
    ("triton_red_fused__native_batch_norm_legit_functional_relu_3", "batchnorm"),
    ("triton_poi_fused_add_relu_threshold_backward_7", "elementwise"),
    ("_grad_weight_kernel", "involution"),
    ("rednet::involution_backward", "involution"),
    ("aten::addmm", "head & loss"),
    ("aten::max_pool2d_with_indices_backward", "pooling"),
    ("Memcpy DtoD (Device -> Device)", "elementwise"),
    ("cudaLaunchKernel", "other"),
])
def test_categories_of_operators_and_kernels(name, category):
    assert categorize(name) == category


def test_auto_speed_settings_by_device():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_auto("channels_last", None, cuda) is True
    assert resolve_auto("channels_last", None, cpu) is False
    assert resolve_auto("compile", None, cuda) is False and resolve_auto("compile", None, cpu) is False
    assert resolve_auto("channels_last", False, cuda) is False and resolve_auto("compile", True, cpu) is True


def test_roofline_script_tables(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "scripts" / "roofline.py")
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    monkeypatch.setattr("sys.argv", ["roofline.py", "--models", "rednet18", "--batch-size", "2",
                                     "--resolution", "32", "--layers", "3", "--bandwidth-gbs", "1000"])
    roofline.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ")}
    gb, bytes_ms = float(rows["rednet18"][1]), float(rows["rednet18"][2])
    assert bytes_ms == pytest.approx(gb, abs=0.01)  # at 1000 GB/s a GB takes a millisecond
    assert rows["step"][-2] == "100%"
    # --layers 3: three layers by name, then one row for the rest
    layer_rows = [k for k in rows if k.startswith("backbone.") or k.endswith("more layers")]
    assert len(layer_rows) == 4 and layer_rows[-1].endswith("more layers")
