"""The least time a training step can take on a GPU: bytes moved and FLOPs per layer, against a
bandwidth and FLOP rates. Runs on the CPU in seconds, so GPU timings can be read against it.

    python scripts/roofline.py                                  # RedNet-26/50 and ResNet-50, H200 ceilings
    python scripts/roofline.py --models rednet26 --layers 40    # more of RedNet-26's layers
    python scripts/roofline.py --bandwidth-gbs 3000 --matrix-tflops 600   # another GPU

Every operator of one SGD step (forward under autocast, cross-entropy, backward, momentum update)
is counted on fake tensors (``scripts.benchmark.count_step``): the FLOPs of convolutions, matrix
products and the involution, and the bytes it must move, each input read once and each output
written once. An operator's floor is the larger of its bytes over the bandwidth and its FLOPs over
its units' rate (the matrix units for convolutions and products, the vector units for the
involution, whose kernels multiply and add in fp32 registers). The step's floor is the sum over
operators: eager PyTorch runs them one kernel at a time. Fusion (torch.compile, a fused kernel
generator) removes the bytes of the intermediates it keeps on chip, so it can beat this floor.

Defaults: an H200 as measured in this workplace (device-to-device copy 4.3 TB/s counting reads and
writes, bf16 matrix product 790 TFLOP/s on random data), and its datasheet's 67 TFLOP/s of fp32
vector arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.models import create_model, list_models  # noqa: E402
from scripts.benchmark import CATEGORY_NAMES, OpCost, count_step  # noqa: E402

REFERENCE = "tv_resnet50"
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build(name: str, resolution: int) -> torch.nn.Module:
    if name == REFERENCE:
        return torchvision.models.resnet50()
    return create_model(name, num_classes=1000 if resolution > 64 else 10, cifar_stem=resolution <= 64)


class Ceilings:
    def __init__(self, args) -> None:
        self.bandwidth = args.bandwidth_gbs * 1e9
        self.matrix = args.matrix_tflops * 1e12
        self.vector = args.vector_tflops * 1e12

    def floor_ms(self, costs: list[OpCost]) -> float:
        return sum(c.floor_s(self.bandwidth, self.matrix, self.vector) for c in costs) * 1e3

    def bytes_ms(self, costs: list[OpCost]) -> float:
        return sum(c.bytes for c in costs) / self.bandwidth * 1e3

    def flops_ms(self, costs: list[OpCost]) -> float:
        return sum(c.flops / (self.matrix if c.matrix else self.vector) for c in costs) * 1e3

    def bound(self, costs: list[OpCost]) -> str:
        return "memory" if self.bytes_ms(costs) >= self.flops_ms(costs) else "compute"


def group(costs: list[OpCost], key) -> dict[str, list[OpCost]]:
    groups: dict[str, list[OpCost]] = defaultdict(list)
    for c in costs:
        groups[key(c)].append(c)
    return groups


def summary_table(results: dict[str, list[OpCost]], ceilings: Ceilings, batch: int) -> str:
    ref = ceilings.floor_ms(results[REFERENCE]) if REFERENCE in results else None
    lines = ["| model | GFLOP | GB moved | floor ms, bytes only | floor ms, FLOPs only | floor ms | floor img/s | "
             f"× {REFERENCE} |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, costs in results.items():
        floor = ceilings.floor_ms(costs)
        ratio = f"{ref / floor:.2f}" if ref else "–"
        lines.append(f"| {name} | {sum(c.flops for c in costs) / 1e9:.0f} | {sum(c.bytes for c in costs) / 1e9:.2f} | "
                     f"{ceilings.bytes_ms(costs):.2f} | {ceilings.flops_ms(costs):.2f} | {floor:.2f} | "
                     f"{batch / floor * 1e3:.0f} | {ratio} |")
    return "\n".join(lines)


def category_table(costs: list[OpCost], ceilings: Ceilings) -> str:
    total = ceilings.floor_ms(costs)
    lines = ["| category | operators | GFLOP | GB moved | floor ms forward | floor ms backward | floor ms | share | "
             "bound by |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    by_category = group(costs, lambda c: c.category)
    for category in (*CATEGORY_NAMES, "optimizer"):
        part = by_category.get(category)
        if not part:
            continue
        phases = group(part, lambda c: c.phase)
        floor = ceilings.floor_ms(part)
        lines.append(f"| {category} | {len(part)} | {sum(c.flops for c in part) / 1e9:.1f} | "
                     f"{sum(c.bytes for c in part) / 1e9:.2f} | {ceilings.floor_ms(phases.get('forward', [])):.2f} | "
                     f"{ceilings.floor_ms(phases.get('backward', [])):.2f} | {floor:.2f} | {floor / total:.0%} | "
                     f"{ceilings.bound(part)} |")
    flops, moved = sum(c.flops for c in costs) / 1e9, sum(c.bytes for c in costs) / 1e9
    lines.append(f"| step | {len(costs)} | {flops:.1f} | {moved:.2f} "
                 f"| | | {total:.2f} | 100% | {ceilings.bound(costs)} |")
    return "\n".join(lines)


def layer_table(costs: list[OpCost], model: torch.nn.Module, ceilings: Ceilings, top: int | None) -> str:
    """Forward and backward of each module that ran operators itself, most expensive first."""
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    layers = group([c for c in costs if c.phase != "optimizer" and c.module], lambda c: c.module)
    total = ceilings.floor_ms(costs)
    ranked = sorted(layers.items(), key=lambda kv: -ceilings.floor_ms(kv[1]))
    shown = ranked if top is None else ranked[:top]
    lines = ["| layer | type | GFLOP | MB moved | floor ms | share | bound by |", "|---|---|---:|---:|---:|---:|---|"]
    for name, part in shown:
        floor = ceilings.floor_ms(part)
        lines.append(f"| {name} | {types.get(name, '?')} | {sum(c.flops for c in part) / 1e9:.2f} | "
                     f"{sum(c.bytes for c in part) / 2**20:.0f} | {floor:.3f} | {floor / total:.1%} | "
                     f"{ceilings.bound(part)} |")
    if len(shown) < len(ranked):
        rest = [c for _, part in ranked[len(shown):] for c in part]
        lines.append(f"| {len(ranked) - len(shown)} more layers | | {sum(c.flops for c in rest) / 1e9:.2f} | "
                     f"{sum(c.bytes for c in rest) / 2**20:.0f} | {ceilings.floor_ms(rest):.3f} | "
                     f"{ceilings.floor_ms(rest) / total:.1%} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rednet26", "rednet50", REFERENCE])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--amp", choices=sorted(AMP), default="bf16", help="autocast dtype (fp32: none)")
    parser.add_argument("--channels-last", action="store_true", help="count in channels_last (same bytes)")
    parser.add_argument("--bandwidth-gbs", type=float, default=4300.0, help="memory bandwidth, reads + writes")
    parser.add_argument("--matrix-tflops", type=float, default=790.0, help="convolutions and products")
    parser.add_argument("--vector-tflops", type=float, default=67.0, help="the involution's fp32 arithmetic")
    parser.add_argument("--layers", default="20", help="how many of the first model's layers to list, or 'all'")
    args = parser.parse_args()
    unknown = [m for m in args.models if m != REFERENCE and m not in list_models()]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list_models() + [REFERENCE]}")
    if min(args.batch_size, args.resolution) < 1 or min(args.bandwidth_gbs, args.matrix_tflops,
                                                        args.vector_tflops) <= 0:
        parser.error("--batch-size, --resolution and the ceilings must be positive")
    if args.layers != "all" and not args.layers.isdigit():
        parser.error("--layers takes a number or 'all'")
    top = None if args.layers == "all" else int(args.layers)
    ceilings = Ceilings(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    results, models = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = build(name, args.resolution)
        images = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
        target = torch.randint(0, 10, (args.batch_size,))
        results[name] = count_step(models[name], images, target, AMP[args.amp], memory_format)

    print(f"One SGD training step at batch {args.batch_size}, {args.resolution} px, autocast {args.amp}; ceilings "
          f"{args.bandwidth_gbs:.0f} GB/s, {args.matrix_tflops:.0f} TFLOP/s matrix, {args.vector_tflops:.0f} TFLOP/s "
          f"vector.\n")
    print(summary_table(results, ceilings, args.batch_size))
    first = args.models[0]
    print(f"\n{first}, by kind of operator:\n")
    print(category_table(results[first], ceilings))
    print(f"\n{first}, by layer (forward and backward):\n")
    print(layer_table(results[first], models[first], ceilings, top))


if __name__ == "__main__":
    main()
