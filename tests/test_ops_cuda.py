"""The involution implementations on a CUDA GPU: the compiled, autotuned Triton kernels.

These run only where CUDA is available (CI has none, so they are skipped there); on the CPU the
same kernels are tested through Triton's interpreter in ``test_ops_triton.py``. The reference is
tests/reference.py (the definition in float64 on the CPU), fed the same (rounded) inputs, so every
GPU result is compared with an exact answer rather than with another implementation.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from rednet.models import create_model  # noqa: E402
from rednet.ops import available_impls, involution, output_size  # noqa: E402
from tests.reference import involution_reference  # noqa: E402

CUDA = torch.device("cuda")
# Relative error bounds per dtype, measured as ||got - ref|| / ||ref|| (fp32 accumulation throughout).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


def check(impl, b, c, groups, h, w, k, s, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, s, d), output_size(w, k, s, d)
    x = torch.randn(b, c, h, w, generator=gen).to(dtype)
    weight = torch.randn(b, groups, k * k, ho, wo, generator=gen).to(dtype)
    grad_out = torch.randn(b, c, ho, wo, generator=gen).to(dtype)

    def run(x, weight, grad_out, impl, device):
        x = x.to(device).requires_grad_()
        weight = weight.to(device).requires_grad_()
        out = involution(x, weight, k, s, d, impl=impl)
        return (out, *torch.autograd.grad(out, (x, weight), grad_out.to(device)))

    got = run(x, weight, grad_out, impl, CUDA)
    want = involution_reference(x, weight, k, s, d, grad_out=grad_out)
    for name, g, r in zip(("out", "grad_x", "grad_weight"), got, want):
        assert g.dtype == dtype and g.shape == r.shape, name
        err = relative_error(g, r)
        assert err < TOLERANCE[dtype], f"{impl} {name} {dtype}: relative error {err:.2e}"


def test_triton_is_auto_on_cuda():
    assert available_impls(CUDA)[0] == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # (B, C, G, H, W, K, S, D): RedNet stage shapes, then odd sizes, partial blocks and dilation.
    (4, 64, 4, 56, 56, 7, 1, 1),
    (4, 64, 4, 56, 56, 7, 2, 1),
    (2, 256, 16, 14, 14, 7, 1, 1),
    (2, 512, 32, 7, 7, 7, 1, 1),
    (3, 24, 2, 13, 11, 3, 1, 2),
    (3, 12, 4, 17, 9, 5, 2, 1),
], ids=lambda c: "b{}c{}g{}h{}w{}k{}s{}d{}".format(*c))
@pytest.mark.parametrize("impl", ["triton", "shift"])
def test_matches_float64_reference(impl, case, dtype):
    check(impl, *case, dtype=dtype)


def test_channels_last_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 15, 15, generator=gen).to(CUDA)
    weight = torch.randn(2, 2, 49, 15, 15, generator=gen).to(CUDA)
    want = involution_reference(x, weight, 7)
    got = involution(x.contiguous(memory_format=torch.channels_last), weight, 7, impl="triton")
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rednet26_trains_under_autocast(dtype):
    # The official CuPy kernel failed to compile for half inputs; here a whole training step runs
    # under autocast with the Triton kernels. Half precision through 26 layers and batch-4 batch
    # norm moves the gradient by a few percent (up to 17% in norm for bf16), so the check is on its
    # direction: a wrong or unwritten kernel output gives an unrelated, or non-finite, gradient.
    torch.manual_seed(0)
    model = create_model("rednet26", num_classes=10).to(CUDA)
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    y = torch.tensor([0, 1, 2, 3], device=CUDA)

    def step(autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss, full), (half_loss, half) = step(False), step(True)
    assert torch.isfinite(half).all()
    assert abs(half_loss - loss) < 0.05 * loss
    assert torch.nn.functional.cosine_similarity(half, full, dim=0).item() > 0.95


# --- The fused kernel generator (rednet.ops.fused_involution) ---------------------------------------

def fused_check(b, c, groups, cr, h, w, k, s, dtype, seed=0, monkeypatch=None):
    """The fused operator on CUDA against conv2d + unfold in float64 on the CPU, forward and the
    gradients of x, reduced, weight and bias, with every output poisoned before the kernels run."""
    from rednet.ops import fused_involution

    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, k, s, 1), output_size(w, k, s, 1)
    inputs = [torch.randn(b, c, h, w, generator=gen), torch.randn(b, cr, ho, wo, generator=gen).relu(),
              torch.randn(groups * k * k, cr, 1, 1, generator=gen) * cr ** -0.5,
              torch.randn(groups * k * k, generator=gen) * 0.1]
    inputs = [t.to(dtype) for t in inputs]  # the rounded values are what both sides compute with
    grad_out = torch.randn(b, c, ho, wo, generator=gen).to(dtype)

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    leaves = [t.to(CUDA).requires_grad_() for t in inputs]
    out = fused_involution(*leaves, k, s)
    got = (out, *torch.autograd.grad(out, leaves, grad_out.to(CUDA)))
    monkeypatch.undo()

    ref_leaves = [t.double().requires_grad_() for t in inputs]
    kernel_map = torch.nn.functional.conv2d(ref_leaves[1], ref_leaves[2], ref_leaves[3])
    ref = involution(ref_leaves[0], kernel_map.view(b, groups, k * k, ho, wo), k, s, impl="unfold")
    want = (ref, *torch.autograd.grad(ref, ref_leaves, grad_out.double()))
    for name, g, r in zip(("out", "grad_x", "grad_reduced", "grad_weight", "grad_bias"), got, want):
        assert g.dtype == dtype and g.shape == r.shape, name
        err = relative_error(g, r)
        assert err < TOLERANCE[dtype], f"fused {name} {dtype}: relative error {err:.2e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # (B, C, G, Cr, H, W, K, S): RedNet-26 layers at a small batch (stage 1, the stride-2 first
    # block of stage 4 with K*K*G = 1568, the stem's K = 3 with Cr = 8), then odd sizes.
    (4, 64, 4, 16, 56, 56, 7, 1),
    (4, 512, 32, 128, 14, 14, 7, 2),
    (2, 32, 2, 8, 112, 112, 3, 1),
    (3, 24, 3, 5, 13, 11, 5, 2),
    (2, 12, 4, 3, 17, 9, 7, 1),
], ids=lambda c: "b{}c{}g{}cr{}h{}w{}k{}s{}".format(*c))
def test_fused_matches_float64_reference(case, dtype, monkeypatch):
    fused_check(*case, dtype=dtype, monkeypatch=monkeypatch)


def test_fused_backward_is_deterministic(monkeypatch):
    first = fused_check(8, 128, 8, 32, 28, 28, 7, 1, torch.bfloat16, monkeypatch=monkeypatch)
    second = fused_check(8, 128, 8, 32, 28, 28, 7, 1, torch.bfloat16, monkeypatch=monkeypatch)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rednet26_with_fused_generator_trains_like_unfused(dtype):
    # The same weights with and without the option: one autocast training step gives nearly the
    # same loss and gradient (the fused kernel keeps the generated kernel in fp32 where the unfused
    # layer rounds it to the autocast dtype); a wrong kernel gives an unrelated gradient.
    torch.manual_seed(0)
    plain = create_model("rednet26", num_classes=10).to(CUDA)
    fused = create_model("rednet26", num_classes=10, fused_generator=True).to(CUDA)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    y = torch.tensor([0, 1, 2, 3], device=CUDA)

    def step(model):
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss, grads), (fused_loss, fused_grads) = step(plain), step(fused)
    assert torch.isfinite(fused_grads).all()
    # Two half-precision paths differ by about as much as half and full precision do (see above).
    assert abs(fused_loss - loss) < 0.05 * loss
    assert torch.nn.functional.cosine_similarity(fused_grads, grads, dim=0).item() > 0.95
