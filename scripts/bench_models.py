"""Training and inference throughput and peak memory of whole models, as a markdown table.

    python scripts/bench_models.py                       # CPU, 224 px, batch 8
    python scripts/bench_models.py --device cuda --batch-size 64 128 --amp        # bf16; --amp fp16
    python scripts/bench_models.py --layouts nchw channels_last --modes eager compile   # each model's 4 setups

Every model runs in this one process, so the ratios against torchvision's ResNet-50 (``tv_resnet50``)
compare like with like. Each model runs in every memory layout (``--layouts``) and mode
(``--modes``: eager, or ``torch.compile``) asked for, and the ratio columns compare with ResNet-50
in its best setup (its fastest training row at that resolution and batch), since that is what
anyone would run. A training step is forward, cross-entropy, backward and an SGD step;
inference is a forward under ``torch.inference_mode`` in eval mode. Images/s is the batch size over
the median step time after warm-up; "warm-up s" is the time of the warm-up steps, compilation and
autotuning included. Peak memory is the most allocated at any moment during one training step
beyond the model and optimizer state (see ``scripts.benchmark.peak_bytes``). At 32 px the models
use the CIFAR stem (torchvision's ResNet-50 has none and is left out).

``--budget-s`` starts no new setup after that many seconds (compilation makes the grid long on a
GPU lent by the minute); the rows it skips say so. ``--involution-impl unfold`` runs RedNet with
the reference operator (the official code's math). ``--profile`` prints where the first model's
training step spends its time in each setup: by kind of work (``scripts.benchmark.categorize``:
convolution, BatchNorm, involution, elementwise, ...) and by operator, or on a GPU by kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rednet

from rednet.models import Involution, create_model, list_models  # noqa: E402
from scripts.benchmark import CATEGORY_NAMES, categorize, environment, median_ms, peak_bytes  # noqa: E402

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


def profile_step(step, device: torch.device) -> dict[str, float]:
    """Milliseconds of one training step by what ran: on a GPU each kernel (compiled or not), on the
    CPU each operator, by its own (self) time, so nothing is counted twice."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()  # keeps one-time work (autotuning, allocator growth) out of the profile
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":  # the kernels' time, not the host's that launched them
        kind = torch.autograd.DeviceType.CUDA
        return {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
                if e.device_type == kind and e.self_device_time_total > 0}
    # On the CPU the involution runs as many small aten ops inside rednet::involution: charge their
    # time to the operator that called them.
    times: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU or e.self_cpu_time_total <= 0:
            continue
        key, parent = e.name, e.cpu_parent
        while parent is not None:
            if "involution" in parent.name:
                key = parent.name
            parent = parent.cpu_parent
        times[key] += e.self_cpu_time_total / 1e3
    return dict(times)


def category_table(name: str, profiles: dict[str, dict[str, float]]) -> str:
    """One column per setup: the step's time by kind of work."""
    setups = list(profiles)
    totals = {setup: defaultdict(float) for setup in setups}
    for setup, times in profiles.items():
        for key, ms in times.items():
            totals[setup][categorize(key)] += ms
    lines = [f"{name}: one training step, ms by kind of work (share)", "",
             "| kind | " + " | ".join(setups) + " |", "|---|" + "---:|" * len(setups)]
    for category in CATEGORY_NAMES:
        if any(totals[s][category] for s in setups):
            cells = [f"{totals[s][category]:.1f} ({totals[s][category] / sum(totals[s].values()):.0%})" for s in setups]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{sum(totals[s].values()):.1f}" for s in setups) + " |")
    return "\n".join(lines)


def top_table(title: str, times: dict[str, float], top: int = 10) -> str:
    total = sum(times.values())
    lines = [title, "", "| operator or kernel | kind | ms | share |", "|---|---|---:|---:|"]
    for key, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {key[:80]} | {categorize(key)} | {ms:.2f} | {ms / total:.1%} |")
    return "\n".join(lines)


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("eager", "compile")


def measure(name: str, resolution: int, batch: int, layout: str, mode: str, args, device: torch.device) -> dict:
    model = build(name, resolution, args.involution_impl).to(device)
    memory_format = LAYOUTS[layout]
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # dynamic=False: when the involution still broke the graph, the pieces between involutions
    # recompiled with symbolic shapes and Inductor
    # (torch 2.14) then failed to compile their backward.
    if mode == "compile":
        # Every setup compiles afresh: otherwise the models of one run, which share forward methods,
        # would pile up recompilations past Dynamo's limit of 8 and silently run the rest eagerly.
        torch._dynamo.reset()
    run = torch.compile(model, dynamic=False) if mode == "compile" else model
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

    def infer():
        with torch.inference_mode(), amp:
            run(x)

    start = time.perf_counter()
    model.train()
    for _ in range(args.warmup):
        train_step()
    model.eval()
    for _ in range(args.warmup):
        infer()
    warmup_s = time.perf_counter() - start
    model.train()
    train_ms = median_ms(train_step, device, args.repeats, 0)
    peak, _ = peak_bytes(train_step, device)
    profile = profile_step(train_step, device) if args.profile else None
    model.eval()
    infer_ms = median_ms(infer, device, args.repeats, 0)
    return {"model": name, "res": resolution, "batch": batch, "layout": layout, "mode": mode,
            "train": batch / train_ms * 1e3, "infer": batch / infer_ms * 1e3, "peak_mib": peak / 2**20,
            "warmup_s": warmup_s, "profile": profile}


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
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["nchw"], help="memory layouts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager"], help="eager, or torch.compile")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new setup after this many seconds; later rows say they were skipped")
    parser.add_argument("--involution-impl", default="auto", help="the involution implementation RedNets use")
    parser.add_argument("--profile", action="store_true",
                        help="print where the first model's training step spends its time, in each setup")
    args = parser.parse_args()
    unknown = [m for m in args.models if m != REFERENCE and m not in list_models()]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list_models() + [REFERENCE]}")
    if min(args.batch_size + args.resolutions + [args.repeats]) < 1 or args.warmup < 0:
        parser.error("--batch-size, --resolutions and --repeats must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    torch.manual_seed(0)
    started = time.perf_counter()
    # Eager setups first: they are quick, and a budget then cuts compiled rows, not the baseline.
    setups = [(layout, mode) for mode in args.modes for layout in args.layouts]

    print(environment(device) + f"; amp={args.amp or 'off'} involution impl={args.involution_impl}\n")
    header = f"× {REFERENCE} best"
    print(f"| model | layout | mode | res | batch | train img/s | {header} | infer img/s | {header} | "
          f"train peak MiB | {header} | warm-up s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    profiles: dict[str, dict[str, float]] = {}
    for resolution in args.resolutions:
        for batch in args.batch_size:
            rows = []
            for layout, mode in setups:
                for m in args.models:
                    if m == REFERENCE and resolution <= 64:
                        continue
                    if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                        rows.append({"model": m, "layout": layout, "mode": mode, "res": resolution, "batch": batch,
                                     "skipped": True})
                        continue
                    rows.append(measure(m, resolution, batch, layout, mode, args, device))
            done = [r for r in rows if not r.get("skipped")]
            refs = [r for r in done if r["model"] == REFERENCE]
            ref = max(refs, key=lambda r: r["train"]) if refs else None

            def ratio(row, key):
                return f"{row[key] / ref[key]:.2f}" if ref else "–"

            for r in sorted(rows, key=lambda r: args.models.index(r["model"])):
                where = f"| {r['model']} | {r['layout']} | {r['mode']} | {r['res']} | {r['batch']} |"
                if r.get("skipped"):
                    print(f"{where} skipped (--budget-s {args.budget_s:.0f}) | | | | | | |")
                    continue
                best = " (best)" if r is ref else ""
                print(f"{where} {r['train']:.1f}{best} | {ratio(r, 'train')} | {r['infer']:.1f} | "
                      f"{ratio(r, 'infer')} | "
                      f"{r['peak_mib']:.0f} | {ratio(r, 'peak_mib')} | {r['warmup_s']:.1f} |", flush=True)
                if r["profile"] is not None and r["model"] == args.models[0]:
                    profiles[f"{r['layout']}, {r['mode']}, {r['res']} px, batch {r['batch']}"] = r["profile"]
    if profiles:
        print("\n" + category_table(args.models[0], profiles))
        for setup, times in profiles.items():
            print("\n" + top_table(f"{args.models[0]}, {setup}: the largest items", times))


if __name__ == "__main__":
    main()
