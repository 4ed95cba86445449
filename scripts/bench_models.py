"""Training and inference throughput and peak memory of whole models, as a markdown table.

    python scripts/bench_models.py                       # CPU, 224 px, batch 8
    python scripts/bench_models.py --device cuda --batch-size 64 128 --amp        # bf16; --amp fp16

Every model runs in this one process, so the ratios against torchvision's ResNet-50 (``tv_resnet50``)
compare like with like. A training step is forward, cross-entropy, backward and an SGD step;
inference is a forward under ``torch.inference_mode`` in eval mode. Images/s is the batch size over
the median step time after warm-up. Peak memory is the most allocated at any moment during one
training step beyond the model and optimizer state (see ``rednet.benchmark.peak_bytes``).
At 32 px the models use the CIFAR stem (torchvision's ResNet-50 has none and is left out).

``--involution-impl unfold`` runs RedNet with the reference operator (the official code's math),
and ``--profile`` prints, per model, where a training step spends its time, by operator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.benchmark import environment, median_ms, peak_bytes  # noqa: E402
from rednet.models import Involution, create_model, list_models  # noqa: E402

REFERENCE = "tv_resnet50"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, resolution: int, impl: str) -> nn.Module:
    if name == REFERENCE:
        return torchvision.models.resnet50()
    model = create_model(name, num_classes=1000 if resolution > 64 else 10, cifar_stem=resolution <= 64)
    for m in model.modules():
        if isinstance(m, Involution):
            m.impl = impl
    return model


def profile_table(name: str, step, device: torch.device, top: int = 12) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()  # keeps one-time work (autotuning, allocator growth) out of the profile
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # On the GPU the time that matters is the kernels', not the host's that launched them. Each
    # kernel is charged to the operator that launched it; the kernels' own rows are left out so
    # that no time is counted twice.
    where = "device" if device.type == "cuda" else "cpu"
    events = [e for e in prof.key_averages() if getattr(e, f"self_{where}_time_total") > 0
              and e.device_type == torch.autograd.DeviceType.CPU]
    total = sum(getattr(e, f"self_{where}_time_total") for e in events)
    lines = [f"{name}: one training step, {total / 1e3:.1f} ms of self {where} time; the top operators:", "",
             "| operator | calls | self ms | share |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=lambda e: -getattr(e, f"self_{where}_time_total"))[:top]:
        t = getattr(e, f"self_{where}_time_total")
        lines.append(f"| {e.key[:70]} | {e.count} | {t / 1e3:.2f} | {t / total:.1%} |")
    return "\n".join(lines)


def measure(name: str, resolution: int, batch: int, args, device: torch.device) -> dict:
    model = build(name, resolution, args.involution_impl).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # dynamic=False: when the involution still broke the graph, the pieces between involutions
    # recompiled with symbolic shapes and Inductor
    # (torch 2.14) then failed to compile their backward.
    run = torch.compile(model, dynamic=False) if args.compile else model
    amp = torch.autocast(device.type, dtype=AMP_DTYPES.get(args.amp, torch.float32), enabled=args.amp is not None)
    # As in the trainer: float16 needs loss scaling, bfloat16 does not.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def train_step():
        with amp:
            loss = nn.functional.cross_entropy(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_ms = median_ms(train_step, device, args.repeats, args.warmup)
    peak, _ = peak_bytes(train_step, device)
    profile = profile_table(f"{name} at {resolution} px, batch {batch}", train_step, device) if args.profile else None

    model.eval()

    def infer():
        with torch.inference_mode(), amp:
            run(x)

    infer_ms = median_ms(infer, device, args.repeats, args.warmup)
    return {"model": name, "res": resolution, "batch": batch, "train": batch / train_ms * 1e3,
            "infer": batch / infer_ms * 1e3, "peak_mib": peak / 2**20, "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rednet26", "rednet50", "resnet26", "resnet50", REFERENCE])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", nargs="?", const="bf16", choices=sorted(AMP_DTYPES),
                        help="autocast, in bf16 (the default) or fp16 with loss scaling")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--involution-impl", default="auto", help="the involution implementation RedNets use")
    parser.add_argument("--profile", action="store_true", help="print where a training step spends its time")
    args = parser.parse_args()
    unknown = [m for m in args.models if m != REFERENCE and m not in list_models()]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list_models() + [REFERENCE]}")
    if min(args.batch_size + args.resolutions + [args.repeats]) < 1:
        parser.error("--batch-size, --resolutions and --repeats must be at least 1")
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(environment(device) + f"; amp={args.amp or 'off'} channels_last={args.channels_last} compile={args.compile} "
          f"involution impl={args.involution_impl}\n")
    print("| model | res | batch | train img/s | × tv_resnet50 | infer img/s | × tv_resnet50 | train peak MiB | × tv_resnet50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    profiles = []
    for resolution in args.resolutions:
        for batch in args.batch_size:
            rows = [measure(m, resolution, batch, args, device) for m in args.models
                    if not (m == REFERENCE and resolution <= 64)]
            ref = next((r for r in rows if r["model"] == REFERENCE), None)

            def ratio(row, key):
                return f"{row[key] / ref[key]:.2f}" if ref else "–"

            for r in rows:
                print(f"| {r['model']} | {r['res']} | {r['batch']} | {r['train']:.1f} | {ratio(r, 'train')} | "
                      f"{r['infer']:.1f} | {ratio(r, 'infer')} | {r['peak_mib']:.0f} | {ratio(r, 'peak_mib')} |",
                      flush=True)
                if r["profile"]:
                    profiles.append(r["profile"])
    for profile in profiles:
        print("\n" + profile)


if __name__ == "__main__":
    main()
