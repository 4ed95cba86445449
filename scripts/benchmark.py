"""Timing and memory measurement shared by ``scripts/bench_*.py``."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rednet.models import Involution, create_model


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


# -- where a step's time and bytes go ------------------------------------------------------------

# (category, substrings of an operator's or a GPU kernel's lower-cased name); the first match wins,
# so BatchNorm's cuDNN kernels ("bn_fw") are not taken for convolutions, nor addmm for an add.
CATEGORIES = (
    ("involution", ("involution", "_forward_kernel", "_grad_x_kernel", "_grad_weight_kernel", "_fused_grad")),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("convolution", ("conv", "gemm", "xmma", "cudnn", "cutlass", "wgrad", "dgrad", "fprop", "nchwtonhwc",
                     "nhwctonchw")),
    ("pooling", ("pool", "aten::mean", "aten.mean")),
    ("head & loss", ("mm", "softmax", "nll_loss")),
    ("elementwise", ("relu", "threshold", "add", "mul", "div", "copy", "clone", "fill", "elementwise", "triton_poi",
                     "memcpy", "memset", "where", "sum", "zero")),
)
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES) + ("other",)


def categorize(name: str) -> str:
    """The kind of work an operator (``aten::cudnn_convolution``, ``aten.native_batch_norm.default``)
    or a GPU kernel (``batch_norm_collect_statistics_kernel``, ``triton_red_fused__native_batch_norm_...``)
    does: one of :data:`CATEGORY_NAMES`."""
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


@dataclass
class OpCost:
    """One operator call of a training step: what it is, where it ran, and its work."""

    op: str
    category: str
    module: str  # the innermost module that ran it ("" for the loss and the optimizer)
    phase: str  # forward | backward | optimizer
    flops: float
    bytes: int  # each input read once and each output written once: what the operator must move
    matrix: bool  # its FLOPs run on the matrix units (convolutions, products); else on vector units

    def floor_s(self, bandwidth: float, matrix_flops: float, vector_flops: float) -> float:
        """The operator's least time: its bytes at ``bandwidth`` or its FLOPs at the units' rate."""
        return max(self.bytes / bandwidth, self.flops / (matrix_flops if self.matrix else vector_flops))


# Operators that move no data: views, allocations and bookkeeping.
_FREE = {"aten._unsafe_view", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.lift_fresh", "prim.device",
         "aten._local_scalar_dense", "aten.detach", "aten.alias", "aten.set_"}


def _involution_flops(func, args) -> float:
    """2 per multiply-add: K*K per output element, for the forward and for each gradient asked for."""
    backward = "backward" in str(func)
    if "fused" in str(func):  # (x, reduced, conv2 weight, bias, K, ...): the generator's product, then the involution
        x, reduced, weight, _, kernel_size = args[1:6] if backward else args[:5]
        b, c = x.shape[:2]
        k2g, cr = weight.shape[:2]
        ho, wo = reduced.shape[2:]
        forward = 2.0 * b * ho * wo * (k2g * cr + c * kernel_size * kernel_size)
        return 2 * forward if backward else forward  # the backward's is an estimate: it recomputes the kernel
    b, c = args[0].shape[:2]  # x, or grad_out in the backward: the same batch and channels
    k2, ho, wo = (args[2] if backward else args[1]).shape[2:]
    per_pass = 2.0 * b * c * k2 * ho * wo
    return per_pass * (int(args[-2]) + int(args[-1])) if backward else per_pass  # need_x, need_w


def count_step(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
               autocast_dtype: torch.dtype | None = None, memory_format=torch.contiguous_format) -> list[OpCost]:
    """Every operator of one SGD training step (forward, cross-entropy, backward, optimizer step) with
    its FLOPs and the bytes it must move, without computing anything.

    The model and data become fake tensors (shapes and dtypes, no storage), so a RedNet-152 step at
    batch 256 is counted on a laptop in seconds. ``autocast_dtype`` runs the forward under the CPU's
    autocast, whose casting rules for convolutions and matrix products match CUDA's. The step is
    taken twice and the second one counted, so the optimizer's momentum buffers already exist, as in
    every step but the first.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    model = model.to(memory_format=memory_format)
    fake = FakeTensorMode()
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = torch.nn.Parameter(fake.from_tensor(p.detach()), p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = fake.from_tensor(b)
    costs: list[OpCost] = []
    state = {"phase": "forward", "record": False, "backward_module": ""}
    names = {m: name for name, m in model.named_modules()}
    forward_stack: list[str] = []
    named_nodes: set[int] = set()

    # Forward: the innermost module whose forward is running. Backward: autograd runs each node's
    # pre-hook just before the node, so the node made by a module's forward names that module.
    def enter(module, inputs):
        forward_stack.append(names[module])

    def leave(module, inputs, output):
        forward_stack.pop()
        for t in tree_leaves(output):
            node = getattr(t, "grad_fn", None)
            if node is not None and id(node) not in named_nodes:  # children run first: keep the innermost
                named_nodes.add(id(node))
                node.register_prehook(lambda grads, name=names[module]: state.update(backward_module=name))

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
            name = name.replace("::", ".")
            returns = getattr(func, "_schema", None) and func._schema.returns
            is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
            if not state["record"] or name in _FREE or is_view:
                return out
            inputs = {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            outputs = {id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            moved = sum(t.numel() * t.element_size() for t in (*inputs.values(), *outputs.values()))
            flops, matrix = 0.0, False
            if "involution" in name:
                flops = _involution_flops(func, args)
            elif getattr(func, "overloadpacket", None) in flop_registry:
                flops, matrix = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)), True
            if state["phase"] == "forward":
                module = forward_stack[-1] if forward_stack else ""
            else:
                module = state["backward_module"] if state["phase"] == "backward" else ""
            category = "optimizer" if state["phase"] == "optimizer" else categorize(name)
            costs.append(OpCost(name, category, module, state["phase"], flops, moved, matrix))
            return out

    with fake:
        images = fake.from_tensor(images).contiguous(memory_format=memory_format)
        target = fake.from_tensor(target)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
        hooks = [h for m in model.modules()
                 for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        with Recorder():
            for record in (False, True):
                state.update(phase="forward", record=record)
                with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    loss = torch.nn.functional.cross_entropy(model(images).float(), target)
                state["phase"] = "backward"
                loss.backward()
                state["phase"] = "optimizer"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
    return costs
