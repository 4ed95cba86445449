"""Timing and memory measurement shared by ``scripts/bench_*.py``."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> str:
    """One line naming what produced a table."""
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"device: {device_name(device)}{threads}; torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """The most memory allocated at any moment during ``fn()`` beyond what was allocated before,
    and ``fn``'s result.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU there
    is no allocator peak counter, so ``fn`` runs under ``torch.profiler.profile(profile_memory=True)``,
    which records every allocation and free of PyTorch's CPU allocator with a timestamp (temporaries
    inside ops included); replaying them in time order gives the live bytes at every moment.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # The raw event list: FunctionEvents fold the allocations made inside ops into the ops.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak, result


def involution_layers(model: str = "rednet26", image_size: int = 224) -> list[dict]:
    """The involution layers of a model and the shapes they see, at batch 1, in forward order.

    Each entry: ``name`` (the module's), ``channels``, ``height``, ``width`` (the input's),
    ``kernel_size``, ``stride``, ``groups`` and ``reduced`` (the kernel generator's hidden
    channels, Cr). Read off the built model with forward hooks, so it is whatever the model is.
    """
    from rednet.models import Involution, create_model

    net = create_model(model, num_classes=10, cifar_stem=image_size <= 64).eval()
    layers = []

    def record(name):
        def hook(module, inputs, output):
            _, c, h, w = inputs[0].shape
            layers.append(dict(name=name, channels=c, height=h, width=w, kernel_size=module.kernel_size,
                               stride=module.stride, groups=module.groups,
                               reduced=module.conv1.conv.out_channels))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if isinstance(m, Involution)]
    with torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    return layers
