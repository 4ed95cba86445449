"""Fused Triton kernels for the involution operator (forward, grad x, grad weight).

Registers ``"triton"`` with the dispatcher in :mod:`rednet.ops.involution`. None of the kernels
materialises the (B, C, K*K, Ho, Wo) unfolded tensor: every product is formed in registers and
summed there. Float16 and bfloat16 are accumulated in float32, float64 in float64, and results are
written back in the input dtype. Nothing uses atomics, so every result is deterministic.

On CUDA the kernels are compiled and autotuned. On the CPU they run in Triton's interpreter, but
only when ``TRITON_INTERPRET=1``: that is a correctness tool for tests, far too slow for training.
Both variants are built here from the same Python source, and the one to launch is chosen from the
tensor's device at call time, so it does not matter whether ``TRITON_INTERPRET`` was set before or
after this module was imported (``triton.jit`` alone decides at decoration time, which would make
the tests depend on which test module happened to import ``rednet`` first).

Performance notes (H100, see README "Speed" and ``scripts/bench_gpu.sh``). At (64, 64, 56, 56),
K = 7, 4 groups, fp32 the forward moves about 260 MB (x, the 196-channel weight, out): 0.09 ms at
3 TB/s; it takes 0.6 ms, so the kernels are far from the memory floor and not yet profiled.
Forward+backward is 1.6 ms against 14.2 for ``unfold`` and 6.0 for ``unfold`` through
torch.compile. Tried and not kept: channel blocks fastest in the grid, so that the programs
sharing a weight tile run together (predicted fewer DRAM reads of the weight; measured the same,
1.8 ms fwd+bwd in bf16). The autotuner picked BLOCK_C = 4 and BLOCK_P = 32 or 64 (4 warps) for
both channel kernels at every RedNet shape, and BLOCK_P 32 to 128 for the weight gradient.
"""

from __future__ import annotations

import os

import torch

from rednet.ops.involution import new_output, new_weight_grad, register_impl

try:
    import triton
    import triton.language as tl
except ImportError:  # No triton, no registration: the other implementations still work.
    triton = None

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Only the CPU interpreter path is lost; the CUDA kernels do not need it.
    InterpretedFunction = None

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Used instead of autotuning in the interpreter, where benchmarking means nothing. The interpreter
# pays per operation, not per element, so blocks are big enough to keep test shapes to a few
# programs yet small enough that a 13x11 image or 12 channels per group spans several blocks.
_INTERPRET_META = {
    "forward": dict(BLOCK_C=8, BLOCK_P=64),
    "grad_x": dict(BLOCK_C=8, BLOCK_P=64),
    "grad_weight": dict(BLOCK_P=64),
}


def _tile_configs(with_channels: bool) -> list:
    # At most 8 accumulator elements per thread: compiled for sm_90 with K = 7, tiles with 16 per
    # thread needed about 250 registers per thread, which leaves too few warps resident.
    if with_channels:  # (BLOCK_P, BLOCK_C, num_warps)
        tiles = [(32, 4, 4), (64, 4, 4), (64, 8, 4), (64, 16, 4), (128, 4, 4), (128, 8, 4),
                 (128, 16, 8), (256, 4, 4), (256, 8, 8)]
        return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in tiles]
    # The grad-weight tile is KK_PAD x BLOCK_P, so its size also grows with K.
    tiles = [(32, 4), (64, 4), (128, 4), (128, 8), (256, 8)]
    return [triton.Config({"BLOCK_P": p}, num_warps=w) for p, w in tiles]


def _prune_configs(configs, named_args, **kwargs):
    """Drops tiles far larger than the problem: they cost tuning time and can never win."""
    c_per_g = triton.next_power_of_2(named_args["C_PER_G"])
    pixels = triton.next_power_of_2(named_args["H"] * named_args["W"])
    kept = [cfg for cfg in configs
            if cfg.kwargs.get("BLOCK_C", 1) <= max(4, c_per_g) and cfg.kwargs["BLOCK_P"] <= max(32, pixels)]
    return kept or configs[:1]


# The kernels below are plain functions; ``_build`` turns each into a compiled, autotuned kernel
# and an interpreted one. Every tensor is addressed through its strides, so NCHW, channels_last,
# sliced inputs and expanded gradients are all read in place: a channels_last model pays no layout
# copies around its involutions. Where a tensor's pixels are dense in row-major order (NCHW, and
# the weight of an NCHW model) a *_FLAT flag addresses them by the flat pixel index, which Triton
# can prove contiguous and so load and store in wide vectors; (i * stride_h + j * stride_w) is the
# same address in a form it cannot. The weight is viewed
# as (B, G, K*K, Ho, Wo). The grid is one-dimensional because B*G*blocks can exceed the 65535
# limit of CUDA's second and third grid axes; pixel blocks vary fastest so that programs running
# together share one weight slice in L2. Batch and channel offsets are formed in int64 because
# B*C*H*W overflows int32 for large activations. The kernels call only Triton builtins, never
# @triton.jit helpers such as tl.cdiv or tl.zeros: those were compiled or interpreted once, when
# triton was imported, and a compiled helper cannot be called from an interpreted kernel.


def _forward_kernel(x_ptr, w_ptr, out_ptr, H, W, WO, N_PIX, GROUPS, C_PER_G,
                    sxb, sxc, sxh, sxw, swb, swg, swt, swh, sww, sob, soc, soh, sow,
                    K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, PADDING: tl.constexpr,
                    W_FLAT: tl.constexpr, OUT_FLAT: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # A program owns BLOCK_C channels of one group and BLOCK_P output pixels, so each weight value
    # it loads is reused by BLOCK_C channels.
    pid = tl.program_id(0)
    n_pblk = (N_PIX + BLOCK_P - 1) // BLOCK_P
    n_cblk = (C_PER_G + BLOCK_C - 1) // BLOCK_C
    pid_p = pid % n_pblk
    pid_c = (pid // n_pblk) % n_cblk
    bg = pid // (n_pblk * n_cblk)
    b = (bg // GROUPS).to(tl.int64)
    g = bg % GROUPS

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N_PIX
    oi = offs_p // WO
    oj = offs_p % WO
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_PER_G
    channels = (g * C_PER_G + offs_c).to(tl.int64)
    x_planes = x_ptr + b * sxb + channels[:, None] * sxc
    if W_FLAT:
        w_pixels = w_ptr + b * swb + g.to(tl.int64) * swg + offs_p
    else:
        w_pixels = w_ptr + b * swb + g.to(tl.int64) * swg + oi * swh + oj * sww

    acc = tl.full([BLOCK_C, BLOCK_P], 0, ACC_DTYPE)
    # Kernel rows are a runtime loop and only the columns are unrolled: unrolling all K*K taps lets
    # the compiler hoist every load at once and spill registers for K = 7.
    for u in range(K):
        iy = oi * STRIDE + u * DILATION - PADDING
        row_ok = mask_p & (iy >= 0) & (iy < H)
        for v in tl.static_range(K):
            ix = oj * STRIDE + v * DILATION - PADDING
            # Masked taps read nothing: that is the zero padding.
            ok = row_ok & (ix >= 0) & (ix < W)
            wv = tl.load(w_pixels + (u * K + v) * swt, mask=mask_p, other=0.0).to(ACC_DTYPE)
            xv = tl.load(x_planes + (iy * sxh + ix * sxw)[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
            acc += xv.to(ACC_DTYPE) * wv[None, :]
    if OUT_FLAT:
        out_pix = offs_p
    else:
        out_pix = oi * soh + oj * sow
    out_ptrs = out_ptr + b * sob + channels[:, None] * soc + out_pix[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def _grad_x_kernel(go_ptr, w_ptr, gx_ptr, H, W, HO, WO, GROUPS, C_PER_G,
                   sgb, sgc, sgh, sgw, swb, swg, swt, swh, sww, sxb, sxc, sxh, sxw,
                   K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, PADDING: tl.constexpr,
                   GX_FLAT: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Gather, not scatter: a program owns BLOCK_C channels and BLOCK_P *input* pixels and, for each
    # tap (u, v), reads the one output pixel (i, j) whose window put x[y, x] under that tap, i.e.
    # i * STRIDE = y + PADDING - u * DILATION. Every input pixel is written exactly once, so no
    # atomics and no zero-initialised output are needed. With STRIDE > 1 only the taps where that
    # division is exact contribute (about 1 in STRIDE**2); the rest are masked loads, a cost
    # accepted to keep one simple kernel for every stride and dilation. (sxb...sxw are grad_x's.)
    pid = tl.program_id(0)
    n_qblk = (H * W + BLOCK_P - 1) // BLOCK_P
    n_cblk = (C_PER_G + BLOCK_C - 1) // BLOCK_C
    pid_q = pid % n_qblk
    pid_c = (pid // n_qblk) % n_cblk
    bg = pid // (n_qblk * n_cblk)
    b = (bg // GROUPS).to(tl.int64)
    g = bg % GROUPS

    offs_q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_q = offs_q < H * W
    y = offs_q // W
    x = offs_q % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_PER_G
    channels = (g * C_PER_G + offs_c).to(tl.int64)
    go_planes = go_ptr + b * sgb + channels[:, None] * sgc
    w_taps = w_ptr + b * swb + g.to(tl.int64) * swg

    acc = tl.full([BLOCK_C, BLOCK_P], 0, ACC_DTYPE)
    for u in range(K):  # a runtime loop for the same register reason as in the forward kernel
        ti = y + PADDING - u * DILATION
        i = ti // STRIDE
        # ti >= 0 is tested before its quotient is trusted: negative division rounds differently
        # on the GPU (toward zero) and in the interpreter (toward -inf), but those lanes are off.
        row_ok = mask_q & (ti >= 0) & (i < HO)
        if STRIDE > 1:
            row_ok = row_ok & (ti % STRIDE == 0)
        for v in tl.static_range(K):
            tj = x + PADDING - v * DILATION
            j = tj // STRIDE
            ok = row_ok & (tj >= 0) & (j < WO)
            if STRIDE > 1:
                ok = ok & (tj % STRIDE == 0)
            wv = tl.load(w_taps + (u * K + v) * swt + i * swh + j * sww, mask=ok, other=0.0).to(ACC_DTYPE)
            gv = tl.load(go_planes + (i * sgh + j * sgw)[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
            acc += gv.to(ACC_DTYPE) * wv[None, :]
    if GX_FLAT:
        gx_pix = offs_q
    else:
        gx_pix = y * sxh + x * sxw
    gx_ptrs = gx_ptr + b * sxb + channels[:, None] * sxc + gx_pix[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_q[None, :])


def _grad_weight_kernel(go_ptr, x_ptr, gw_ptr, H, W, WO, N_PIX, GROUPS, C_PER_G,
                        sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, swb, swg, swt, swh, sww,
                        K: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, PADDING: tl.constexpr,
                        GO_FLAT: tl.constexpr, GW_FLAT: tl.constexpr,
                        KK_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    # A program owns all K*K taps of BLOCK_P output pixels of one (batch, group) and walks the
    # C/G channels of the group itself, so the channel reduction is a register sum: no atomics and
    # no partial-sum buffer. The tap axis is padded to a power of two as tl.arange requires
    # (49 -> 64 for K = 7); the padding lanes are masked and never touch memory.
    pid = tl.program_id(0)
    n_pblk = (N_PIX + BLOCK_P - 1) // BLOCK_P
    pid_p = pid % n_pblk
    bg = pid // n_pblk
    b = (bg // GROUPS).to(tl.int64)
    g = bg % GROUPS

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N_PIX
    oi = offs_p // WO
    oj = offs_p % WO
    taps = tl.arange(0, KK_PAD)
    mask_t = taps < K * K
    iy = oi[None, :] * STRIDE + (taps // K)[:, None] * DILATION - PADDING
    ix = oj[None, :] * STRIDE + (taps % K)[:, None] * DILATION - PADDING
    x_ok = mask_t[:, None] & mask_p[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    x_offs = iy * sxh + ix * sxw
    if GO_FLAT:
        go_offs = offs_p
    else:
        go_offs = oi * sgh + oj * sgw

    acc = tl.full([KK_PAD, BLOCK_P], 0, ACC_DTYPE)
    first_channel = (g * C_PER_G).to(tl.int64)
    for c in range(C_PER_G):
        channel = first_channel + c
        gv = tl.load(go_ptr + b * sgb + channel * sgc + go_offs, mask=mask_p, other=0.0).to(ACC_DTYPE)
        xv = tl.load(x_ptr + b * sxb + channel * sxc + x_offs, mask=x_ok, other=0.0).to(ACC_DTYPE)
        acc += xv * gv[None, :]
    if GW_FLAT:
        gw_pix = offs_p
    else:
        gw_pix = oi * swh + oj * sww
    gw_ptrs = gw_ptr + b * swb + g.to(tl.int64) * swg + taps[:, None] * swt + gw_pix[None, :]
    tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])


def _build(fn, with_channels: bool, layout_key: str):
    """Returns (compiled and autotuned kernel, interpreted kernel or None) for one kernel source."""
    # The key lists what changes the best tile: the problem's size and geometry, and a channel
    # stride, which tells NCHW (H*W) from channels_last (1). The autotuner adds the dtypes.
    key = ["H", "W", "C_PER_G", "K", "STRIDE", "DILATION", layout_key]
    compiled = triton.autotune(configs=_tile_configs(with_channels), key=key,
                               prune_configs_by={"early_config_prune": _prune_configs})(triton.jit(fn))
    interpreted = InterpretedFunction(fn) if InterpretedFunction is not None else None
    return compiled, interpreted


if triton is not None:
    _KERNELS = {
        "forward": _build(_forward_kernel, with_channels=True, layout_key="sxc"),
        "grad_x": _build(_grad_x_kernel, with_channels=True, layout_key="sgc"),
        "grad_weight": _build(_grad_weight_kernel, with_channels=False, layout_key="sxc"),
    }


def _interpreting(device: torch.device) -> bool:
    # TRITON_INTERPRET=1 asks for the interpreter on every device. Honouring it on CUDA also keeps
    # the autotuner from timing interpreter runs when triton.jit itself built interpreted kernels.
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def launch_kernel(kernels: dict, interpret_meta: dict, name: str, tensor: torch.Tensor, n_programs, *args,
                  **constexprs) -> None:
    """Launches ``kernels[name]``, autotuned on a GPU or with ``interpret_meta[name]``'s tile in
    the interpreter; ``n_programs(meta)`` gives the 1-D grid for a tile choice."""
    compiled, interpreted = kernels[name]
    if _interpreting(tensor.device):
        meta = interpret_meta[name]
        interpreted[(n_programs(meta),)](*args, **constexprs, **meta)
    else:
        compiled[lambda meta: (n_programs(meta),)](*args, **constexprs)


def _launch(name: str, tensor: torch.Tensor, n_programs, *args, **constexprs) -> None:
    launch_kernel(_KERNELS, _INTERPRET_META, name, tensor, n_programs, *args, **constexprs)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(kernel_size: int, dilation: int) -> dict:
    return dict(K=kernel_size, DILATION=dilation, PADDING=dilation * (kernel_size - 1) // 2)


def _flat(t: torch.Tensor) -> bool:
    """Whether the last two (pixel) dimensions are dense in row-major order."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def _forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    groups, _, ho, wo = weight.shape[1:]
    out = new_output(x, (b, c, ho, wo))
    if out.numel() == 0:
        return out
    c_per_g, n_pix = c // groups, ho * wo
    _launch("forward", x,
            lambda m: b * groups * triton.cdiv(c_per_g, m["BLOCK_C"]) * triton.cdiv(n_pix, m["BLOCK_P"]),
            x, weight, out, h, w, wo, n_pix, groups, c_per_g, *x.stride(), *weight.stride(), *out.stride(),
            W_FLAT=_flat(weight), OUT_FLAT=_flat(out), STRIDE=stride, ACC_DTYPE=_acc_dtype(x.dtype),
            **_geometry(kernel_size, dilation))
    return out


def _grad_x(grad_out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, kernel_size: int, stride: int,
            dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    groups, _, ho, wo = weight.shape[1:]
    grad_x = new_output(x, x.shape)
    if grad_x.numel() == 0:
        return grad_x
    c_per_g = c // groups
    _launch("grad_x", grad_out,
            lambda m: b * groups * triton.cdiv(c_per_g, m["BLOCK_C"]) * triton.cdiv(h * w, m["BLOCK_P"]),
            grad_out, weight, grad_x, h, w, ho, wo, groups, c_per_g,
            *grad_out.stride(), *weight.stride(), *grad_x.stride(), GX_FLAT=_flat(grad_x),
            STRIDE=stride, ACC_DTYPE=_acc_dtype(grad_out.dtype), **_geometry(kernel_size, dilation))
    return grad_x


def _grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                 dilation: int) -> torch.Tensor:
    b, c, h, w = x.shape
    groups, _, ho, wo = weight.shape[1:]
    grad_w = new_weight_grad(weight)
    if grad_w.numel() == 0:
        return grad_w
    n_pix = ho * wo
    _launch("grad_weight", x,
            lambda m: b * groups * triton.cdiv(n_pix, m["BLOCK_P"]),
            grad_out, x, grad_w, h, w, wo, n_pix, groups, c // groups,
            *grad_out.stride(), *x.stride(), *grad_w.stride(), GO_FLAT=_flat(grad_out), GW_FLAT=_flat(grad_w),
            STRIDE=stride, KK_PAD=triton.next_power_of_2(kernel_size * kernel_size),
            ACC_DTYPE=_acc_dtype(x.dtype), **_geometry(kernel_size, dilation))
    return grad_w


# No ``.contiguous()`` anywhere: the kernels take strides, so channels_last activations, slices
# and the expanded (stride-0) gradients autograd often passes are read in place.
def triton_forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    """Fused Triton involution; see :func:`rednet.ops.involution.involution` for the contract."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the triton involution supports {_SUPPORTED_DTYPES}, got {x.dtype}")
    return _forward(x, weight, kernel_size, stride, dilation)


def triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                    dilation: int, need_x: bool, need_w: bool):
    geometry = (kernel_size, stride, dilation)
    grad_x = _grad_x(grad_out, weight, x, *geometry) if need_x else None
    grad_w = _grad_weight(grad_out, x, weight, *geometry) if need_w else None
    return grad_x, grad_w


def _runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # The interpreter is opt-in, so that impl="auto" never picks it for real CPU work.
    return (device.type == "cpu" and InterpretedFunction is not None
            and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    register_impl("triton", triton_forward, triton_backward, _runs_on, rank=10)
