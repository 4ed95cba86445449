"""Every involution implementation against tests/reference.py (the definition, in float64): values,
gradients, layouts, dtypes, errors."""

import re

import pytest
import torch

from rednet.ops import available_impls, involution
from scripts.benchmark import peak_bytes
from tests.conftest import assert_all_close, involution_inputs
from tests.reference import involution_reference

CPU_IMPLS = available_impls("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are small, and with several intra-op threads every op waits for all of them:
    on a machine busy with other multi-threaded work a second thread measured 1000x slower per
    op (a scheduler time slice per wait), which made this file take minutes instead of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_like(t, seed=1):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.dtype)


def forward_and_grads(impl, x, weight, kernel_size, stride=1, dilation=1, grad_out=None):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = involution(x, weight, kernel_size, stride, dilation, impl=impl)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), random_like(out) if grad_out is None else grad_out)
    return out.detach(), grad_x, grad_w


def reference(x, weight, kernel_size, stride=1, dilation=1, grad_out=None):
    """(out, grad_x, grad_w) of the float64 reference, for the upstream gradient forward_and_grads uses."""
    if grad_out is None:
        grad_out = random_like(torch.empty(x.shape[0], x.shape[1], *weight.shape[-2:], dtype=x.dtype))
    return involution_reference(x, weight, kernel_size, stride, dilation, grad_out=grad_out)


def assert_matches(actual, expected, rtol, atol_scale):
    """``actual`` (out, grad_x, grad_w) against the reference; atol is relative to each tensor's largest value."""
    assert_all_close(actual, expected, ("out", "grad_x", "grad_w"), rtol, atol_scale=atol_scale)


def test_reference_on_known_answers():
    # The reference is checked by itself: a kernel that is 1 at one tap and 0 elsewhere shifts the
    # image (zero filled), and the gradients satisfy <out, g> = <x, grad_x> = <w, grad_w>, since
    # the involution is linear in each input.
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float64).view(2, 4, 5, 6)
    weight = torch.zeros(2, 2, 9, 5, 6, dtype=torch.float64)
    weight[:, 0, 2] = 1.0  # group 0 (channels 0, 1): tap (u, v) = (0, 2), reads x[i - 1, j + 1]
    weight[:, 1, 4] = 2.0  # group 1: the centre tap, twice the pixel
    out = involution_reference(x, weight, 3)
    shifted = torch.zeros_like(x[:, :2])
    shifted[:, :, 1:, :-1] = x[:, :2, :-1, 1:]
    torch.testing.assert_close(out[:, :2], shifted, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2:], 2 * x[:, 2:], rtol=0, atol=0)
    # Stride 2, dilation 2 (padding 2): output (i, j) with tap (2, 0) reads x[2i + 2, 2j - 2].
    weight = torch.zeros(1, 1, 9, 3, 3, dtype=torch.float64)
    weight[:, :, 6] = 1.0
    out = involution_reference(x[:1, :1], weight, 3, stride=2, dilation=2)
    expected = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    expected[..., :2, 1:] = x[:1, :1, 2::2, 0:4:2]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    x, weight = involution_inputs(2, 6, 9, 7, 3, 5, 2, 1, dtype=torch.float64)
    grad_out = random_like(involution_reference(x, weight, 5, 2))
    out, grad_x, grad_w = involution_reference(x, weight, 5, 2, grad_out=grad_out)
    inner = (out * grad_out).sum()
    torch.testing.assert_close((x * grad_x).sum(), inner)
    torch.testing.assert_close((weight * grad_w).sum(), inner)


def test_shift_is_registered_and_preferred_over_unfold():
    assert {"shift", "unfold"} <= set(CPU_IMPLS)
    assert CPU_IMPLS.index("shift") < CPU_IMPLS.index("unfold")


# (b, c, h, w, groups, kernel_size, stride, dilation): K = 1, 3, 5, 7, strides 1 and 2,
# dilation 2, odd non-square maps, kernels larger than the map, group widths 1, 2, 3, 4, batch 1.
GRADCHECK_CASES = [
    (2, 4, 5, 7, 2, 3, 1, 1),
    (1, 4, 6, 5, 1, 3, 2, 1),
    (2, 2, 7, 6, 2, 3, 1, 2),
    (1, 4, 5, 4, 2, 5, 2, 1),
    (1, 2, 3, 4, 1, 5, 1, 1),
    (2, 2, 9, 7, 1, 3, 2, 2),
    (1, 6, 5, 6, 2, 3, 1, 1),
    (1, 2, 6, 5, 1, 7, 1, 1),
    (1, 2, 9, 8, 2, 7, 2, 1),
    (2, 4, 3, 5, 2, 1, 2, 1),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "b{}c{}h{}w{}g{}k{}s{}d{}".format(*c))
def test_matches_reference_float64(impl, case):
    b, c, h, w, groups, k, s, d = case
    x, weight = involution_inputs(b, c, h, w, groups, k, s, d, dtype=torch.float64)
    assert_matches(forward_and_grads(impl, x, weight, k, s, d), reference(x, weight, k, s, d), 1e-10, 1e-12)


# RedNet-like shapes, batch reduced: a stage block, its strided first block, a deeper stage, the stem.
REDNET_CASES = [
    (2, 64, 28, 28, 4, 7, 1),
    (2, 64, 32, 32, 4, 7, 2),
    (1, 256, 14, 14, 16, 7, 1),
    (2, 32, 56, 56, 2, 3, 1),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", REDNET_CASES, ids=lambda c: "b{}c{}h{}w{}g{}k{}s{}".format(*c))
def test_matches_reference_float32(impl, case):
    b, c, h, w, groups, k, s = case
    x, weight = involution_inputs(b, c, h, w, groups, k, s)
    assert_matches(forward_and_grads(impl, x, weight, k, s), reference(x, weight, k, s), 1e-4, 1e-5)


def _noncontiguous(t):
    """The same values in memory that is neither NCHW- nor channels_last-contiguous."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    wide[..., 1:-2] = t
    return wide[..., 1:-2]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_layouts_give_the_same_result(impl, stride):
    x, weight = involution_inputs(2, 32, 11, 9, 4, 5, stride)
    expected = reference(x, weight, 5, stride)
    grad_out = random_like(expected[0]).float()
    variants = {
        "channels_last": (x.contiguous(memory_format=torch.channels_last), weight),
        "sliced": (_noncontiguous(x), _noncontiguous(weight)),
        "transposed": (x.transpose(2, 3).contiguous().transpose(2, 3),
                       weight.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)),
    }
    for name, (xv, wv) in variants.items():
        assert not xv.is_contiguous()
        # A contiguous and a non-contiguous upstream gradient.
        for g in (grad_out, _noncontiguous(grad_out)):
            actual = forward_and_grads(impl, xv, wv, 5, stride, grad_out=g)
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bfloat16_autocast(impl):
    x, weight = involution_inputs(2, 32, 12, 10, 2, 7, 1)
    grad = random_like(torch.empty(2, 32, 12, 10))
    ref_out, ref_gx, ref_gw = reference(x, weight, 7, grad_out=grad)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = involution(xr, wr, 7, impl=impl)
    assert out.dtype == torch.bfloat16
    grad_x, grad_w = torch.autograd.grad(out, (xr, wr), grad.to(out.dtype))
    assert grad_x.dtype == torch.float32 and grad_w.dtype == torch.float32
    # Inputs are rounded to bfloat16 (8 bits of mantissa) before a 49-term sum of products.
    assert_matches((out, grad_x, grad_w), (ref_out, ref_gx, ref_gw), 0, 0.03)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_float16_inputs(impl, stride):
    x, weight = involution_inputs(2, 32, 12, 10, 2, 7, stride)
    x, weight = x.half(), weight.half()
    grad = random_like(torch.empty(2, 32, *weight.shape[-2:])).half()
    out, grad_x, grad_w = forward_and_grads(impl, x, weight, 7, stride, grad_out=grad)
    assert out.dtype == grad_x.dtype == grad_w.dtype == torch.float16
    # The exact result for the same rounded inputs: float32 accumulation leaves only the final
    # rounding to float16 (a relative 2^-11) and float32's error in sums that cancel.
    assert_matches((out, grad_x, grad_w), reference(x, weight, 7, stride, grad_out=grad), 2e-3, 2e-3)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradient_of_one_input_only(impl):
    x, weight = involution_inputs(1, 8, 6, 6, 2, 3)
    grad = random_like(torch.empty(1, 8, 6, 6))
    _, want_gx, want_gw = reference(x, weight, 3, grad_out=grad)
    xr = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(involution(xr, weight, 3, impl=impl), xr, grad)
    torch.testing.assert_close(grad_x.double(), want_gx, rtol=1e-5, atol=1e-6)
    wr = weight.clone().requires_grad_()
    (grad_w,) = torch.autograd.grad(involution(x, wr, 3, impl=impl), wr, grad)
    torch.testing.assert_close(grad_w.double(), want_gw, rtol=1e-5, atol=1e-6)


def _peak_extra_bytes(fn):
    """Peak bytes allocated by ``fn`` beyond what it returns (scripts.benchmark.peak_bytes)."""
    peak, result = peak_bytes(fn, torch.device("cpu"))
    return peak - result.numel() * result.element_size()


def test_shift_forward_is_memory_lean():
    x, weight = involution_inputs(4, 64, 32, 32, 4, 7)
    out_bytes = x.numel() * x.element_size()
    with torch.no_grad():
        extra = _peak_extra_bytes(lambda: involution(x, weight, 7, impl="shift"))
        extra_unfold = _peak_extra_bytes(lambda: involution(x, weight, 7, impl="unfold"))
    assert extra <= 2 * out_bytes
    assert extra_unfold > 40 * out_bytes  # the check sees the reference's (B, C, K*K, H, W) buffers


def test_error_even_kernel_size():
    x, weight = involution_inputs(1, 8, 6, 6, 2, 3)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        involution(x, torch.randn(1, 2, 16, 6, 6), 4)


def test_error_channels_not_divisible_into_groups():
    x = torch.randn(1, 64, 6, 6)
    with pytest.raises(ValueError, match="64 channels are not divisible into 3 groups"):
        involution(x, torch.randn(1, 3, 9, 6, 6), 3)


def test_error_wrong_weight_shape():
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(2, 2, 9, 5, 6)
    with pytest.raises(ValueError, match=re.escape("(2, 2, 9, 5, 6)")) as info:
        involution(x, weight, 3)
    assert "(2, 2, 9, 6, 6)" in str(info.value)


def test_error_unknown_impl():
    x, weight = involution_inputs(1, 8, 6, 6, 2, 3)
    with pytest.raises(ValueError, match="unknown involution impl 'nope'"):
        involution(x, weight, 3, impl="nope")


def _layout_cases(stride):
    """NCHW inputs, and a channels_last model's: an NHWC x and a weight viewed from an NHWC conv output."""
    k, groups = 3, 2
    x, weight = involution_inputs(2, 8, 7, 5, groups, k, stride)
    b, _, kk, ho, wo = weight.shape
    w_cl = weight.reshape(b, groups * kk, ho, wo).contiguous(memory_format=torch.channels_last)
    return [(x, weight), (x.contiguous(memory_format=torch.channels_last), w_cl.view(b, groups, kk, ho, wo))]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "unfold"])
def test_custom_operator_passes_opcheck(impl, stride):
    # opcheck runs the operators for real and with fake tensors, under AOTAutograd and with
    # dynamic shapes: torch.compile relies on the fake kernels announcing the real outputs'
    # shapes and strides (a wrong weight-gradient layout once failed compiled channels_last training).
    for x, weight in _layout_cases(stride):
        x, weight = x.requires_grad_(), weight.requires_grad_()
        torch.library.opcheck(torch.ops.rednet.involution.default, (x, weight, 3, stride, 1, impl))
        grad_out = involution(x, weight, 3, stride, impl=impl).detach()
        for need_x, need_w in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(torch.ops.rednet.involution_backward.default,
                                  (grad_out, x.detach(), weight.detach(), 3, stride, 1, impl, need_x, need_w))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=True), "kernel_size must be odd and positive, got True"),
    (dict(kernel_size=3, stride=0), "stride must be a positive integer, got 0"),
    (dict(kernel_size=3, dilation=1.0), "dilation must be a positive integer, got 1.0"),
])
def test_error_bad_geometry(kwargs, message):
    x, weight = involution_inputs(1, 8, 6, 6, 2, 3)
    with pytest.raises(ValueError, match=re.escape(message)):
        involution(x, weight, **kwargs)


def test_error_integer_tensors():
    x, weight = involution_inputs(1, 8, 6, 6, 2, 3)
    with pytest.raises(ValueError, match="must be floating point, got torch.int64 and torch.int64"):
        involution(x.long(), weight.long(), 3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_batch(impl, stride):
    # As for a convolution: an all-unreadable batch (data.bad_images=skip) reaches the model empty.
    x, weight = involution_inputs(0, 8, 7, 5, 2, 3, stride)
    out, grad_x, grad_w = forward_and_grads(impl, x, weight, 3, stride)
    assert out.shape == (0, 8, *weight.shape[-2:]) and grad_x.shape == x.shape and grad_w.shape == weight.shape


def test_error_zero_size_map():
    message = "x must have at least one channel and pixel, got shape (1, 8, 0, 6)"
    with pytest.raises(ValueError, match=re.escape(message)):
        involution(torch.randn(1, 8, 0, 6), torch.randn(1, 2, 9, 0, 6), 3)
