"""The fused kernel generator (rednet.ops.fused_involution), run on the CPU through Triton's interpreter.

The reference is independent of the kernels: ``F.conv2d`` builds the kernel map in float64 and the
``unfold`` involution (the official code's math) applies it, and autograd differentiates both.
Every output the kernels allocate is poisoned with NaN first (``torch.empty`` is patched), so an
element a kernel forgot to write cannot pass. TRITON_INTERPRET is set per test, for the reasons
given in test_ops_triton.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the fused operator runs unfused without it")

from rednet.config import validate  # noqa: E402
from rednet.errors import ConfigError  # noqa: E402
from rednet.models import Involution, build_model, create_model  # noqa: E402
from rednet.ops import (  # noqa: E402
    fused_available,
    fused_generator,  # noqa: E402
    fused_involution,
    involution_unfold,
    output_size,
)
from tests.conftest import assert_all_close, compose_config


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused custom operator, so a test knows it did not run unfused."""
    calls = []
    op = fused_generator._fused_op

    def counted(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(fused_generator, "_fused_op", counted)
    return calls


def fused_inputs(b, c, groups, cr, h, w, k, s, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, s, d), output_size(w, k, s, d)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return (randn(b, c, h, w), randn(b, cr, ho, wo), randn(groups * k * k, cr, 1, 1, scale=cr ** -0.5),
            randn(groups * k * k), randn(b, c, ho, wo))


def reference(x, reduced, weight, bias, grad_out, k, s, d):
    """Output and gradients of (x, reduced, weight, bias) of the unfused layer, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, reduced, weight, bias)]
    kernel_map = F.conv2d(leaves[1], leaves[2], leaves[3])
    b, _, ho, wo = kernel_map.shape
    out = involution_unfold(leaves[0], kernel_map.view(b, -1, k * k, ho, wo), k, s, d)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


def fused(x, reduced, weight, bias, grad_out, k, s, d):
    leaves = [t.detach().requires_grad_() for t in (x, reduced, weight, bias)]
    out = fused_involution(*leaves, k, s, d)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


NAMES = ("out", "grad_x", "grad_reduced", "grad_weight", "grad_bias")


def assert_matches(got, want, rtol, dtype):
    assert_all_close(got, want, NAMES, rtol, atol_scale=rtol, dtype=dtype)


# (B, C, G, Cr, H, W, K, stride, dilation): odd, non-square maps that span several of the
# interpreter's 32-pixel blocks and 4x4 grad-x tiles; 3 groups leave a partial block of 2; Cr of
# 3 and 17 are padded to 16 and 32 for tl.dot.
CASES = [
    (1, 4, 2, 3, 9, 7, 3, 1, 1),
    (2, 2, 1, 17, 9, 7, 3, 2, 1),
    (1, 2, 1, 3, 11, 9, 7, 1, 1),
    (1, 3, 3, 2, 9, 11, 7, 2, 1),
    (1, 3, 3, 4, 8, 9, 5, 1, 2),
    (1, 2, 2, 5, 7, 6, 3, 3, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}c{}g{}cr{}h{}w{}k{}s{}d{}".format(*c))
def test_float64_matches_unfused(case, fused_calls):
    *shape, k, s, d = case
    inputs = fused_inputs(*shape, k, s, d, seed=sum(case))
    assert_matches(fused(*inputs, k, s, d), reference(*inputs, k, s, d), rtol=1e-10, dtype=torch.float64)
    assert len(fused_calls) == 1


@pytest.mark.parametrize("k, s", [(7, 1), (3, 2)])
def test_float32_matches_unfused(k, s):
    inputs = fused_inputs(2, 4, 2, 6, 9, 7, k, s, 1, dtype=torch.float32, seed=k + s)
    assert_matches(fused(*inputs, k, s, 1), reference(*inputs, k, s, 1), rtol=1e-5, dtype=torch.float32)


def test_bfloat16_under_autocast_accumulates_in_float32():
    # Float32 inputs under a bfloat16 autocast are cast like the convolution they replace would
    # cast them; the result is compared with the float64 answer for the same rounded inputs. With
    # float32 sums the error is the rounding of the bfloat16 outputs (and of the kernel gradient,
    # stored in bfloat16 as the unfused layer stores it): 3.6e-3 at most here. Summing a group's 16
    # channels into the kernel gradient in bfloat16 instead gives 3e-2.
    k, s = 7, 1
    inputs = fused_inputs(1, 16, 1, 8, 9, 8, k, s, 1, dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(*inputs, k, s, 1)
    rounded = [t.to(torch.bfloat16) for t in inputs]
    want = reference(*rounded, k, s, 1)
    for name, g, r in zip(NAMES, got, want):
        assert not g.isnan().any(), name
        error = ((g.double() - r).norm() / r.norm()).item()
        assert error < 6e-3, f"{name}: relative error {error:.1e}"
    assert got[0].dtype == torch.bfloat16


def test_backward_is_deterministic():
    # Eight images: eight weight-gradient partial sums in the interpreter, whose float32 total
    # depends on the order they are added in (summing them in a random order fails this test).
    inputs = fused_inputs(8, 2, 1, 3, 5, 4, 3, 1, 1, dtype=torch.float32, seed=5)
    first, second = fused(*inputs, 3, 1, 1), fused(*inputs, 3, 1, 1)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_only_the_requested_gradients():
    # A frozen generator (weight and bias without grad) and a frozen input: the backward computes
    # only grad_reduced, and it is still right.
    k, s = 3, 2
    x, reduced, weight, bias, grad_out = fused_inputs(1, 4, 2, 3, 9, 7, k, s, 1, seed=6)
    reduced.requires_grad_()
    out = fused_involution(x, reduced, weight, bias, k, s)
    (grad_r,) = torch.autograd.grad(out, reduced, grad_out)
    torch.testing.assert_close(grad_r, reference(x, reduced, weight, bias, grad_out, k, s, 1)[2])


def test_channels_last_is_read_in_place_and_kept():
    k, s = 3, 1
    inputs = fused_inputs(2, 4, 2, 3, 7, 9, k, s, 1, seed=7)
    x, reduced, weight = (t.contiguous(memory_format=torch.channels_last) for t in inputs[:3])
    got = fused(x, reduced, weight, inputs[3], inputs[4], k, s, 1)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    assert got[2].is_contiguous(memory_format=torch.channels_last)
    assert got[3].stride() == weight.stride()
    assert_matches(got, reference(*inputs, k, s, 1), rtol=1e-10, dtype=torch.float64)


def test_empty_batch():
    x, reduced, weight, bias, grad_out = fused_inputs(0, 4, 2, 3, 7, 5, 3, 1, 1)
    got = fused(x, reduced, weight, bias, grad_out, 3, 1, 1)
    assert got[0].shape == (0, 4, 7, 5) and got[1].shape == x.shape and got[2].shape == reduced.shape
    assert torch.equal(got[3], torch.zeros_like(weight)) and torch.equal(got[4], torch.zeros_like(bias))


def test_bad_arguments_are_refused():
    x, reduced, weight, bias, _ = fused_inputs(1, 4, 2, 3, 7, 5, 3, 1, 1)
    with pytest.raises(ValueError, match=r"weight must be a 1x1 convolution's \(G\*K\*K, Cr, 1, 1\) with Cr = 3"):
        fused_involution(x, reduced, weight[:, :2], bias, 3)
    with pytest.raises(ValueError, match=r"bias must be \(18,\)"):
        fused_involution(x, reduced, weight, bias[:9], 3)
    with pytest.raises(ValueError, match="does not match the expected"):  # reduced of another size
        fused_involution(x, reduced[..., :4], weight, bias, 3)
    with pytest.raises(ValueError, match="must have one dtype"):
        fused_involution(x, reduced.float(), weight, bias, 3)


def test_custom_operator_passes_opcheck():
    # torch.compile trusts the fake kernels (shapes, layouts) and the autograd registration.
    k, s = 3, 2
    x, reduced, weight, bias, grad_out = fused_inputs(1, 1, 1, 2, 5, 4, k, s, 1, dtype=torch.float32, seed=8)
    leaves = [t.requires_grad_() for t in (x, reduced, weight, bias)]
    torch.library.opcheck(torch.ops.rednet.involution_fused.default, (*leaves, k, s, 1))
    torch.library.opcheck(torch.ops.rednet.involution_fused_backward.default,
                          (grad_out, x.detach(), reduced.detach(), weight.detach(), bias.detach(), k, s, 1,
                           True, True, True))


def layer_pair(stride, kernel_size=3):
    torch.manual_seed(stride)
    unfused = Involution(4, kernel_size, stride, group_channels=2, reduction_ratio=2).double()
    layer = Involution(4, kernel_size, stride, group_channels=2, reduction_ratio=2, fused_generator=True).double()
    layer.load_state_dict(unfused.state_dict())  # the same keys: a checkpoint of either loads strictly
    with torch.no_grad():  # a non-trivial BatchNorm affine, so its gradients are checked too
        for m in (unfused, layer):
            m.conv1.bn.weight.copy_(torch.linspace(0.5, 1.5, 2))
            m.conv1.bn.bias.copy_(torch.linspace(-0.2, 0.3, 2))
    return unfused, layer


def layer_results(layer, x):
    x = x.detach().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out).mul_(torch.arange(out.numel(),
                                dtype=out.dtype).view(out.shape).sin()))
    return out, grads


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_option_matches_unfused_layer(stride, fused_calls):
    # Training mode: the generator's BatchNorm uses batch statistics, and every parameter of the
    # generator (conv1, bn, conv2 weight and bias) gets its gradient through the fused backward.
    unfused, layer = layer_pair(stride)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    (want, want_grads), (got, got_grads) = layer_results(unfused, x), layer_results(layer, x)
    assert len(fused_calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_without_the_interpreter_the_option_runs_unfused_exactly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused_available("cpu")

    def refuse(*args):
        raise AssertionError("the fused operator ran where Triton cannot run")

    monkeypatch.setattr(fused_generator, "_fused_op", refuse)
    unfused, layer = layer_pair(2)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    (want, want_grads), (got, got_grads) = layer_results(unfused, x), layer_results(layer, x)
    assert torch.equal(got, want)
    assert all(torch.equal(g, r) for g, r in zip(got_grads, want_grads))


def test_torch_compile_captures_the_fused_layer_as_one_operator():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    _, layer = layer_pair(1)
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    expected = layer(x)
    out = torch.compile(layer, backend=recording_backend, fullgraph=True)(x)
    torch.testing.assert_close(out, expected)
    assert len(graphs) == 1 and graphs[0].count("rednet.involution_fused") == 1
    assert graphs[0].count("conv2d") == 1  # the generator's first conv; the second is fused


def test_model_option_keeps_the_official_state_dict():
    fused = create_model("rednet26", fused_generator=True)
    plain = create_model("rednet26")
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)
    involutions = [m for m in fused.modules() if isinstance(m, Involution)]
    assert len(involutions) == 9 and all(m.fused_generator for m in involutions)


def test_config_option_reaches_every_involution():
    cfg = compose_config(["model=rednet18", "data=fake", "data.num_classes=3", "model.fused_generator=true"])
    validate(cfg)
    model = build_model(cfg.model, num_classes=3, in_chans=3, image_size=32)
    involutions = [m for m in model.modules() if isinstance(m, Involution)]
    assert involutions and all(m.fused_generator for m in involutions)


def test_config_rejects_the_option_for_resnets():
    cfg = compose_config(["model=resnet50", "model.fused_generator=true"])
    with pytest.raises(ConfigError,
                       match="model.fused_generator=true fuses RedNet's involutions, and resnet50 has none"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("s", [1, 2])
def test_rednet_stage_shapes_float32(s):
    # A stage-3-like layer at a reduced size: 64 channels in 4 groups, Cr = 16, K = 7, a 14x14 map
    # (several 4x4 grad-x tiles, halos clipped at the map's edge).
    inputs = fused_inputs(1, 64, 4, 16, 14, 14, 7, s, 1, dtype=torch.float32, seed=10 + s)
    assert_matches(fused(*inputs, 7, s, 1), reference(*inputs, 7, s, 1), rtol=1e-5, dtype=torch.float32)


@pytest.mark.slow
def test_gradcheck_float64():
    k, s = 3, 2
    x, reduced, weight, bias, _ = fused_inputs(1, 2, 1, 2, 5, 4, k, s, 1, seed=11)
    leaves = [t.requires_grad_() for t in (x, reduced, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: fused_involution(*a, k, s), leaves, fast_mode=True)


def test_halo_bound_covers_every_tap():
    # The grad-x kernel forms the kernels of a halo of output rows around each input tile; the
    # bound must cover every output row any tap of the tile reaches. Checked exhaustively against
    # the definition for small tiles, kernels, strides and dilations.
    for tile in (1, 4, 8):
        for k in (1, 3, 5, 7):
            for s in (1, 2, 3):
                for d in (1, 2):
                    size = 3 * tile + 5
                    out = output_size(size, k, s, d)
                    pad = d * (k - 1) // 2
                    bound = fused_generator._halo(tile, out, k, s, d)
                    for y0 in range(0, size, tile):
                        rows = {(y + pad - u * d) // s for y in range(y0, min(y0 + tile, size)) for u in range(k)
                                if y + pad - u * d >= 0 and (y + pad - u * d) % s == 0
                                and (y + pad - u * d) // s < out}
                        if rows:
                            first = math.ceil(max(y0 + pad - (k - 1) * d, 0) / s)
                            assert min(rows) >= first and max(rows) - first < bound, (tile, k, s, d, y0)
