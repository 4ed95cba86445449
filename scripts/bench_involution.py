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
gives the inputs the layout of a channels_last model's. ``--shapes rednet26`` (any model name)
takes the shapes of that model's involution layers at ``--batch-size`` and ``--image-size``, each
with its own kernel size, stride, groups and generator width.

``--table`` chooses another table (these are what issue 12's GPU measurements need):

* ``kernels``: every kernel of a layer, unfused (the generator's conv2 forward and backward through
  cuDNN, the three Triton involution kernels) and fused (rednet.ops.fused_generator's four), with
  the bytes it must move (each input read once, each output written once: its floor) and its
  FLOPs, the floor time (the larger of bytes over the copy bandwidth and FLOPs over the matrix and
  vector rates), the measured median (``triton.testing.do_bench``, which flushes the L2 cache
  before every run), the achieved GB/s and the time over the floor. A device-to-device copy of
  1 GiB measured in the same run gives the bandwidth; a copy of the layer's x shows what a copy
  that size achieves. On the CPU the timings are left out (the kernels run once, through Triton's
  interpreter, to check the script) and the floors use ``--bandwidth`` (default: the H200's
  datasheet 4.8 TB/s).
* ``layer``: the kernel generator's conv2 and the involution, unfused (``F.conv2d`` then the
  Triton operator) against fused (``fused_involution``): forward and forward+backward (gradients
  of x, the reduced features, conv2's weight and bias), the speed-up, and the memory autograd keeps
  for the backward, counted with saved-tensor hooks (the unfused layer keeps the kernel map).
* ``model``: one training step of ``--model`` (SGD; bf16 autocast on CUDA) with and without
  ``fused_generator``: step time, peak memory (``scripts.benchmark.peak_bytes``) and memory kept for
  the backward, against the sum of the kernel maps the option should save. On the CPU (without
  ``TRITON_INTERPRET=1``, far too slow for a whole model) the option falls back to the unfused
  layer, so the two rows agree: a check of the script, not of the saving.

A dry run of the GPU tables on the CPU: ``--table kernels --shapes 2x8x9x7 --kernel-size 3
--channels-per-group 4`` (and ``--table layer``); ``--table kernels --shapes rednet26 --floors-only``
prints the floors of RedNet-26's layers without running anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rednet.models import list_models  # noqa: E402
from rednet.ops import available_impls, involution, involution_unfold, output_size  # noqa: E402
from scripts.benchmark import device_name, involution_layers, median_ms, peak_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, C, H=W) of the RedNet stages at the benchmark's batch sizes.
DEFAULT_SHAPES = "32x64x32,8x64x56,16x256x14"
COMPILED = "unfold+compile"


class Layer(NamedTuple):
    """One involution layer's problem: input (b, c, h, w), kernel size, stride, groups, generator width."""

    name: str
    b: int
    c: int
    h: int
    w: int
    k: int
    stride: int
    groups: int
    reduced: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return output_size(self.h, self.k, self.stride, 1), output_size(self.w, self.k, self.stride, 1)

    @property
    def label(self) -> str:
        name = f"{self.name} " if self.name else ""
        return f"{name}{self.b}x{self.c}x{self.h}x{self.w}" + (f" /{self.stride}" if self.stride > 1 else "")


def parse_layers(text: str, args) -> list[Layer]:
    """BxCxH[xW] items (with --kernel-size, --stride, --channels-per-group, --reduction-ratio), or a
    model name: its involution layers at --batch-size and --image-size, identical ones once."""
    if text in list_models():
        layers = []
        for spec in involution_layers(text, args.image_size):
            layer = Layer(spec["name"].replace("backbone.", "").replace(".conv2", ""), args.batch_size,
                          spec["channels"], spec["height"], spec["width"], spec["kernel_size"], spec["stride"],
                          spec["groups"], spec["reduced"])
            if all(layer[1:] != other[1:] for other in layers):
                layers.append(layer)
        return layers
    layers = []
    for item in text.split(","):
        try:
            dims = [int(v) for v in item.lower().split("x")]
        except ValueError:
            dims = []
        if len(dims) == 3:
            dims.append(dims[2])
        if len(dims) != 4:
            raise argparse.ArgumentTypeError(f"--shapes: {item!r} is not BxCxH or BxCxHxW, and --shapes is "
                                             f"either such a list or one model name ({', '.join(list_models())})")
        b, c, h, w = dims
        layers.append(Layer("", b, c, h, w, args.kernel_size, args.stride, c // args.channels_per_group,
                            c // args.reduction_ratio))
    return layers


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
        for layer in args.layers:
            b, c, h, w, k, s, groups = layer[1:8]
            ho, wo = layer.out_hw
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
            base = {"impl": None, "shape": layer.label, "dtype": dtype_name}
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


# --- The kernels table: each kernel against its floor ------------------------------------------

# Ceilings when they are not measured (the CPU): an H200's datasheet (.library/device/H200.md).
DATASHEET = {"bandwidth": 4.8e12, "matrix": 989e12, "vector": 67e12}


def kernel_costs(layer: Layer, element_size: int) -> dict[str, tuple[int, float, float]]:
    """(bytes, matrix FLOPs, vector FLOPs) each kernel must move and do at the least.

    Bytes: each input read once and each output written once; nothing else (the weight-gradient
    partial sums and re-reads through the cache are the kernels' own overhead, so they count
    against the kernel, not in its floor). Matrix FLOPs are the generator's 1x1 convolution,
    2 * pixels * Cr * G*K*K (tensor cores); vector FLOPs the involution's K*K multiply-adds per output
    element (CUDA cores, fp32 accumulation).
    """
    ho, wo = layer.out_hw
    kk = layer.k * layer.k
    pixels = layer.b * ho * wo
    x = layer.b * layer.c * layer.h * layer.w * element_size
    out = layer.b * layer.c * ho * wo * element_size
    reduced = pixels * layer.reduced * element_size
    kernel_map = pixels * layer.groups * kk * element_size
    weights = layer.groups * kk * (layer.reduced + 1) * element_size
    matrix = 2.0 * pixels * layer.reduced * layer.groups * kk
    vector = 2.0 * pixels * layer.c * kk
    return {
        "conv2 fwd (cuDNN)": (reduced + weights + kernel_map, matrix, 0.0),
        "involution fwd": (x + kernel_map + out, 0.0, vector),
        "involution grad_x": (out + kernel_map + x, 0.0, vector),
        "involution grad_weight": (out + x + kernel_map, 0.0, vector),
        "conv2 bwd (cuDNN)": (kernel_map + reduced + 2 * weights + reduced, 2 * matrix, 0.0),
        "fused fwd": (x + reduced + weights + out, matrix, vector),
        "fused grad_x": (out + reduced + weights + x, matrix, vector),
        "fused grad_reduced": (out + x + weights + reduced, matrix, vector),
        "fused grad_weight": (out + x + reduced + weights, matrix, vector),
    }


def floor_ms(cost: tuple[int, float, float], rates: dict) -> tuple[float, float]:
    """(memory time, arithmetic time) in ms; the larger is the floor."""
    nbytes, matrix, vector = cost
    return 1e3 * nbytes / rates["bandwidth"], 1e3 * (matrix / rates["matrix"] + vector / rates["vector"])


def bench_ms(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        fn()  # the interpreter checks that the call works; its time says nothing about a GPU
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_rates(device: torch.device, dtype: torch.dtype, args) -> dict:
    """The copy bandwidth and the matrix rate, measured here on CUDA (``--bandwidth`` overrides)."""
    rates = dict(DATASHEET)
    if device.type == "cuda" and not args.floors_only:
        src = torch.randn(2 ** 29 // 2, device=device, dtype=torch.bfloat16)  # 512 MiB each way
        dst = torch.empty_like(src)
        rates["bandwidth"] = 2 * src.numel() * src.element_size() / (bench_ms(lambda: dst.copy_(src), device) * 1e-3)
        del src, dst
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        rates["matrix"] = 2 * 8192 ** 3 / (bench_ms(lambda: a @ b, device) * 1e-3)
        del a, b
    if args.bandwidth:
        rates["bandwidth"] = args.bandwidth * 1e12
    return rates


def layer_tensors(layer: Layer, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ho, wo = layer.out_hw
    kkg = layer.groups * layer.k * layer.k

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return dict(x=randn(layer.b, layer.c, layer.h, layer.w), reduced=randn(layer.b, layer.reduced, ho, wo).relu(),
                weight=randn(kkg, layer.reduced, 1, 1, scale=layer.reduced ** -0.5), bias=randn(kkg, scale=0.1),
                grad_out=randn(layer.b, layer.c, ho, wo), grad_map=randn(layer.b, kkg, ho, wo))


def kernel_calls(layer: Layer, t: dict) -> dict:
    """One call per kernel of kernel_costs, on the layer's tensors."""
    from rednet.ops import fused_generator as fg
    from rednet.ops import triton_kernels as tk

    k, s = layer.k, layer.stride
    x, r, w, bias, go, gmap = (t[n] for n in ("x", "reduced", "weight", "bias", "grad_out", "grad_map"))
    kernel_map = F.conv2d(r, w, bias)
    map5 = kernel_map.view(layer.b, layer.groups, k * k, *layer.out_hw)
    return {
        "conv2 fwd (cuDNN)": lambda: F.conv2d(r, w, bias),
        "involution fwd": lambda: tk._forward(x, map5, k, s, 1),
        "involution grad_x": lambda: tk._grad_x(go, map5, x, k, s, 1),
        "involution grad_weight": lambda: tk._grad_weight(go, x, map5, k, s, 1),
        "conv2 bwd (cuDNN)": lambda: torch.ops.aten.convolution_backward(
            gmap, r, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True]),
        "fused fwd": lambda: fg.fused_forward(x, r, w, bias, k, s, 1),
        "fused grad_x": lambda: fg.fused_grad_x(go, x, r, w, bias, k, s, 1),
        "fused grad_reduced": lambda: fg.fused_grad_reduced(go, x, r, w, k, s, 1),
        "fused grad_weight": lambda: fg.fused_grad_weight(go, x, r, w, bias, k, s, 1),
    }


KERNELS_HEADER = ("| layer | dtype | kernel | MB moved | GFLOP (matrix + vector) | floor ms (bytes, FLOPs) "
                  "| measured ms | GB/s | x floor |")


def kernels_table(args, device: torch.device) -> None:
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        rates = measure_rates(device, dtype, args)
        source = "measured" if device.type == "cuda" and not args.floors_only else "datasheet"
        print(f"{dtype_name}: copy bandwidth {rates['bandwidth'] / 1e12:.2f} TB/s "
              f"({'--bandwidth' if args.bandwidth else source}), bf16 matrix {rates['matrix'] / 1e12:.0f} TFLOP/s "
              f"({source}), fp32 vector {rates['vector'] / 1e12:.0f} TFLOP/s (datasheet)")
        print()
        print(KERNELS_HEADER)
        print("|" + "---|" * KERNELS_HEADER.count(" | ") + "---|")
        element = torch.tensor([], dtype=dtype).element_size()
        for layer in args.layers:
            x_bytes = layer.b * layer.c * layer.h * layer.w * element
            costs = kernel_costs(layer, element)
            if args.floors_only:
                calls = dict.fromkeys(costs)
                copy_x = None
            else:
                t = layer_tensors(layer, device, dtype)
                calls = kernel_calls(layer, t)
                copy = torch.empty_like(t["x"])

                def copy_x():
                    copy.copy_(t["x"])
            rows = [("copy x (reference)", (2 * x_bytes, 0.0, 0.0), copy_x)]
            rows += [(name, cost, calls[name]) for name, cost in costs.items()]
            totals = {"unfused": [0, 0.0, 0.0, 0.0], "fused": [0, 0.0, 0.0, 0.0]}
            for name, cost, call in rows:
                ms = None if call is None else bench_ms(call, device)
                print_kernel_row(layer.label, dtype_name, name, cost, rates, ms)
                family = "fused" if name.startswith("fused") else ("unfused" if "copy" not in name else None)
                if family:
                    total = totals[family]
                    total[:3] = [total[0] + cost[0], total[1] + cost[1], total[2] + cost[2]]
                    total[3] = None if ms is None or total[3] is None else total[3] + ms
            for family, (nbytes, matrix, vector, ms) in totals.items():
                print_kernel_row(layer.label, dtype_name, f"**{family} layer, fwd+bwd**", (nbytes, matrix, vector),
                                 rates, ms)
            calls = t = copy = None  # frees the layer's tensors before the next layer's
        print()


def print_kernel_row(label, dtype_name, name, cost, rates, ms) -> None:
    memory, arithmetic = floor_ms(cost, rates)
    floor = max(memory, arithmetic)
    cells = [label, dtype_name, name, f"{cost[0] / 1e6:.4g}", f"{(cost[1] + cost[2]) / 1e9:.3g}",
             f"{floor:.3f} ({memory:.3f}, {arithmetic:.3f})"]
    if ms is None:
        cells += ["-", "-", "-"]
    else:
        cells += [f"{ms:.3f}", f"{cost[0] / (ms * 1e-3) / 1e9:.0f}", f"{ms / floor:.1f}"]
    print("| " + " | ".join(cells) + " |", flush=True)


# --- The layer table: fused against unfused -----------------------------------------------------

def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for the backward during ``fn()``, and its result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


LAYER_HEADER = ("| layer | dtype | path | fwd ms | fwd+bwd ms | speed-up (fwd+bwd) | kept for backward MiB "
                "| kernel map MiB | floor fwd+bwd ms |")


def layer_table(args, device: torch.device) -> None:
    from rednet.ops import fused_involution

    print(LAYER_HEADER)
    print("|" + "---|" * LAYER_HEADER.count(" | ") + "---|")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        rates = measure_rates(device, dtype, args)
        element = torch.tensor([], dtype=dtype).element_size()
        for layer in args.layers:
            t = layer_tensors(layer, device, dtype)
            leaves = [t[n].requires_grad_() for n in ("x", "reduced", "weight", "bias")]
            k, s = layer.k, layer.stride
            map_mib = layer.b * layer.groups * k * k * layer.out_hw[0] * layer.out_hw[1] * element / 2 ** 20

            def unfused(x, reduced, weight, bias):
                kernel_map = F.conv2d(reduced, weight, bias)
                return involution(x, kernel_map.view(layer.b, layer.groups, k * k, *layer.out_hw), k, s,
                                  impl="triton")

            def fused(x, reduced, weight, bias):
                return fused_involution(x, reduced, weight, bias, k, s)

            costs = kernel_costs(layer, element)
            times = {}
            for path, fn in (("unfused", unfused), ("fused", fused)):
                kept, _ = saved_bytes(lambda: fn(*leaves))
                fwd = bench_ms(lambda: fn(*leaves), device)
                fwd_bwd = bench_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, t["grad_out"]), device)
                times[path] = fwd_bwd
                floor = sum(max(floor_ms(cost, rates)) for name, cost in costs.items()
                            if name.startswith("fused") == (path == "fused"))
                speedup = f"{times['unfused'] / fwd_bwd:.2f}x" if fwd_bwd and times.get("unfused") else "-"
                cells = [layer.label, dtype_name, path, "-" if fwd is None else f"{fwd:.3f}",
                         "-" if fwd_bwd is None else f"{fwd_bwd:.3f}", speedup, f"{kept / 2 ** 20:.4g}",
                         f"{map_mib:.4g}", f"{floor:.3g}"]
                print("| " + " | ".join(cells) + " |", flush=True)
            del t, leaves


# --- The model table: a training step with and without the option --------------------------------

MODEL_HEADER = ("| model | batch | px | fused_generator | step ms | peak MiB | kept for backward MiB "
                "| kernel maps MiB (all layers) |")


def model_table(args, device: torch.device) -> None:
    from rednet.models import create_model

    amp = device.type == "cuda"
    element = 2 if amp else 4
    maps = sum(args.batch_size * spec["groups"] * spec["kernel_size"] ** 2
               * output_size(spec["height"], spec["kernel_size"], spec["stride"], 1)
               * output_size(spec["width"], spec["kernel_size"], spec["stride"], 1) * element
               for spec in involution_layers(args.model, args.image_size))
    print(MODEL_HEADER)
    print("|" + "---|" * MODEL_HEADER.count(" | ") + "---|")
    for fused in (False, True):
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10, cifar_stem=args.image_size <= 64,
                             fused_generator=fused).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)

        def loss():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return F.cross_entropy(model(x), y)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        step()  # autotuning, allocator growth and the optimizer state stay out of the numbers
        kept, _ = saved_bytes(loss)
        peak, _ = peak_bytes(step, device)
        ms = median_ms(step, device, args.repeats, args.warmup) if device.type == "cuda" else None
        print(f"| {args.model} | {args.batch_size} | {args.image_size} | {fused} | "
              f"{'-' if ms is None else f'{ms:.1f}'} | {peak / 2 ** 20:.4g} | {kept / 2 ** 20:.4g} | "
              f"{maps / 2 ** 20:.4g} |", flush=True)
        del model, optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="impls", choices=["impls", "kernels", "layer", "model"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated from fp32,fp16,bf16 "
                        "(default: fp32 on cpu; all three on cuda, bf16 for --table kernels/layer)")
    parser.add_argument("--impls", default=None, help="comma-separated (default: every impl for the device)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated BxCxH or BxCxHxW, or a model name (default {DEFAULT_SHAPES})")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--channels-per-group", type=int, default=16)
    parser.add_argument("--reduction-ratio", type=int, default=4, help="Cr = C / this, for BxCxH shapes")
    parser.add_argument("--batch-size", type=int, default=128, help="with --shapes MODEL and --table model")
    parser.add_argument("--image-size", type=int, default=224, help="with --shapes MODEL and --table model")
    parser.add_argument("--model", default="rednet26", help="for --table model")
    parser.add_argument("--floors-only", action="store_true",
                        help="--table kernels: print the floors without running anything (any device)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="TB/s for the floors (default: a copy measured on CUDA, 4.8 on the CPU)")
    parser.add_argument("--channels-last", action="store_true",
                        help="x, grad_out and the weight's generator output in channels_last (default NCHW)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.layers = parse_layers(args.shapes, args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    if device.type == "cpu" and args.table in ("kernels", "layer"):
        # The Triton kernels run on the CPU only in the interpreter: a check of this script, not a
        # measurement (its timings are left out). A whole model is too slow for the interpreter:
        # there --table model runs the option's unfused fallback, so its two rows should agree.
        os.environ["TRITON_INTERPRET"] = "1"
    default_dtypes = "fp32" if device.type == "cpu" else ("fp32,fp16,bf16" if args.table == "impls" else "bf16")
    args.dtypes = (args.dtypes or default_dtypes).split(",")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {sorted(DTYPES)}")

    print(f"device: {device_name(device)} ({device})")
    if hasattr(os, "getloadavg") and device.type == "cpu":
        print("load average when starting: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.table != "impls":
        import triton

        print(f"torch {torch.__version__}, triton {triton.__version__}, table {args.table}"
              + (" (CPU: Triton's interpreter, no timings)" if device.type == "cpu" else ""))
        print()
        {"kernels": kernels_table, "layer": layer_table, "model": model_table}[args.table](args, device)
        if device.type == "cuda":
            print_autotune_choices()
        return

    impls = available_impls(device) + [COMPILED]
    args.impls = args.impls.split(",") if args.impls else impls
    missing = [i for i in args.impls if i not in impls]
    if missing:
        parser.error(f"impls {missing} do not run on {device}; available: {impls}")
    print(f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, K={args.kernel_size}, "
          f"stride {args.stride}, {args.channels_per_group} channels per group, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, median of {args.repeats} after {args.warmup} warm-up")
    print()
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    bench(args)
    if "triton" in args.impls and device.type == "cuda":
        print_autotune_choices()


def print_autotune_choices() -> None:
    from rednet.ops.fused_generator import _KERNELS as fused
    from rednet.ops.triton_kernels import _KERNELS as unfused

    print("\nTriton autotuner choices (key: the kernel's autotune key, then the dtypes):")
    for family, kernels in (("involution", unfused), ("fused", fused)):
        for name, (compiled, _) in kernels.items():
            for key, config in compiled.cache.items():
                print(f"- {family} {name} {key}: {config}")


if __name__ == "__main__":
    main()
