"""Compiles the Triton involution kernels for a GPU, without one, and prints what each tile costs.

For every involution layer of a model (RedNet-26 at 224 px by default) and every tile the
autotuner would try there, the kernels are compiled ahead of time for the target (sm_90, Hopper, by
default) with the ptxas that ships with Triton, and the table gives registers per thread, spilled
bytes (local memory) and shared memory per program, read from the cubin with ``cuobjdump``. It is
the "resource report" of .library/device/METHOD.md, taken where no device time is spent, and it
checks that every kernel compiles for the GPU at all (tl.dot's minimum sizes, tl.gather's
lowering), which the interpreter the tests use does not.

    python scripts/kernel_resources.py                        # fused kernels, every RedNet-26 layer
    python scripts/kernel_resources.py --kernels forward --layers layer4.0 --dtype fp32

The launch arguments are the ones the host code computes for the layer's shape (captured from its
``_launch`` call with the GPU's tiles), so the compiled kernel is the one a GPU would run, up to
Triton's specialisation of integer arguments (divisibility hints), which changes little.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rednet.ops import fused_generator as fg  # noqa: E402
from rednet.ops import output_size  # noqa: E402
from rednet.ops import triton_kernels as tk  # noqa: E402
from scripts.benchmark import involution_layers  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
FUSED = ("forward", "grad_x", "grad_reduced", "grad_weight")
UNFUSED = ("forward", "grad_x", "grad_weight")


def capture(layer: dict, batch: int, dtype: torch.dtype, sms: int) -> list[tuple]:
    """(family, kernel name, launch args, constexprs) of every kernel of one layer, as on a GPU."""
    launches = []

    def recorder(family):
        def record(name, tensor, n_programs, *args, **constexprs):
            launches.append((family, name, args, constexprs))
        return record

    k, s = layer["kernel_size"], layer["stride"]
    c, h, w, groups, cr = (layer[key] for key in ("channels", "height", "width", "groups", "reduced"))
    ho, wo = output_size(h, k, s, 1), output_size(w, k, s, 1)
    x, go = torch.empty(batch, c, h, w, dtype=dtype), torch.empty(batch, c, ho, wo, dtype=dtype)
    reduced = torch.empty(batch, cr, ho, wo, dtype=dtype)
    weight, bias = torch.empty(groups * k * k, cr, 1, 1, dtype=dtype), torch.empty(groups * k * k, dtype=dtype)
    kernel_map = torch.empty(batch, groups, k * k, ho, wo, dtype=dtype)
    saved = fg._launch, fg._interpreting, fg.weight_grad_chunks, tk._launch
    # The GPU's choices (tiles, dot operand dtype, weight-gradient chunks), on tensors of the CPU.
    fg._launch, tk._launch = recorder("fused"), recorder("unfused")
    fg._interpreting = lambda device: False
    fg.weight_grad_chunks = lambda b, g, device: max(1, min(b, round(fg._WEIGHT_GRAD_PROGRAMS_PER_SM * sms / g)))
    try:
        fg.fused_forward(x, reduced, weight, bias, k, s, 1)
        fg.fused_grad_x(go, x, reduced, weight, bias, k, s, 1)
        fg.fused_grad_reduced(go, x, reduced, weight, k, s, 1)
        fg.fused_grad_weight(go, x, reduced, weight, bias, k, s, 1)
        tk._forward(x, kernel_map, k, s, 1)
        tk._grad_x(go, kernel_map, x, k, s, 1)
        tk._grad_weight(go, x, kernel_map, k, s, 1)
    finally:
        fg._launch, fg._interpreting, fg.weight_grad_chunks, tk._launch = saved
    return launches


def compile_one(fn, args, constexprs, config, target) -> dict:
    params = list(inspect.signature(fn).parameters)
    values = dict(zip(params, args))
    constants = {**constexprs, **config.kwargs}
    signature = {}
    for name in params:
        if name in constants:
            signature[name] = "constexpr"
        elif isinstance(values[name], torch.Tensor):
            signature[name] = POINTER[values[name].dtype]
        else:
            signature[name] = "i64" if abs(values[name]) >= 2 ** 31 else "i32"
    source = ASTSource(fn=triton.jit(fn), signature=signature,
                       constexprs={(params.index(n),): v for n, v in constants.items()})
    start = time.perf_counter()
    kernel = triton.compile(source, target=target, options={"num_warps": config.num_warps,
                                                            "num_stages": config.num_stages})
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
    return dict(regs=int(fields["REG"]), local=int(fields["LOCAL"]), stack=int(fields["STACK"]),
                shared=kernel.metadata.shared, seconds=seconds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="rednet26")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="enters the grid and the chunking only")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors (132: H100/H200 SXM)")
    parser.add_argument("--family", default="fused", choices=["fused", "unfused", "both"])
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    parser.add_argument("--layers", default=None, help="comma-separated substrings of layer names (default: all)")
    args = parser.parse_args(argv)

    target = GPUTarget("cuda", args.arch, 32)
    layers = involution_layers(args.model, args.image_size)
    if args.layers:
        layers = [lay for lay in layers if any(part in lay["name"] for part in args.layers.split(","))]
    wanted = args.kernels.split(",") if args.kernels else None
    families = ("fused", "unfused") if args.family == "both" else (args.family,)
    kernels = {"fused": fg._KERNELS, "unfused": tk._KERNELS}
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.dtype}, sm_{args.arch}, "
          f"triton {triton.__version__}; regs per thread, spilled bytes, shared memory per program")
    print()
    print("| layer (C, H, K, stride, G, Cr) | kernel | tile | warps | regs | spills (local B) | shared KiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    seen = {}
    for layer in layers:
        label = "{name} ({channels}, {height}, {kernel_size}, {stride}, {groups}, {reduced})".format(**layer)
        for family, name, launch_args, constexprs in capture(layer, args.batch_size, DTYPES[args.dtype], args.sms):
            if family not in families or (wanted and name not in wanted):
                continue
            autotuner = kernels[family][name][0]
            named = dict(zip(autotuner.arg_names, launch_args))
            for config in autotuner.early_config_prune(autotuner.configs, named, **constexprs):
                # Layers that differ only in runtime sizes compile to the same kernel.
                key = (family, name, repr(sorted(constexprs.items())), repr(config.kwargs), config.num_warps)
                if key not in seen:
                    seen[key] = compile_one(autotuner.fn.fn, launch_args, constexprs, config, target)
                r = seen[key]
                tile = ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) or "-"
                if name == "grad_x" and family == "fused":
                    tile = f"{constexprs['TILE_H']}x{constexprs['TILE_W']} halo {constexprs['HALO_PAD']}, " + tile
                print(f"| {label} | {family} {name} | {tile} | {config.num_warps} | {r['regs']} | "
                      f"{r['local']} | {r['shared'] / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
