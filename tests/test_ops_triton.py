"""The fused Triton involution kernels, run on the CPU through Triton's interpreter.

TRITON_INTERPRET is set per test (the ``interpreter`` fixture), not at the top of this module.
pytest imports every test module before running any test, so a module-level ``os.environ`` write
would stay set for the whole suite: ``available_impls("cpu")`` would then rank "triton" first and
every ``impl="auto"`` in the other tests, and every ``train.py`` subprocess they start, would run
through the interpreter. It is also not needed: ``triton.jit`` reads the variable when a kernel is
decorated, but :mod:`rednet.ops.triton_kernels` builds its interpreted kernels explicitly and picks
them from the tensor's device, so the order in which modules import ``triton`` or ``rednet`` does
not matter. Only the dispatcher's opt-in reads the variable, at call time.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the fused kernels register only with it")

from rednet.ops import available_impls, involution  # noqa: E402
from tests.conftest import assert_all_close, involution_inputs  # noqa: E402
from tests.reference import involution_reference  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def forward_and_grads(impl, x, weight, k, s, d, grad_out=None):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = involution(x, weight, k, s, d, impl=impl)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    return out, grad_x, grad_w


def assert_matches_reference(x, weight, k, s, d, rtol=1e-5, atol=1e-5):
    got = forward_and_grads("triton", x, weight, k, s, d)
    want = involution_reference(x, weight, k, s, d, grad_out=torch.randn(
        got[0].shape, generator=torch.Generator().manual_seed(1)).to(got[0].dtype))
    assert_all_close(got, want, ("out", "grad_x", "grad_weight"), rtol, atol=atol, dtype=x.dtype)


def test_registered_only_when_interpreting(monkeypatch):
    assert available_impls("cpu")[0] == "triton"  # rank 10 beats unfold's 100
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in available_impls("cpu")


# Batch 1 for K = 7 keeps the interpreter quick; the other sizes are odd and non-square throughout.
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("d", [1, 2])
def test_fp32_matches_reference(k, s, d):
    b, h, w = (1, 11, 9) if k == 7 else (2, 9, 7)
    assert_matches_reference(*involution_inputs(b, 8, h, w, 2, k, s, d), k, s, d)


# Group widths of 12 (two channel blocks, the second partial), 3 and 1, and a 13x11 image that
# spans several pixel blocks in the interpreter's configuration.
@pytest.mark.parametrize("c, groups", [(12, 1), (9, 3), (4, 4)])
@pytest.mark.parametrize("k, s, d", [(3, 1, 1), (5, 2, 2)])
def test_group_widths_and_blocks(c, groups, k, s, d):
    assert_matches_reference(*involution_inputs(1, c, 13, 11, groups, k, s, d), k, s, d)


def test_non_contiguous_inputs():
    k, s, d = 3, 2, 1
    x, weight = involution_inputs(2, 8, 9, 11, 2, k, s, d)
    x_cl = x.to(memory_format=torch.channels_last)
    # A weight that is a slice of a bigger tensor, as a channel split of a conv output would be.
    w_big = torch.cat([weight, torch.randn_like(weight)], dim=2)[:, :, : k * k]
    assert not x_cl.is_contiguous() and not w_big.is_contiguous()
    got = forward_and_grads("triton", x_cl, w_big, k, s, d)
    want = involution_reference(x, weight, k, s, d, grad_out=torch.randn(
        got[0].shape, generator=torch.Generator().manual_seed(1)))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [1, 2])
def test_channels_last_is_read_in_place_and_kept(s):
    # A channels_last model: x is NHWC and the weight is a view of a channels_last conv output
    # (B, G*K*K, Ho, Wo). The kernels read both through their strides and return the output and
    # gradients in the same layouts, so no layout copies happen around the operator.
    k, d, groups = 3, 1, 2
    x, weight = involution_inputs(2, 8, 9, 7, groups, k, s, d)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    b, _, kk, ho, wo = weight.shape
    w_cl = weight.reshape(b, groups * kk, ho, wo).contiguous(memory_format=torch.channels_last)
    w_view = w_cl.view(b, groups, kk, ho, wo)
    assert not w_view.is_contiguous()
    out, grad_x, grad_w = forward_and_grads("triton", x_cl, w_view, k, s, d)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert grad_x.is_contiguous(memory_format=torch.channels_last) and not grad_x.is_contiguous()
    assert grad_w.stride() == w_view.stride()
    want = involution_reference(x, weight, k, s, d, grad_out=torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1)))
    for g, r in zip((out, grad_x, grad_w), want):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    assert_matches_reference(*involution_inputs(0, 8, 7, 5, 2, 3, 2, 1), 3, 2, 1)


def test_backward_is_deterministic():
    x, weight = involution_inputs(1, 12, 13, 11, 1, 3, 1, 1)
    first = forward_and_grads("triton", x, weight, 3, 1, 1)
    second = forward_and_grads("triton", x, weight, 3, 1, 1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_only_the_requested_gradient():
    x, weight = involution_inputs(1, 4, 7, 5, 2, 3, 1, 1)
    weight.requires_grad_()
    out = involution(x, weight, 3, 1, 1, impl="triton")
    (grad_w,) = torch.autograd.grad(out.sum(), weight)  # the expanded grad_out of sum() as well
    _, _, want = involution_reference(x, weight, 3, 1, 1, grad_out=torch.ones(out.shape))
    torch.testing.assert_close(grad_w.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # every tap in the interpreter; test_gradcheck_float64 covers the shapes
def test_gradcheck_float64_exhaustive():
    # Float64 is accumulated in float64, so the full finite-difference Jacobian can be checked;
    # the shape is tiny because each Jacobian column is one interpreted launch.
    x, weight = involution_inputs(1, 2, 3, 4, 1, 3, 2, 1, dtype=torch.float64)
    x.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, 3, 2, 1, impl="triton"), (x, weight))


@pytest.mark.parametrize("k, s, d, groups", [(3, 1, 1, 2), (3, 2, 2, 1), (5, 1, 2, 3), (7, 2, 1, 1)])
def test_gradcheck_float64(k, s, d, groups):
    # fast_mode checks random projections of the Jacobian instead of every column.
    x, weight = involution_inputs(1, 6, 7, 6, groups, k, s, d, dtype=torch.float64)
    x.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, k, s, d, impl="triton"), (x, weight),
                                    fast_mode=True)


def _violations(got, exact, magnitude, dtype):
    """Fraction of elements off the float64 value by more than one unit in the last place of dtype.

    Correct rounding of a float32-accumulated sum is at most half a unit off; the ``magnitude``
    term (the sum of the absolute products) allows for float32 rounding where terms cancel.
    """
    bound = torch.finfo(dtype).eps * exact.abs() + 2.0 ** -20 * magnitude
    return ((got.double() - exact).abs() > bound).double().mean().item()


def _accumulate_in(dtype, x, weight, k, s, d):
    """The involution summed tap by tap in ``dtype``: what a kernel without fp32 accumulation gives."""
    b, c, h, w = x.shape
    groups, kk, ho, wo = weight.shape[1:]
    cols = F.unfold(x.double(), k, dilation=d, padding=d * (k - 1) // 2, stride=s)
    products = weight.double().unsqueeze(2) * cols.view(b, groups, c // groups, kk, ho, wo)
    acc = torch.zeros(b, groups, c // groups, ho, wo, dtype=dtype)
    for tap in range(kk):
        acc = (acc.double() + products[:, :, :, tap]).to(dtype)
    return acc.view(b, c, ho, wo)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(dtype):
    # K = 7: 49 products per output, enough for low-precision accumulation to drift visibly.
    k, s, d = 7, 1, 1
    x, weight = involution_inputs(1, 16, 9, 11, 1, k, s, d, dtype=dtype)
    out, grad_x, grad_w = forward_and_grads("triton", x, weight, k, s, d)
    assert out.dtype == grad_x.dtype == grad_w.dtype == dtype

    # The exact value for the same low-precision inputs, and the float32 reference.
    exact = involution_reference(x, weight, k, s, d)
    magnitude = involution_reference(x.abs(), weight.abs(), k, s, d)
    assert _violations(out, exact, magnitude, dtype) == 0
    # The same check is sharp enough to catch accumulation in the input dtype.
    assert _violations(_accumulate_in(dtype, x, weight, k, s, d), exact, magnitude, dtype) > 0.1

    want = involution_reference(x, weight, k, s, d, grad_out=torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    eps = torch.finfo(dtype).eps
    for got, ref in zip((out, grad_x, grad_w), want):
        torch.testing.assert_close(got.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())


def test_unsupported_dtype_is_refused():
    # The dispatcher refuses integer tensors for every impl (test_ops.py); a floating dtype the
    # kernels do not support still reaches them and gets their own error.
    x, weight = involution_inputs(1, 2, 5, 5, 1, 3, 1, 1)
    fp8 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match="triton involution supports"):
        involution(x.to(fp8), weight.to(fp8), 3, impl="triton")


def test_import_without_triton():
    # Blocking the import makes ``import triton`` raise ImportError, as on a machine without it.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from rednet.ops import available_impls, involution\n"
            "assert 'triton' not in available_impls('cpu') and 'triton' not in available_impls('cuda')\n"
            "involution(torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5), 3)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("s", [1, 2])
def test_custom_operator_passes_opcheck(s):
    # See test_ops.py: torch.compile trusts the fake kernels' layouts; here for the Triton impl.
    k, groups = 3, 2
    x, weight = involution_inputs(1, 4, 6, 5, groups, k, s, 1)
    b, _, kk, ho, wo = weight.shape
    w_view = weight.reshape(b, groups * kk, ho, wo).contiguous(memory_format=torch.channels_last).view(weight.shape)
    for x_, w_ in [(x, weight), (x.contiguous(memory_format=torch.channels_last), w_view)]:
        torch.library.opcheck(torch.ops.rednet.involution.default,
                              (x_.requires_grad_(), w_.requires_grad_(), k, s, 1, "triton"))
        grad_out = torch.randn(1, 4, ho, wo)
        torch.library.opcheck(torch.ops.rednet.involution_backward.default,
                              (grad_out, x_.detach(), w_.detach(), k, s, 1, "triton", True, True))
