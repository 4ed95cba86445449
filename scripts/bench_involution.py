"""Benchmark every involution implementation: time, extra memory and error against the reference.

For each implementation x shape x dtype it reports

* forward and forward+backward wall time in ms, the median of ``--repeats`` runs after warm-up
  (inputs require grad, as in training; the backward computes both gradients);
* the extra peak memory of one forward call: the most memory allocated at any moment during the
  call, minus the output it returns, in MiB and as a multiple of the output's size. It counts
  every temporary and whatever the implementation keeps for its backward.

  - On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    the memory allocated before the call.
  - On the CPU there is no allocator peak counter, so the call runs under
    ``torch.profiler.profile(profile_memory=True)``: the profiler records every allocation and
    free of PyTorch's CPU allocator with a timestamp (including the temporaries inside an op and
    in the backward graph's saved tensors). Replaying those events in time order gives the live
    bytes at every moment; their maximum is the peak. The measured call comes after the timing
    runs, so memory an implementation caches across calls (shift's small tap mask) is not counted.
* the speed-up of forward+backward against ``unfold`` (the reference, the official naive code's
  math), and the largest absolute difference of the forward output from the reference computed
  in float32 on the same (rounded) inputs.

``unfold+compile`` is the reference run through ``torch.compile`` (Inductor, static shapes, compiled
afresh for every shape and dtype before it is timed): what a user gets by compiling the naive code
instead of using a hand-written kernel.

``unfold`` materialises (B, C, K*K, Ho, Wo): when that would not fit in the memory available, its
row says so instead of running, and the others show no speed-up or error.

Example: ``python scripts/bench_involution.py`` (CPU, the three RedNet stage shapes, K=7,
16 channels per group) or ``python scripts/bench_involution.py --device cuda``. ``--channels-last``
gives the inputs the layout of a channels_last model's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rednet.benchmark import device_name, median_ms, peak_bytes  # noqa: E402
from rednet.ops import available_impls, involution, involution_unfold, output_size  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, C, H=W) of the RedNet stages at the benchmark's batch sizes.
DEFAULT_SHAPES = "32x64x32,8x64x56,16x256x14"
COMPILED = "unfold+compile"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        dims = [int(v) for v in item.lower().split("x")]
        if len(dims) == 3:
            dims.append(dims[2])
        if len(dims) != 4:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxCxH or BxCxHxW")
        shapes.append(tuple(dims))
    return shapes


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def extra_peak_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` beyond the tensor it returns (see the module docstring)."""
    peak, result = peak_bytes(fn, device)
    return peak - result.numel() * result.element_size()


def unfold_bytes(b, c, ho, wo, kk, element_size) -> int:
    # Its unfolded columns and the product with the weight, each (B, C, K*K, Ho, Wo), in float32
    # for half inputs; the backward needs as much again.
    return 2 * b * c * kk * ho * wo * max(element_size, 4)


def bench(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for b, c, h, w in args.shapes:
            k, s = args.kernel_size, args.stride
            groups = c // args.channels_per_group
            ho, wo = output_size(h, k, s, 1), output_size(w, k, s, 1)
            gen = torch.Generator().manual_seed(0)

            def random(*shape):
                return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

            x, weight, grad_out = random(b, c, h, w), random(b, groups * k * k, ho, wo), random(b, c, ho, wo)
            if args.channels_last:
                # As in a channels_last model: the weight is a view of the kernel generator's
                # channels_last conv output.
                x, weight, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight, grad_out))
            x = x.requires_grad_()
            weight = weight.view(b, groups, k * k, ho, wo).requires_grad_()
            out_bytes = b * c * ho * wo * x.element_size()
            fits = unfold_bytes(b, c, ho, wo, k * k, x.element_size()) < 0.7 * available_bytes(device)
            reference = None
            if fits:
                with torch.no_grad():
                    reference = involution(x.float(), weight.float(), k, s, impl="unfold")
            base = {"impl": None, "shape": f"{b}x{c}x{h}x{w}", "dtype": dtype_name}
            results = []
            for impl in args.impls:
                row = dict(base, impl=impl)
                if impl in ("unfold", COMPILED) and not fits:
                    need = unfold_bytes(b, c, ho, wo, k * k, x.element_size()) / 2 ** 30
                    row["note"] = f"too big: needs ~{need:.1f} GiB"
                    results.append(row)
                    continue

                if impl == COMPILED:
                    torch._dynamo.reset()  # a fresh compile per shape, never a shape-generic graph
                    compiled = torch.compile(involution_unfold, dynamic=False)

                    def forward():
                        return compiled(x, weight, k, s)
                else:
                    def forward():
                        return involution(x, weight, k, s, impl=impl)

                def forward_backward():
                    out = forward()
                    torch.autograd.grad(out, (x, weight), grad_out)

                try:
                    row["fwd"] = median_ms(forward, device, args.repeats, args.warmup)
                    row["fwd_bwd"] = median_ms(forward_backward, device, args.repeats, args.warmup)
                    extra = extra_peak_bytes(forward, device)
                    row["mem_mib"], row["mem_x"] = extra / 2 ** 20, extra / out_bytes
                    if reference is not None:
                        with torch.no_grad():
                            row["err"] = (forward().float() - reference).abs().max().item()
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                except Exception as error:  # noqa: BLE001  (a failed compile is a result, not a crash)
                    if impl != COMPILED:
                        raise
                    row["note"] = f"compile failed: {type(error).__name__}"
                results.append(row)
            unfold_time = next((r.get("fwd_bwd") for r in results if r["impl"] == "unfold"), None)
            for row in results:
                if unfold_time and "fwd_bwd" in row:
                    row["speedup"] = unfold_time / row["fwd_bwd"]
                rows.append(row)
                print_row(row, flush=True)
    return rows


HEADER = ("| impl | B x C x H x W | dtype | fwd ms | fwd+bwd ms | speed-up vs unfold (fwd+bwd) "
          "| fwd extra peak MiB | x output | max abs err (fwd) |")


def print_row(row: dict, flush: bool = False) -> None:
    def fmt(key, spec):
        return format(row[key], spec) if key in row else "-"

    note = row.get("note")
    if note:
        cells = [row["impl"], row["shape"], row["dtype"], note, "-", "-", "-", "-", "-"]
    else:
        cells = [row["impl"], row["shape"], row["dtype"], fmt("fwd", ".1f"), fmt("fwd_bwd", ".1f"),
                 fmt("speedup", ".1f") + ("x" if "speedup" in row else ""), fmt("mem_mib", ".1f"),
                 fmt("mem_x", ".2f"), fmt("err", ".1e")]
    print("| " + " | ".join(cells) + " |", flush=flush)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated from fp32,fp16,bf16 "
                        "(default: fp32 on cpu, all three on cuda)")
    parser.add_argument("--impls", default=None, help="comma-separated (default: every impl for the device)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, type=parse_shapes,
                        help=f"comma-separated BxCxH or BxCxHxW (default {DEFAULT_SHAPES})")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--channels-per-group", type=int, default=16)
    parser.add_argument("--channels-last", action="store_true",
                        help="x, grad_out and the weight's generator output in channels_last (default NCHW)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_dtypes = "fp32" if device.type == "cpu" else "fp32,fp16,bf16"
    args.dtypes = (args.dtypes or default_dtypes).split(",")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")
    impls = available_impls(device) + [COMPILED]
    args.impls = args.impls.split(",") if args.impls else impls
    missing = [i for i in args.impls if i not in impls]
    if missing:
        parser.error(f"impls {missing} do not run on {device}; available: {impls}")

    print(f"device: {device_name(device)} ({device})")
    print(f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, K={args.kernel_size}, "
          f"stride {args.stride}, {args.channels_per_group} channels per group, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats} after {args.warmup} warm-up")
    if hasattr(os, "getloadavg") and device.type == "cpu":
        print("load average when starting: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print()
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    bench(args)
    if "triton" in args.impls and device.type == "cuda":
        print_autotune_choices()


def print_autotune_choices() -> None:
    from rednet.ops.triton_kernels import _KERNELS

    print("\nTriton autotuner choices (key: N_PIX, C_PER_G, K, STRIDE, DILATION, dtypes...):")
    for name, (compiled, _) in _KERNELS.items():
        for key, config in compiled.cache.items():
            print(f"- {name} {key}: {config}")


if __name__ == "__main__":
    main()
