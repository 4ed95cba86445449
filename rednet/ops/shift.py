"""Memory-lean involution in pure PyTorch: K*K shifted multiply-adds, never the unfolded tensor.

Every tap (u, v) of the kernel is a shift of the input. Instead of materialising the
(B, C, K*K, Ho, Wo) patches like the reference, the forward and the input gradient are one fused
``addcmul_`` per tap (``out += x_shifted * w_tap``), and the weight gradient a multiply and a sum
over the group's channels per kernel row. Measured choices (CPU, see scripts/bench_involution.py):

* **Flat shifts.** With the image flattened to H*W, a 2-D shift is a 1-D offset ``a*W + b``, so
  each operand of a tap is one long run per channel. Slicing the 2-D valid region instead gives
  runs of W - |b| elements, which PyTorch's elementwise kernels process 2-4x slower (10x on
  14x14 maps). A column shift then wraps into the neighbouring row; those products are cancelled
  by zeroing the tap's weight where the tap falls outside the image (``_valid_mask``), which is
  exactly the zero padding of the definition.
* **Strides by phases.** With stride s, output (i, j) reads x[s*i + a, s*j + b], the pixel
  (i + a//s, j + b//s) of the phase image x[a%s::s, b%s::s]. Splitting the input into its s*s
  phases turns any stride into stride-1 flat shifts on maps of the output's size.
* **Chunks.** The work runs over chunks of a few samples (or a few groups of one sample) so the
  49 passes of a 7x7 kernel hit L2/L3 cache instead of main memory. Each chunk is copied into
  reused contiguous buffers in the compute dtype; that one copy also handles channels_last and
  strided inputs, the stride phases, the float16/bfloat16 -> float32 upcast and the zero margins
  that keep every shifted read in bounds, and it lets the per-tap views be built once per call
  (a view costs microseconds, which adds up over 49 taps x chunks).
* **Weight gradient per kernel row.** The taps of a kernel row are equally spaced in the buffer,
  so one strided view covers them and one mul + sum over the channels gives all their
  gradients: 1.5x faster than per tap. einsum, linalg.vecdot, bmm, a loop over channels, banded
  matmuls and per-chunk unfolds all measured slower; so did per-row mul + sum for the forward.
* **Memory.** The extra memory is the chunk buffers, capped at 1.5x the larger of the input and
  the output in the forward and twice it in the backward. (With stride s the input is s*s times
  the output; capping at the output's size made ops too small to split between threads.)

Semantics differ from zero padding in one corner only: a non-finite input value can reach an
output through a tap whose weight is masked to zero (0 * inf = nan), where the reference would
give a finite result.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from rednet.ops.involution import new_output, new_weight_grad, register_impl

# Elements of chunk buffers per intra-op thread. On the CPU this keeps a chunk's working set in
# the caches while every op stays large enough to be split between the threads: on a 2-core
# Zen 4 (1 MiB L2 per core, 32 MiB L3), 2^20 float32 (4 MiB) and up to 2^22 measured alike, and
# 2^19 up to 1.6x slower (56x56 maps). Other devices only need chunks large enough to amortise
# kernel launches.
_CPU_BUDGET = 1 << 20
_DEVICE_BUDGET = 1 << 26
# Caps on the chunk buffers, in multiples of the larger activation (input or output): the extra
# peak memory of the forward, with its small tap mask, stays under 2x. More would only help
# strided calls on small batches, and the backward already holds 4x the output in gradients.
_FORWARD_CAP = 1.5
_BACKWARD_CAP = 2.0


def _budget(device: torch.device, cap: int) -> int:
    """Chunk buffer elements: the device's working size, at most ``cap`` (the caller's memory
    bound), but at least 2^18 (1 MiB of float32): cutting small tensors finer only multiplies
    per-op overheads (a (1, 512, 7, 7) call measured 1.6x faster with this floor than with 2^16)."""
    limit = _CPU_BUDGET * torch.get_num_threads() if device.type == "cpu" else _DEVICE_BUDGET
    return min(limit, max(cap, 1 << 18))


# PyTorch's CPU kernels run a vector loop and finish the remainder element by element; a
# per-channel run of ~150 elements (14x14 maps) with a 6-element remainder measured 20% slower
# than one widened to 160. 16 float32 is one AVX-512 vector, two AVX2 ones.
_VECTOR = 16


def _widen(m0: int, m1: int, size: int) -> tuple[int, int]:
    """[m0, m1) grown inside [0, size) to a multiple of _VECTOR elements where possible.

    The added positions are ones where the tap reads outside the image: their masked weight
    is 0, so in the forward and the input gradient they add zeros, and their weight gradient is
    masked afterwards. Only the margins of the input buffer must keep those reads in bounds.
    """
    length = min(size, -(-(m1 - m0) // _VECTOR) * _VECTOR)
    m0 = max(0, min(m0, m1 - length))
    return m0, m0 + length


class _Taps:
    """Where each tap reads, in a flat, phase-split and zero-margined input buffer.

    The input buffer of a unit (one group of one sample) holds, per channel, ``before`` zeros,
    the s*s phase images of (Ho, Wo) each, then ``after`` zeros. Output position m = i*Wo + j of
    tap (u, v) reads the buffer at ``before + shift + m``.
    """

    def __init__(self, kernel_size: int, stride: int, dilation: int, ho: int, wo: int):
        padding = dilation * (kernel_size - 1) // 2
        size = ho * wo
        self.in_size = stride * stride * size
        rows = []  # per kernel row u, the taps as (t, column phase, shift, m0, m1)
        for u in range(kernel_size):
            row = []
            for v in range(kernel_size):
                a, b = u * dilation - padding, v * dilation - padding
                phase = (a % stride) * stride + (b % stride)
                shift = phase * size + (a // stride) * wo + (b // stride)
                # Output positions whose read stays inside the tap's phase image; the others
                # read rows of zero padding (the valid mask zeroes their weight anyway).
                lo, hi = max(0, -(shift - phase * size)), min(size, size - (shift - phase * size))
                row.append((u * kernel_size + v, b % stride, shift, lo, max(lo, hi)))
            rows.append(row)
        # Forward and input gradient: one addcmul_ per tap over its own range.
        self.single = tuple((t, shift) + _widen(m0, m1, size) for row in rows for t, _, shift, m0, m1 in row
                            if m1 > m0)
        # Weight gradient: the taps of a kernel row that read the same column phase are equally
        # spaced both in the buffer and in the tap index, so one strided view covers them all
        # and a single mul + sum computes their gradients (measured 1.5x faster than per tap).
        # They share the union of their ranges; the zero margins keep those reads in bounds.
        groups = []
        for phase in range(stride):
            for row in rows:
                members = [tap for tap in row if tap[1] == phase and tap[4] > tap[3]]
                if not members:
                    continue
                lo, hi = _widen(min(tap[3] for tap in members), max(tap[4] for tap in members), size)
                first, count = members[0], len(members)
                t_step = (members[1][0] - first[0]) if count > 1 else 1
                shift_step = (members[1][2] - first[2]) if count > 1 else 1
                assert all(tap[0] == first[0] + i * t_step and tap[2] == first[2] + i * shift_step
                           for i, tap in enumerate(members))
                groups.append((first[0], t_step, count, first[2], shift_step, lo, hi))
        self.groups = tuple(groups)
        reads = [(m0 + shift, m1 + shift) for _, shift, m0, m1 in self.single]
        reads += [(lo + shift, hi + shift) for _, _, count, shift, step, lo, hi in groups
                  for shift in (shift, shift + (count - 1) * step)]
        lowest = min([0] + [start for start, _ in reads])
        highest = max([self.in_size] + [end for _, end in reads])
        self.before, self.after = -lowest, highest - self.in_size
        self.row_size = self.before + self.in_size + self.after


@lru_cache(maxsize=64)
def _taps(kernel_size: int, stride: int, dilation: int, ho: int, wo: int) -> _Taps:
    return _Taps(kernel_size, stride, dilation, ho, wo)


@lru_cache(maxsize=64)
def _valid_mask_cpu(kernel_size: int, stride: int, dilation: int, h: int, w: int, ho: int, wo: int) -> torch.Tensor:
    padding = dilation * (kernel_size - 1) // 2
    offsets = torch.arange(kernel_size) * dilation - padding
    rows = torch.arange(ho)[None, :] * stride + offsets[:, None]
    cols = torch.arange(wo)[None, :] * stride + offsets[:, None]
    rows_ok = (rows >= 0) & (rows < h)
    cols_ok = (cols >= 0) & (cols < w)
    return (rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape(kernel_size ** 2, ho * wo)


def _valid_mask(kernel_size, stride, dilation, h, w, ho, wo, dtype, device) -> torch.Tensor:
    """(K*K, Ho*Wo): 1 where the tap reads a pixel of the image, 0 where it reads padding."""
    return _valid_mask_cpu(kernel_size, stride, dilation, h, w, ho, wo).to(device=device, dtype=dtype)


def _chunks(batch: int, groups: int, unit: int, budget: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, g0, g1) ranges: whole samples when one fits the budget, else groups of one sample.

    Chunks are balanced (a budget of 3 groups out of 4 gives 2 + 2, not 3 + 1): a small last
    chunk costs as many per-op overheads as a full one and needs its own buffers and views.
    """
    per = max(1, budget // unit)

    def even(total: int, most: int) -> int:
        count = -(-total // most)
        return -(-total // count)

    if per >= groups:
        step = even(batch, per // groups)
        return [(b, min(batch, b + step), 0, groups) for b in range(0, batch, step)]
    step = even(groups, per)
    return [(b, b + 1, g, min(groups, g + step)) for b in range(batch) for g in range(0, groups, step)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a * b`` without a temporary: PyTorch's CPU kernels cast mixed dtypes (a bfloat16
    weight times the float32 mask) through a temporary copy of the whole operand, which measured
    as 0.77x the output of extra peak memory; copying first casts in place."""
    if a.dtype == b.dtype == out.dtype:
        torch.mul(a, b, out=out)
    else:
        out.copy_(a)
        out.mul_(b)


def _rows(buf: torch.Tensor, start: int, length: int, broadcast: bool = False) -> torch.Tensor:
    """View (n, rows, length) of the contiguous ``buf`` (n, rows, ...) at offset ``start`` in each row.

    ``as_strided`` rather than slicing: it is one call instead of two or three, which matters
    when hundreds of views are built per call. ``broadcast`` gives a stride-0 row dimension of
    size 1 (the weight shared by a group's channels).
    """
    n, rows = buf.shape[0], buf.shape[1]
    if broadcast:
        return buf.as_strided((n, 1, length), (buf.stride(0), 0, 1), start)
    return buf.as_strided((n, rows, length), (buf.stride(0), buf.stride(1), 1), start)


class _Geometry:
    """Shapes of one call, shared by forward and backward."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int):
        self.batch, self.channels, self.h, self.w = x.shape
        self.groups, self.kk, self.ho, self.wo = weight.shape[1:]
        self.cg = self.channels // self.groups
        self.size = self.ho * self.wo
        self.stride = stride
        self.taps = _taps(kernel_size, stride, dilation, self.ho, self.wo)
        self.center = self.kk // 2
        self.dtype = _compute_dtype(x.dtype)
        self.out_bytes, self.buffer_bytes = x.element_size(), torch.empty((), dtype=self.dtype).element_size()
        self.device = x.device
        self.mask = _valid_mask(kernel_size, stride, dilation, self.h, self.w, self.ho, self.wo, self.dtype,
                                x.device).view(self.kk, self.ho, self.wo)

    def chunks(self, unit: int, cap: float):
        """Chunks of at most the working size, whose buffers stay within ``cap`` x the larger
        activation (the input, or the output when it is larger)."""
        activation = self.batch * self.channels * max(self.h * self.w, self.size)
        # In bytes: half-precision activations get float32 buffers, half as many elements.
        elements = int(cap * activation * self.out_bytes / self.buffer_bytes)
        return _chunks(self.batch, self.groups, unit, _budget(self.device, elements))

    def new_input_buffer(self, n: int) -> torch.Tensor:
        # Zeros once: the margins, and with a stride the parts of the (Ho, Wo) phase images
        # beyond the input's edge, are never written by the chunk copies and must read as 0.
        return torch.zeros(n, self.cg, self.taps.row_size, dtype=self.dtype, device=self.device)

    def input_copies(self, buf: torch.Tensor, nb: int, ng: int):
        """(buffer view, index into a (nb, ng, Cg, H, W) chunk of x) pairs, one per phase."""
        s, data = self.stride, buf[:, :, self.taps.before:self.taps.before + self.taps.in_size]
        if s == 1:
            return [(data.view(nb, ng, self.cg, self.h, self.w), (Ellipsis,))]
        phases = data.view(nb, ng, self.cg, s, s, self.ho, self.wo)
        pairs = []
        for r in range(s):
            for c in range(s):
                rows, cols = len(range(r, self.h, s)), len(range(c, self.w, s))
                pairs.append((phases[:, :, :, r, c, :rows, :cols], (Ellipsis, slice(r, None, s), slice(c, None, s))))
        return pairs


class _ForwardPlan:
    """Buffers and per-tap views for chunks of ``nb`` samples x ``ng`` groups."""

    def __init__(self, g: _Geometry, nb: int, ng: int):
        n, before = nb * ng, g.taps.before
        self.g, self.nb, self.ng = g, nb, ng
        self.xb = g.new_input_buffer(n)
        self.wb = torch.empty(n, g.kk, g.size, dtype=g.dtype, device=g.device)
        self.ob = torch.empty(n, g.cg, g.size, dtype=g.dtype, device=g.device)
        self.x_copies = g.input_copies(self.xb, nb, ng)
        # The centre tap never reads padding and covers every output, so it initialises ob.
        self.first = (_rows(self.xb, before, g.size), _rows(self.wb, g.center * g.size, g.size, broadcast=True))
        self.taps = [(_rows(self.ob, m0, m1 - m0), _rows(self.xb, before + shift + m0, m1 - m0),
                      _rows(self.wb, t * g.size + m0, m1 - m0, broadcast=True))
                     for t, shift, m0, m1 in g.taps.single if t != g.center]

    def run(self, x5: torch.Tensor, weight: torch.Tensor, out5: torch.Tensor, b0: int, g0: int) -> None:
        g, b1, g1 = self.g, b0 + self.nb, g0 + self.ng
        xs = x5[b0:b1, g0:g1]
        for dst, index in self.x_copies:
            dst.copy_(xs[index])
        _mul_into(self.wb.view(self.nb, self.ng, g.kk, g.ho, g.wo), weight[b0:b1, g0:g1], g.mask)
        torch.mul(*self.first, out=self.ob)
        for acc, xt, wt in self.taps:
            acc.addcmul_(xt, wt)
        out5[b0:b1, g0:g1].copy_(self.ob.view(self.nb, self.ng, g.cg, g.ho, g.wo))


class _BackwardPlan:
    """Buffers and per-tap views of the backward; only those of the needed gradients."""

    def __init__(self, g: _Geometry, nb: int, ng: int, need_x: bool, need_w: bool):
        n, before = nb * ng, g.taps.before
        self.g, self.nb, self.ng, self.need_x, self.need_w = g, nb, ng, need_x, need_w
        self.gb = torch.empty(n, g.cg, g.size, dtype=g.dtype, device=g.device)
        if need_x:
            self.wb = torch.empty(n, g.kk, g.size, dtype=g.dtype, device=g.device)
            self.gxb = g.new_input_buffer(n)
            self.gx_copies = g.input_copies(self.gxb, nb, ng)
            taps = [(_rows(self.gxb, before + shift + m0, m1 - m0), _rows(self.gb, m0, m1 - m0),
                     _rows(self.wb, t * g.size + m0, m1 - m0, broadcast=True)) for t, shift, m0, m1 in g.taps.single]
            if g.stride == 1:
                # As in the forward, the centre tap covers the whole image and initialises it.
                self.gx_first = taps.pop(next(i for i, tap in enumerate(g.taps.single) if tap[0] == g.center))
            else:
                # Each phase is reached by some taps only, and none covers the zero rows and
                # columns that pad the phases: the buffer has to start from zero.
                self.gx_first = None
            self.gx_taps = taps
        if need_w:
            self.xb = g.new_input_buffer(n)
            self.x_copies = g.input_copies(self.xb, nb, ng)
            # Zeros once: each group of taps writes only its range, and the rest must stay 0.
            self.gwb = torch.zeros(n, g.kk, g.size, dtype=g.dtype, device=g.device)
            widest = max(count for _, _, count, _, _, _, _ in g.taps.groups)
            self.prod = torch.empty(n * g.cg * widest * g.size, dtype=g.dtype, device=g.device)
            self.gw_taps = []
            for t0, t_step, count, shift, shift_step, lo, hi in g.taps.groups:
                length = hi - lo
                gt = self.gb.as_strided((n, g.cg, 1, length), (g.cg * g.size, g.size, 0, 1), lo)
                xt = self.xb.as_strided((n, g.cg, count, length), (g.cg * g.taps.row_size, g.taps.row_size,
                                                                    shift_step, 1), before + shift + lo)
                prod = self.prod[:n * g.cg * count * length].view(n, g.cg, count, length)
                acc = self.gwb.as_strided((n, count, length), (g.kk * g.size, t_step * g.size, 1), t0 * g.size + lo)
                self.gw_taps.append((gt, xt, prod, acc))

    def run(self, go5, x5, weight, gx5, grad_w, b0: int, g0: int) -> None:
        g, nb, ng, b1, g1 = self.g, self.nb, self.ng, b0 + self.nb, g0 + self.ng
        self.gb.view(nb, ng, g.cg, g.ho, g.wo).copy_(go5[b0:b1, g0:g1])
        if self.need_x:
            _mul_into(self.wb.view(nb, ng, g.kk, g.ho, g.wo), weight[b0:b1, g0:g1], g.mask)
            if self.gx_first is None:
                self.gxb.zero_()
            else:
                acc, gt, wt = self.gx_first
                torch.mul(gt, wt, out=acc)
            for acc, gt, wt in self.gx_taps:
                acc.addcmul_(gt, wt)
            gxs = gx5[b0:b1, g0:g1]
            for src, index in self.gx_copies:
                gxs[index].copy_(src)
        if self.need_w:
            xs = x5[b0:b1, g0:g1]
            for dst, index in self.x_copies:
                dst.copy_(xs[index])
            # No single op multiplies and reduces over the group's channels; mul + sum into a
            # reused buffer measured faster than einsum, linalg.vecdot, bmm or a channel loop.
            for gt, xt, prod, acc in self.gw_taps:
                torch.mul(gt, xt, out=prod)
                torch.sum(prod, dim=1, out=acc)
            # Positions where a tap read padding got products of wrapped pixels: zero them.
            gwb = self.gwb.view(nb, ng, g.kk, g.ho, g.wo)
            if grad_w.dtype == gwb.dtype:
                torch.mul(gwb, g.mask, out=grad_w[b0:b1, g0:g1])
            else:  # as in _mul_into, avoid a cast through a temporary
                gwb.mul_(g.mask)
                grad_w[b0:b1, g0:g1].copy_(gwb)


def _forward(x: torch.Tensor, weight: torch.Tensor, g: _Geometry) -> torch.Tensor:
    out = new_output(x, (g.batch, g.channels, g.ho, g.wo))  # like a convolution, keeps channels_last
    x5 = x.view(g.batch, g.groups, g.cg, g.h, g.w)
    out5 = out.view(g.batch, g.groups, g.cg, g.ho, g.wo)
    plan = None
    for b0, b1, g0, g1 in g.chunks(g.cg * g.taps.row_size + g.kk * g.size + g.cg * g.size, cap=_FORWARD_CAP):
        if plan is None or (plan.nb, plan.ng) != (b1 - b0, g1 - g0):
            plan = None  # only the last chunk can be smaller; free the old buffers first
            plan = _ForwardPlan(g, b1 - b0, g1 - g0)
        plan.run(x5, weight, out5, b0, g0)
    return out


def _backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, g: _Geometry,
              need_x: bool, need_w: bool):
    grad_x = new_output(x, x.shape) if need_x else None
    grad_w = new_weight_grad(weight) if need_w else None
    x5 = x.view(g.batch, g.groups, g.cg, g.h, g.w)
    go5 = grad_out.view(g.batch, g.groups, g.cg, g.ho, g.wo)
    gx5 = grad_x.view(g.batch, g.groups, g.cg, g.h, g.w) if need_x else None
    # Two passes, one per gradient, rather than one over chunks holding the buffers of both:
    # each pass then fits about twice as many units per chunk in the same memory, so its ops are
    # twice as large (on 14x14 maps a chunk of one sample made ops too small to run efficiently
    # on two threads), for the price of copying grad_out into the buffers twice.
    widest = max(count for _, _, count, _, _, _, _ in g.taps.groups)
    passes = []
    if need_x:
        passes.append((True, False, g.cg * g.size + g.kk * g.size + g.cg * g.taps.row_size))
    if need_w:
        passes.append((False, True, g.cg * g.size + g.cg * g.taps.row_size + g.kk * g.size + g.cg * widest * g.size))
    for pass_x, pass_w, unit in passes:
        plan = None
        for b0, b1, g0, g1 in g.chunks(unit, cap=_BACKWARD_CAP):
            if plan is None or (plan.nb, plan.ng) != (b1 - b0, g1 - g0):
                plan = None
                plan = _BackwardPlan(g, b1 - b0, g1 - g0, pass_x, pass_w)
            plan.run(go5, x5, weight, gx5, grad_w, b0, g0)
        plan = None
    return grad_x, grad_w


def shift_forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    """Involution as K*K shifted multiply-adds; extra memory is a few cache-sized chunk buffers."""
    return _forward(x, weight, _Geometry(x, weight, kernel_size, stride, dilation))


def shift_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                   dilation: int, need_x: bool, need_w: bool):
    return _backward(grad_out, x, weight, _Geometry(x, weight, kernel_size, stride, dilation), need_x, need_w)


register_impl("shift", shift_forward, shift_backward, lambda device: True, rank=20)
