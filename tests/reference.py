"""The involution written for the tests only: the definition in float64, tap by tap.

    out[b, c, i, j] = sum_{u, v} weight[b, c // (C/G), u*K + v, i, j] * x[b, c, i*s + u*d - p, j*s + v*d - p]

with p = d * (K - 1) // 2 and taps outside the image contributing nothing (zero padding). The
gradients are the same sum read the other way round, written out by hand. No code of the library,
no F.unfold, no padded copy and no autograd: every implementation (``unfold`` included) is checked
against something it shares nothing with.

The loop runs over the K*K taps. For one tap, the output pixels whose input pixel lies inside the
image form a rectangle [i0, i1) x [j0, j1), and the pixels they read are the strided rectangle
x[i0*s + u*d - p :: s, j0*s + v*d - p :: s]; each tap is one multiply-add of those two rectangles.
(A Python loop over single pixels took 10-40 s per RedNet-sized case in test_ops.py.)
"""

from __future__ import annotations

import torch


def _inside(size_out: int, size_in: int, offset: int, stride: int) -> tuple[int, int]:
    """The output range [o0, o1) whose input index o*stride + offset lies in [0, size_in)."""
    o0 = 0
    while o0 < size_out and o0 * stride + offset < 0:
        o0 += 1
    o1 = o0
    while o1 < size_out and o1 * stride + offset < size_in:
        o1 += 1
    return o0, o1


def involution_reference(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1,
                         dilation: int = 1, grad_out: torch.Tensor | None = None):
    """``out`` in float64 on the CPU; ``(out, grad_x, grad_weight)`` when ``grad_out`` is given."""
    b, c, h, w = x.shape
    groups, kk, ho, wo = weight.shape[1:]
    assert kk == kernel_size**2 and c % groups == 0
    # Channels viewed as (group, channel in group), so a group's kernel broadcasts over its channels.
    x = x.detach().cpu().double().reshape(b, groups, c // groups, h, w)
    weight = weight.detach().cpu().double()
    pad = dilation * (kernel_size - 1) // 2
    out = torch.zeros(b, groups, c // groups, ho, wo, dtype=torch.float64)
    backward = grad_out is not None
    if backward:
        g = grad_out.detach().cpu().double().reshape(b, groups, c // groups, ho, wo)
        grad_x = torch.zeros_like(x)
        grad_w = torch.zeros_like(weight)
    for u in range(kernel_size):
        for v in range(kernel_size):
            tap = u * kernel_size + v
            i0, i1 = _inside(ho, h, u * dilation - pad, stride)
            j0, j1 = _inside(wo, w, v * dilation - pad, stride)
            if i0 >= i1 or j0 >= j1:
                continue
            r0, c0 = i0 * stride + u * dilation - pad, j0 * stride + v * dilation - pad
            rows = slice(r0, r0 + (i1 - i0 - 1) * stride + 1, stride)
            cols = slice(c0, c0 + (j1 - j0 - 1) * stride + 1, stride)
            kernel = weight[:, :, None, tap, i0:i1, j0:j1]  # (B, G, 1, rows, cols)
            out[..., i0:i1, j0:j1] += kernel * x[..., rows, cols]
            if backward:
                grad_x[..., rows, cols] += kernel * g[..., i0:i1, j0:j1]
                grad_w[:, :, tap, i0:i1, j0:j1] = (x[..., rows, cols] * g[..., i0:i1, j0:j1]).sum(dim=2)
    out = out.reshape(b, c, ho, wo)
    if not backward:
        return out
    return out, grad_x.reshape(b, c, h, w), grad_w
