"""Involution with a fused kernel generator: the per-pixel kernels are built on chip, never stored.

``fused_involution(x, reduced, weight, bias, kernel_size, stride, dilation)`` computes

    involution(x, conv2d(reduced, weight, bias).view(B, G, K*K, Ho, Wo), kernel_size, stride, dilation)

where ``reduced`` (B, Cr, Ho, Wo) is the kernel generator's hidden layer (after its pooling,
first 1x1 convolution, BatchNorm and ReLU) and ``weight`` (G*K*K, Cr, 1, 1) and ``bias``
(G*K*K,) are its second 1x1 convolution. The unfused layer writes that convolution's output, the
kernel map (3.06 times the activation for K = 7 and 16 channels per group), reads it twice and
writes and reads its gradient twice more. Here every kernel value is formed in registers by a
``tl.dot`` over a tile of pixels ([K*K x Cr] @ [Cr x pixels], one group at a time) and used where
it is formed; the backward recomputes it instead of saving it. See docs/benchmarks.md ("Involution
kernels") for the byte counts and the register budget behind the tiling.

The backward returns the gradients of x, reduced, weight and bias. It is deterministic: every
output element is written by one program, and the weight gradient, a sum over all pixels, is
summed per chunk of images into a partial buffer that ``torch.sum`` then reduces in a fixed order.
No atomics.

Where Triton cannot run (no triton, or the CPU without ``TRITON_INTERPRET=1``) the function
computes the unfused path itself, ``conv2d`` then :func:`rednet.ops.involution` with ``impl``, so
a layer gives the same results with and without the option there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rednet.ops.involution import available_impls, check_args, involution, new_output
from rednet.ops.triton_kernels import _SUPPORTED_DTYPES, InterpretedFunction, _interpreting, launch_kernel, triton

if triton is not None:
    import triton.language as tl
else:  # the annotations below are only read when the kernels are built
    tl = None

# Tiles used in the interpreter instead of autotuning (see triton_kernels._INTERPRET_META): small
# enough that the tests' 9x7 to 13x11 images span several pixel blocks and grad-x tiles (so the
# halo logic at tile borders is exercised), and two groups per block with three groups leaves a
# partial block.
_INTERPRET_META = {
    "forward": dict(BLOCK_P=32, GROUP_BLOCK=2),
    "grad_x": dict(GROUP_BLOCK=2),
    "grad_reduced": dict(BLOCK_P=32),
    "grad_weight": dict(BLOCK_P=32),
}
_INTERPRET_TILE = (4, 4)  # the grad-x kernel's input tile (rows, columns) in the interpreter
_GPU_TILE = (8, 8)  # ... and on the GPU: a 14x14 halo for K = 7, padded to 256 (docs/benchmarks.md)
# The weight-gradient kernel runs GROUPS x chunks programs. More programs hide more latency but
# each one writes a (K*K, Cr) partial sum: about 2 per SM keeps that buffer under a few MB.
_WEIGHT_GRAD_PROGRAMS_PER_SM = 2


def _pad(n: int) -> int:
    """A block dimension: a power of two, and at least 16, the smallest tl.dot operand on a GPU."""
    return max(16, triton.next_power_of_2(n))


def _halo(tile: int, out_size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Output rows (or columns) whose windows reach into a tile of ``tile`` input rows.

    The rows needed run from max(0, ceil(A / s)) to floor((A + D) / s), with D = tile - 1 +
    (K - 1) * d, so there are at most D // s + 1 of them, and never more than the map has.
    """
    return min((tile - 1 + (kernel_size - 1) * dilation) // stride + 1, out_size)


# The kernels. The conventions of triton_kernels.py hold: tensors are addressed through their
# strides (NCHW and channels_last alike), batch and channel offsets are int64, only Triton builtins
# are called (and tl.cast, not .to, for loop variables, which the interpreter keeps as Python
# ints). Sums are tl.reduce(..., tl.standard._sum_combine), which is what tl.sum runs for floats:
# tl.sum itself is a @triton.jit helper, which fails in a kernel interpreted after triton was
# imported without TRITON_INTERPRET, and costs the interpreter 10 ms a call. Negative integer quotients are never
# trusted (the GPU rounds them toward zero,
# the interpreter toward -inf). The conv2 weight is addressed as (G*K*K, Cr) with strides sw0, sw1:
# row g*K*K + t holds tap t of group g, as in the unfused layer's view (B, G, K*K, Ho, Wo).
# Every block dimension that enters a tl.dot is padded to a power of two of at least 16 and
# masked: taps to KK_PAD (9 -> 16, 49 -> 64), generator channels to CR_PAD (8 -> 16).


def _fused_forward_kernel(x_ptr, r_ptr, w2_ptr, b2_ptr, out_ptr, H, W, WO, N_PIX, GROUPS, C_PER_G, CR,
                          sxb, sxc, sxh, sxw, srb, src, srh, srw, sw0, sw1, sbias, sob, soc, soh, sow,
                          K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, PADDING: tl.constexpr,
                          KK_PAD: tl.constexpr, CR_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, GROUP_BLOCK: tl.constexpr):
    # A program owns BLOCK_P output pixels of one image and GROUP_BLOCK groups. It loads the
    # pixels' generator features once and, per group, forms the [taps x pixels] kernel with one
    # tl.dot, then applies it to the group's channels, one [taps x pixels] gather of x per channel.
    # Group blocks vary fastest, so the programs that share a feature tile run together (L2).
    pid = tl.program_id(0)
    n_gblk = (GROUPS + GROUP_BLOCK - 1) // GROUP_BLOCK
    n_pblk = (N_PIX + BLOCK_P - 1) // BLOCK_P
    gblk = pid % n_gblk
    pid_p = (pid // n_gblk) % n_pblk
    b = (pid // (n_gblk * n_pblk)).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N_PIX
    oi = offs_p // WO
    oj = offs_p % WO
    chans = tl.arange(0, CR_PAD)
    mask_r = chans < CR
    feats = tl.load(r_ptr + b * srb + chans[:, None] * src + (oi * srh + oj * srw)[None, :],
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0).to(DOT_DTYPE)

    taps = tl.arange(0, KK_PAD)
    mask_t = taps < K * K
    iy = oi[None, :] * STRIDE + (taps // K)[:, None] * DILATION - PADDING
    ix = oj[None, :] * STRIDE + (taps % K)[:, None] * DILATION - PADDING
    x_ok = mask_t[:, None] & mask_p[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    x_taps = x_ptr + b * sxb + iy * sxh + ix * sxw
    out_pix = out_ptr + b * sob + oi * soh + oj * sow

    g_end = tl.minimum(gblk * GROUP_BLOCK + GROUP_BLOCK, GROUPS)
    for g in range(gblk * GROUP_BLOCK, g_end):
        rows = g * K * K + taps
        w2 = tl.load(w2_ptr + rows[:, None] * sw0 + chans[None, :] * sw1, mask=mask_t[:, None] & mask_r[None, :],
                     other=0.0).to(DOT_DTYPE)
        bias = tl.load(b2_ptr + rows * sbias, mask=mask_t, other=0.0).to(ACC_DTYPE)
        kernel = tl.dot(w2, feats, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) + bias[:, None]
        for c in range(C_PER_G):
            channel = tl.cast(g * C_PER_G + c, tl.int64)
            xv = tl.load(x_taps + channel * sxc, mask=x_ok, other=0.0).to(ACC_DTYPE)
            summed = tl.reduce(kernel * xv, 0, tl.standard._sum_combine)
            tl.store(out_pix + channel * soc, summed.to(out_ptr.dtype.element_ty), mask=mask_p)


def _fused_grad_x_kernel(go_ptr, r_ptr, w2_ptr, b2_ptr, gx_ptr, H, W, HO, WO, GROUPS, C_PER_G, CR,
                         sgb, sgc, sgh, sgw, srb, src, srh, srw, sw0, sw1, sbias, sxb, sxc, sxh, sxw,
                         K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, PADDING: tl.constexpr,
                         KK_PAD: tl.constexpr, CR_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         TILE_H: tl.constexpr, TILE_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
                         HALO_PAD: tl.constexpr, GROUP_BLOCK: tl.constexpr):
    # Gather, as in triton_kernels._grad_x_kernel: a program owns a TILE_H x TILE_W tile of *input*
    # pixels (and GROUP_BLOCK groups) and writes each of their gradients once:
    #     grad_x[c, q] = sum_t kernel[t, p(q, t)] * grad_out[c, p(q, t)],
    # p(q, t) being the output pixel whose tap t lies on q. Those kernel values belong to a
    # rectangle of output pixels around the tile, the halo (HALO_H x HALO_W, at most 14 x 14 for an
    # 8 x 8 tile and K = 7). The program forms the kernel of the whole halo with one tl.dot per
    # group and picks kernel[t, p(q, t)] out of it with tl.gather: a tap-wise product of the
    # generator per input pixel would be a [1 x Cr] @ [Cr x 1] product, work no tensor core takes.
    pid = tl.program_id(0)
    n_gblk = (GROUPS + GROUP_BLOCK - 1) // GROUP_BLOCK
    n_tw = (W + TILE_W - 1) // TILE_W
    n_th = (H + TILE_H - 1) // TILE_H
    gblk = pid % n_gblk
    tile = pid // n_gblk
    y0 = ((tile // n_tw) % n_th) * TILE_H
    x0 = (tile % n_tw) * TILE_W
    b = (tile // (n_tw * n_th)).to(tl.int64)

    offs_q = tl.arange(0, TILE_H * TILE_W)
    qy = y0 + offs_q // TILE_W
    qx = x0 + offs_q % TILE_W
    mask_q = (qy < H) & (qx < W)

    # The halo's first output row: ceil(A / STRIDE) for the tile's lowest reachable row A, or 0.
    i0 = (tl.maximum(y0 + PADDING - (K - 1) * DILATION, 0) + STRIDE - 1) // STRIDE
    j0 = (tl.maximum(x0 + PADDING - (K - 1) * DILATION, 0) + STRIDE - 1) // STRIDE
    offs_h = tl.arange(0, HALO_PAD)
    hi = i0 + offs_h // HALO_W
    hj = j0 + offs_h % HALO_W
    mask_h = (offs_h < HALO_H * HALO_W) & (hi < HO) & (hj < WO)
    chans = tl.arange(0, CR_PAD)
    mask_r = chans < CR
    feats = tl.load(r_ptr + b * srb + chans[:, None] * src + (hi * srh + hj * srw)[None, :],
                    mask=mask_r[:, None] & mask_h[None, :], other=0.0).to(DOT_DTYPE)

    taps = tl.arange(0, KK_PAD)
    mask_t = taps < K * K
    ti = qy[None, :] + PADDING - (taps // K)[:, None] * DILATION
    tj = qx[None, :] + PADDING - (taps % K)[:, None] * DILATION
    oi = ti // STRIDE
    oj = tj // STRIDE
    # ti >= 0 is tested before its quotient is trusted (see the comment in the module's kernels).
    ok = mask_t[:, None] & mask_q[None, :] & (ti >= 0) & (tj >= 0) & (oi < HO) & (oj < WO)
    if STRIDE > 1:
        ok = ok & (ti % STRIDE == 0) & (tj % STRIDE == 0)
    # Lanes that are off read halo entry 0 and are multiplied by a masked (zero) grad_out.
    where = tl.where(ok, (oi - i0) * HALO_W + (oj - j0), 0)
    go_taps = go_ptr + b * sgb + oi * sgh + oj * sgw
    gx_pix = gx_ptr + b * sxb + qy * sxh + qx * sxw

    g_end = tl.minimum(gblk * GROUP_BLOCK + GROUP_BLOCK, GROUPS)
    for g in range(gblk * GROUP_BLOCK, g_end):
        rows = g * K * K + taps
        w2 = tl.load(w2_ptr + rows[:, None] * sw0 + chans[None, :] * sw1, mask=mask_t[:, None] & mask_r[None, :],
                     other=0.0).to(DOT_DTYPE)
        bias = tl.load(b2_ptr + rows * sbias, mask=mask_t, other=0.0).to(ACC_DTYPE)
        halo_kernel = tl.dot(w2, feats, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) + bias[:, None]
        kernel = tl.gather(halo_kernel, where, axis=1)  # [taps x tile]: kernel[t, p(q, t)]
        for c in range(C_PER_G):
            channel = tl.cast(g * C_PER_G + c, tl.int64)
            gv = tl.load(go_taps + channel * sgc, mask=ok, other=0.0).to(ACC_DTYPE)
            summed = tl.reduce(kernel * gv, 0, tl.standard._sum_combine)
            tl.store(gx_pix + channel * sxc, summed.to(gx_ptr.dtype.element_ty), mask=mask_q)


def _fused_grad_reduced_kernel(go_ptr, x_ptr, w2_ptr, gr_ptr, H, W, WO, N_PIX, GROUPS, C_PER_G, CR,
                               sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, sw0, sw1, srb, src, srh, srw,
                               K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
                               PADDING: tl.constexpr, KK_PAD: tl.constexpr, CR_PAD: tl.constexpr,
                               ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               BLOCK_P: tl.constexpr):
    # grad_reduced[k, p] = sum_{g, t} weight[g*K*K + t, k] * grad_kernel[g, t, p], where
    # grad_kernel[g, t, p] = sum_{c in g} grad_out[c, p] * x[c, tap t of p] is what the unfused
    # layer writes as the kernel map's gradient. A program owns BLOCK_P output pixels of one image
    # and walks every group, so the sum over groups stays in registers: [Cr x taps] @ [taps x pixels].
    pid = tl.program_id(0)
    n_pblk = (N_PIX + BLOCK_P - 1) // BLOCK_P
    pid_p = pid % n_pblk
    b = (pid // n_pblk).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N_PIX
    oi = offs_p // WO
    oj = offs_p % WO
    chans = tl.arange(0, CR_PAD)
    mask_r = chans < CR
    taps = tl.arange(0, KK_PAD)
    mask_t = taps < K * K
    iy = oi[None, :] * STRIDE + (taps // K)[:, None] * DILATION - PADDING
    ix = oj[None, :] * STRIDE + (taps % K)[:, None] * DILATION - PADDING
    x_ok = mask_t[:, None] & mask_p[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    x_taps = x_ptr + b * sxb + iy * sxh + ix * sxw
    go_pix = go_ptr + b * sgb + oi * sgh + oj * sgw

    acc = tl.full([CR_PAD, BLOCK_P], 0, ACC_DTYPE)
    for g in range(GROUPS):
        grad_kernel = tl.full([KK_PAD, BLOCK_P], 0, ACC_DTYPE)
        for c in range(C_PER_G):
            channel = tl.cast(g * C_PER_G + c, tl.int64)
            gv = tl.load(go_pix + channel * sgc, mask=mask_p, other=0.0).to(ACC_DTYPE)
            xv = tl.load(x_taps + channel * sxc, mask=x_ok, other=0.0).to(ACC_DTYPE)
            grad_kernel += xv * gv[None, :]
        rows = g * K * K + taps
        w2t = tl.load(w2_ptr + rows[None, :] * sw0 + chans[:, None] * sw1, mask=mask_r[:, None] & mask_t[None, :],
                      other=0.0).to(DOT_DTYPE)
        # The kernel map's gradient rounded to the input dtype, as the unfused layer stores it.
        acc = tl.dot(w2t, grad_kernel.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(gr_ptr + b * srb + chans[:, None] * src + (oi * srh + oj * srw)[None, :],
             acc.to(gr_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_p[None, :])


def _fused_grad_weight_kernel(go_ptr, x_ptr, r_ptr, gw_ptr, gb_ptr, B, H, W, WO, N_PIX, GROUPS, C_PER_G, CR,
                              IMAGES_PER_CHUNK, sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, srb, src, srh, srw,
                              K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
                              PADDING: tl.constexpr, KK_PAD: tl.constexpr, CR_PAD: tl.constexpr,
                              ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              BLOCK_P: tl.constexpr):
    # grad_weight[g*K*K + t, k] = sum_{b, p} grad_kernel[b, g, t, p] * reduced[b, k, p], and the
    # bias gradient the same sum without reduced. A program owns one group and a chunk of
    # IMAGES_PER_CHUNK images, walks their pixel blocks in order with a [taps x Cr] accumulator,
    # and writes its partial sums to row `chunk` of the partial buffers (contiguous
    # [chunks, GROUPS*K*K, Cr] and [chunks, GROUPS*K*K]). The chunking is in whole images, so the
    # buffer's shape does not depend on the tile the autotuner picks.
    pid = tl.program_id(0)
    g = pid % GROUPS
    chunk = pid // GROUPS
    n_pblk = (N_PIX + BLOCK_P - 1) // BLOCK_P
    chans = tl.arange(0, CR_PAD)
    mask_r = chans < CR
    taps = tl.arange(0, KK_PAD)
    mask_t = taps < K * K
    first_channel = tl.cast(g * C_PER_G, tl.int64)

    acc_w = tl.full([KK_PAD, CR_PAD], 0, ACC_DTYPE)
    acc_b = tl.full([KK_PAD], 0, ACC_DTYPE)
    b_end = tl.minimum(chunk * IMAGES_PER_CHUNK + IMAGES_PER_CHUNK, B)
    for image in range(chunk * IMAGES_PER_CHUNK, b_end):
        b = tl.cast(image, tl.int64)
        for pid_p in range(n_pblk):
            offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < N_PIX
            oi = offs_p // WO
            oj = offs_p % WO
            iy = oi[None, :] * STRIDE + (taps // K)[:, None] * DILATION - PADDING
            ix = oj[None, :] * STRIDE + (taps % K)[:, None] * DILATION - PADDING
            x_ok = mask_t[:, None] & mask_p[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            x_taps = x_ptr + b * sxb + iy * sxh + ix * sxw
            go_pix = go_ptr + b * sgb + oi * sgh + oj * sgw
            grad_kernel = tl.full([KK_PAD, BLOCK_P], 0, ACC_DTYPE)
            for c in range(C_PER_G):
                channel = first_channel + c
                gv = tl.load(go_pix + channel * sgc, mask=mask_p, other=0.0).to(ACC_DTYPE)
                xv = tl.load(x_taps + channel * sxc, mask=x_ok, other=0.0).to(ACC_DTYPE)
                grad_kernel += xv * gv[None, :]
            feats_t = tl.load(r_ptr + b * srb + chans[None, :] * src + (oi * srh + oj * srw)[:, None],
                              mask=mask_p[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            acc_w = tl.dot(grad_kernel.to(DOT_DTYPE), feats_t, acc_w, input_precision=DOT_PRECISION,
                           out_dtype=ACC_DTYPE)
            acc_b += tl.reduce(grad_kernel, 1, tl.standard._sum_combine)
    rows = tl.cast(chunk, tl.int64) * GROUPS * K * K + g * K * K + taps
    tl.store(gw_ptr + rows[:, None] * CR + chans[None, :], acc_w, mask=mask_t[:, None] & mask_r[None, :])
    tl.store(gb_ptr + rows, acc_b, mask=mask_t)


def _configs(tiles, names) -> list:
    return [triton.Config(dict(zip(names, tile[:-1])), num_warps=tile[-1]) for tile in tiles]


def _prune(configs, named_args, **kwargs):
    """Drops tiles far larger than the problem, and those over the register budget (docs/benchmarks.md)."""
    pixels = _pad(named_args["N_PIX"]) if "N_PIX" in named_args else 1 << 30
    groups = triton.next_power_of_2(named_args["GROUPS"])
    kk_pad, cr_pad = kwargs["KK_PAD"], kwargs["CR_PAD"]
    kept = []
    for cfg in configs:
        # The columns of the [taps or Cr x columns] tiles: the pixel block, or grad-x's halo.
        cols = cfg.kwargs.get("BLOCK_P", kwargs.get("HALO_PAD"))
        largest = max(max(kk_pad, cr_pad) * cols, kk_pad * cr_pad)
        # About 64 fp32 values per thread for the largest tile.
        if (cols <= pixels and cfg.kwargs.get("GROUP_BLOCK", 1) <= groups
                and largest <= 64 * 32 * cfg.num_warps):
            kept.append(cfg)
    return kept or configs[-1:]


def _build(fn, tiles, names):
    """(compiled and autotuned kernel, interpreted kernel) from one kernel source."""
    # The autotuner keys on the problem's size and geometry and a channel stride (NCHW or
    # channels_last); it adds the dtypes itself.
    key = ["H", "W", "C_PER_G", "GROUPS", "CR", "K", "STRIDE", "DILATION", "sxc"]
    compiled = triton.autotune(configs=_configs(tiles, names), key=key,
                               prune_configs_by={"early_config_prune": _prune})(triton.jit(fn))
    interpreted = InterpretedFunction(fn) if InterpretedFunction is not None else None
    return compiled, interpreted


if triton is not None:
    # (BLOCK_P or nothing, GROUP_BLOCK or nothing, num_warps). Few tiles: every RedNet layer shape
    # is tuned afresh, and each tile costs a compile (about a second) the first time.
    _KERNELS = {
        "forward": _build(_fused_forward_kernel, [(32, 1, 4), (64, 1, 4), (64, 2, 4), (128, 1, 8), (64, 4, 8)],
                          ["BLOCK_P", "GROUP_BLOCK"]),
        "grad_x": _build(_fused_grad_x_kernel, [(1, 4), (1, 8), (2, 8)], ["GROUP_BLOCK"]),
        "grad_reduced": _build(_fused_grad_reduced_kernel, [(16, 4), (32, 4), (64, 4), (64, 8)], ["BLOCK_P"]),
        "grad_weight": _build(_fused_grad_weight_kernel, [(32, 4), (64, 4), (64, 8), (128, 8)], ["BLOCK_P"]),
    }


def _launch(name: str, tensor: torch.Tensor, n_programs, *args, **constexprs) -> None:
    launch_kernel(_KERNELS, _INTERPRET_META, name, tensor, n_programs, *args, **constexprs)


def _dtypes(dtype: torch.dtype, device: torch.device) -> dict:
    """Accumulation in float32 (float64 for float64); tl.dot operands in the input dtype.

    Float32 products are exact ("ieee"), not TF32: the fused layer must match the unfused one.
    The interpreter multiplies bfloat16 dot operands as raw 16-bit integers (Triton 3.8), so there
    they are widened to float32 first: bfloat16 products are exact in float32, so the interpreter's
    results are what the GPU's tensor cores compute, up to the order of the sums.
    """
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                torch.float64: tl.float64}[dtype]
    if dtype == torch.bfloat16 and _interpreting(device):
        tl_dtype = tl.float32
    return dict(ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32, DOT_DTYPE=tl_dtype,
                DOT_PRECISION="ieee")


def _constants(x, reduced, kernel_size: int, stride: int, dilation: int) -> dict:
    return dict(K=kernel_size, STRIDE=stride, DILATION=dilation, PADDING=dilation * (kernel_size - 1) // 2,
                KK_PAD=_pad(kernel_size * kernel_size), CR_PAD=_pad(reduced.shape[1]),
                **_dtypes(x.dtype, x.device))


def fused_forward(x, reduced, weight, bias, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    cr, ho, wo = reduced.shape[1:]
    groups = weight.shape[0] // (kernel_size * kernel_size)
    out = new_output(x, (b, c, ho, wo))
    n_pix = ho * wo
    _launch("forward", x,
            lambda m: b * triton.cdiv(n_pix, m["BLOCK_P"]) * triton.cdiv(groups, m["GROUP_BLOCK"]),
            x, reduced, weight, bias, out, h, w, wo, n_pix, groups, c // groups, cr,
            *x.stride(), *reduced.stride(), weight.stride(0), weight.stride(1), bias.stride(0), *out.stride(),
            **_constants(x, reduced, kernel_size, stride, dilation))
    return out


def fused_grad_x(grad_out, x, reduced, weight, bias, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    cr, ho, wo = reduced.shape[1:]
    groups = weight.shape[0] // (kernel_size * kernel_size)
    grad_x = new_output(x, x.shape)
    tile_h, tile_w = _INTERPRET_TILE if _interpreting(x.device) else _GPU_TILE
    halo_h = _halo(tile_h, ho, kernel_size, stride, dilation)
    halo_w = _halo(tile_w, wo, kernel_size, stride, dilation)
    n_tiles = b * triton.cdiv(h, tile_h) * triton.cdiv(w, tile_w)
    _launch("grad_x", x, lambda m: n_tiles * triton.cdiv(groups, m["GROUP_BLOCK"]),
            grad_out, reduced, weight, bias, grad_x, h, w, ho, wo, groups, c // groups, cr,
            *grad_out.stride(), *reduced.stride(), weight.stride(0), weight.stride(1), bias.stride(0),
            *grad_x.stride(), TILE_H=tile_h, TILE_W=tile_w, HALO_H=halo_h, HALO_W=halo_w,
            HALO_PAD=_pad(halo_h * halo_w), **_constants(x, reduced, kernel_size, stride, dilation))
    return grad_x


def fused_grad_reduced(grad_out, x, reduced, weight, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    cr, ho, wo = reduced.shape[1:]
    groups = weight.shape[0] // (kernel_size * kernel_size)
    grad_r = new_output(reduced, reduced.shape)
    n_pix = ho * wo
    _launch("grad_reduced", x, lambda m: b * triton.cdiv(n_pix, m["BLOCK_P"]),
            grad_out, x, weight, grad_r, h, w, wo, n_pix, groups, c // groups, cr,
            *grad_out.stride(), *x.stride(), weight.stride(0), weight.stride(1), *grad_r.stride(),
            **_constants(x, reduced, kernel_size, stride, dilation))
    return grad_r


def weight_grad_chunks(batch: int, groups: int, device: torch.device) -> int:
    """How many chunks of images the weight gradient is split into (one partial sum each)."""
    if _interpreting(device):
        return batch  # one image per chunk: the tests then sum several partials
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, round(_WEIGHT_GRAD_PROGRAMS_PER_SM * sms / groups)))


def fused_grad_weight(grad_out, x, reduced, weight, bias, kernel_size: int, stride: int, dilation: int):
    b, c, h, w = x.shape
    cr, ho, wo = reduced.shape[1:]
    kk = kernel_size * kernel_size
    groups = weight.shape[0] // kk
    images_per_chunk = triton.cdiv(b, weight_grad_chunks(b, groups, x.device))
    chunks = triton.cdiv(b, images_per_chunk)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial_w = torch.empty((chunks, groups * kk, cr), dtype=acc_dtype, device=x.device)
    partial_b = torch.empty((chunks, groups * kk), dtype=acc_dtype, device=x.device)
    _launch("grad_weight", x, lambda m: groups * chunks,
            grad_out, x, reduced, partial_w, partial_b, b, h, w, wo, ho * wo, groups, c // groups, cr,
            images_per_chunk, *grad_out.stride(), *x.stride(), *reduced.stride(),
            **_constants(x, reduced, kernel_size, stride, dilation))
    # torch.sum reduces in an order fixed by the shape alone, so the result is deterministic.
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    grad_w.copy_(partial_w.sum(0).view(weight.shape))
    grad_b.copy_(partial_b.sum(0))
    return grad_w, grad_b


# The PyTorch custom operators, for the reasons given in rednet/ops/involution.py: torch.compile
# sees each fused involution as one node and captures the whole model in one graph.
@torch.library.custom_op("rednet::involution_fused", mutates_args=())
def _fused_op(x: torch.Tensor, reduced: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel_size: int,
              stride: int, dilation: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return new_output(x, (0, x.shape[1], *reduced.shape[-2:]))
    with torch.autocast(x.device.type, enabled=False):
        return fused_forward(x, reduced, weight, bias, kernel_size, stride, dilation)


@_fused_op.register_fake
def _(x, reduced, weight, bias, kernel_size, stride, dilation):
    return new_output(x, (x.shape[0], x.shape[1], *reduced.shape[-2:]))


@torch.library.custom_op("rednet::involution_fused_backward", mutates_args=())
def _fused_backward_op(grad_out: torch.Tensor, x: torch.Tensor, reduced: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, kernel_size: int, stride: int, dilation: int, need_x: bool,
                       need_reduced: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    geometry = (kernel_size, stride, dilation)
    grad_x = grad_r = grad_w = grad_b = None
    if x.shape[0] == 0:  # nothing flows back; the weights' gradients are zero, not undefined
        grad_x, grad_r = new_output(x, x.shape), new_output(reduced, reduced.shape)
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
    else:
        with torch.autocast(x.device.type, enabled=False):
            if need_x:
                grad_x = fused_grad_x(grad_out, x, reduced, weight, bias, *geometry)
            if need_reduced:
                grad_r = fused_grad_reduced(grad_out, x, reduced, weight, *geometry)
            if need_weight:
                grad_w, grad_b = fused_grad_weight(grad_out, x, reduced, weight, bias, *geometry)
    # A custom operator returns tensors, never None, and no two outputs may be the same tensor:
    # an unneeded gradient is a fresh empty one.
    return (grad_x if need_x else x.new_empty(0), grad_r if need_reduced else x.new_empty(0),
            grad_w if need_weight else x.new_empty(0), grad_b if need_weight else x.new_empty(0))


@_fused_backward_op.register_fake
def _(grad_out, x, reduced, weight, bias, kernel_size, stride, dilation, need_x, need_reduced, need_weight):
    return (new_output(x, x.shape) if need_x else x.new_empty(0),
            new_output(reduced, reduced.shape) if need_reduced else x.new_empty(0),
            torch.empty_like(weight) if need_weight else x.new_empty(0),
            torch.empty_like(bias) if need_weight else x.new_empty(0))


def _save_for_backward(ctx, inputs, output):
    x, reduced, weight, bias, *geometry = inputs
    ctx.save_for_backward(x, reduced, weight, bias)  # the inputs, never the kernel map
    ctx.geometry = tuple(geometry)


def _backward(ctx, grad_out):
    x, reduced, weight, bias = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    grads = _fused_backward_op(grad_out.to(x.dtype), x, reduced, weight, bias, *ctx.geometry, need_x, need_r,
                               need_w or need_b)
    wanted = (need_x, need_r, need_w, need_b)
    return (*(g if want else None for g, want in zip(grads, wanted)), None, None, None)


_fused_op.register_autograd(_backward, setup_context=_save_for_backward)


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused operator runs on ``device`` (else :func:`fused_involution` runs unfused)."""
    return triton is not None and "triton" in available_impls(device)


def _check(x, reduced, weight, bias, kernel_size, stride, dilation) -> None:
    if reduced.dim() != 4 or reduced.shape[1] == 0:
        raise ValueError(f"reduced must be (B, Cr, Ho, Wo) with Cr >= 1, got shape {tuple(reduced.shape)}")
    kk = kernel_size * kernel_size if isinstance(kernel_size, int) and kernel_size > 0 else 0
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (reduced.shape[1], 1, 1) or not kk or weight.shape[0] % kk:
        raise ValueError(f"weight must be a 1x1 convolution's (G*K*K, Cr, 1, 1) with Cr = {reduced.shape[1]} "
                         f"(reduced's channels) and K = kernel_size = {kernel_size!r}; got shape {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), one value per output channel of weight; "
                         f"got shape {tuple(bias.shape)}")
    # The kernel map conv2d(reduced, weight, bias) would have; check_args validates the rest
    # against it (it calls the map "weight").
    kernel_map = reduced[:, :1].unsqueeze(1).expand(reduced.shape[0], weight.shape[0] // kk, kk,
                                                    *reduced.shape[2:])
    check_args(x, kernel_map, kernel_size, stride, dilation)
    if {weight.device, bias.device} != {x.device}:
        raise ValueError(f"x is on {x.device} but weight and bias are on {weight.device} and {bias.device}")


def fused_involution(x: torch.Tensor, reduced: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     kernel_size: int, stride: int = 1, dilation: int = 1, impl: str = "auto") -> torch.Tensor:
    """Involution of ``x`` (B, C, H, W) with the kernels a 1x1 convolution generates from ``reduced``.

    Equal to ``involution(x, conv2d(reduced, weight, bias).view(B, G, K*K, Ho, Wo), ...)`` with
    ``reduced`` (B, Cr, Ho, Wo), ``weight`` (G*K*K, Cr, 1, 1) and ``bias`` (G*K*K,), but where
    :func:`fused_available` it never stores the kernel map, forward or backward. Elsewhere it runs
    exactly that unfused expression, with the involution ``impl`` given. Under ``torch.autocast``
    all four inputs are cast to the autocast dtype, as the convolution would cast them; float16 and
    bfloat16 are accumulated in float32.
    """
    _check(x, reduced, weight, bias, kernel_size, stride, dilation)
    if not fused_available(x.device):
        kernel_map = F.conv2d(reduced, weight, bias)
        b, _, ho, wo = kernel_map.shape
        kernel_map = kernel_map.view(b, -1, kernel_size * kernel_size, ho, wo)
        return involution(x, kernel_map, kernel_size, stride, dilation, impl=impl)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, reduced, weight, bias = (t.to(dtype) for t in (x, reduced, weight, bias))
    elif len({x.dtype, reduced.dtype, weight.dtype, bias.dtype}) > 1:
        raise ValueError(f"x, reduced, weight and bias must have one dtype, got {x.dtype}, {reduced.dtype}, "
                         f"{weight.dtype} and {bias.dtype}; cast them, or run under torch.autocast")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the fused involution supports {_SUPPORTED_DTYPES}, got {x.dtype}")
    return _fused_op(x, reduced, weight, bias, kernel_size, stride, dilation)
