"""Export a model to ONNX, check the file against PyTorch, and write it with its sidecar.

``export.py ckpt=...`` runs :func:`export_checkpoint`; code can call :func:`export_onnx` on any
RedNet or ResNet from :mod:`rednet.models`. The steps:

1. PyTorch's TorchScript-based exporter traces the model with each involution as one placeholder
   node (the involution is a PyTorch custom operator, which no exporter knows how to write);
2. :func:`rednet.deploy.fold.fold_batchnorm` folds every BatchNorm into the convolution before it,
   or into a Mul + Add after an involution;
3. :func:`rednet.deploy.involution.expand_involutions` writes each placeholder in standard
   operators (by default two matrix products, which absorb the kernel generator's last 1x1
   convolution);
4. the file must pass ``onnx.checker`` with only standard operators, and ONNX Runtime must give
   PyTorch's logits on two batches (two batch sizes, the export size and an odd size). Only then
   is it renamed into place: a file that disagrees is never left behind.

Why not the dynamo exporter: it took over 20 minutes to export RedNet-26 with dynamic height and
width on this project's 2-core CPU (torch 2.14), where the TorchScript exporter takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rednet.deploy.fold import fold_batchnorm
from rednet.deploy.involution import DEFAULT, DOMAIN, OP_TYPE, Geometry, expand_involutions, for_input
from rednet.deploy.runtime import INPUT, OUTPUT, require, session, sidecar_path
from rednet.engine.trained import Trained
from rednet.errors import DeployError
from rednet.io import atomic_write_all
from rednet.models.involution import Involution
from rednet.ops import involution

OPSET = 17  # ONNX Runtime 1.14+, TensorRT 8.6+, OpenVINO 2023+
# The exporter's output must match PyTorch within this, relative to the logits' largest magnitude
# (at least 1): fp32 rounding differs between the two, by about 1e-6 in the measured models.
TOLERANCE = 1e-4

log = logging.getLogger("rednet")


class _Placeholder(torch.autograd.Function):
    """The involution, traced as one ``rednet::Involution`` node carrying its geometry."""

    @staticmethod
    def forward(ctx, x, kernels, geo: Geometry):
        b, _, ho, wo = kernels.shape
        return involution(x, kernels.view(b, geo.groups, geo.taps, ho, wo), geo.kernel_size, geo.stride,
                          geo.dilation)

    @staticmethod
    def symbolic(g, x, kernels, geo: Geometry):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", x, kernels, kernel_size_i=geo.kernel_size, stride_i=geo.stride,
                   dilation_i=geo.dilation, channels_i=geo.channels, groups_i=geo.groups, chunk_i=geo.chunk,
                   samples_i=geo.samples, tile_i=geo.tile)
        out.setType(x.type())  # rank and dtype; the sizes are dynamic anyway
        return out


def _placeholder_forward(self: Involution, x: torch.Tensor) -> torch.Tensor:
    kernels = self.conv2(self.conv1(self.avgpool(x)))
    geo = for_input(Geometry(self.kernel_size, self.stride, 1, self.channels, self.groups), *x.shape[-2:])
    return _Placeholder.apply(x, kernels, geo)


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Every Involution of ``model`` traced as a placeholder, for the duration of the export."""
    layers = [m for m in model.modules() if isinstance(m, Involution)]
    for m in layers:
        m.forward = types.MethodType(_placeholder_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def to_onnx(model: nn.Module, in_chans: int, image_size: int, formulation: str = DEFAULT):
    """The ONNX model (an ``onnx.ModelProto``) of ``model`` in eval mode: input ``images``
    (batch, in_chans, height, width) float32, output ``logits`` (batch, classes), dynamic batch,
    height and width, BatchNorm folded, involutions in standard operators. ``image_size`` is the
    size traced at; it only sets the involutions' loop chunks and tiles (speed and memory)."""
    onnx = require("onnx")
    model = model.eval()
    sample = torch.zeros(1, in_chans, image_size, image_size)
    buffer = io.BytesIO()
    has_involution = any(isinstance(m, Involution) for m in model.modules())
    with _traceable(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, (sample,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], custom_opsets={DOMAIN: 1} if has_involution else None,
                          do_constant_folding=False,
                          dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    fold_batchnorm(proto)
    expand_involutions(proto, formulation)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def op_types(proto) -> dict[str, int]:
    """How many nodes of each operator type ``proto`` has, Loop bodies included, as
    ``domain::type`` for operators outside the standard domain."""
    counts: dict[str, int] = {}

    def visit(graph) -> None:
        for node in graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g.node:
                    visit(attr.g)

    visit(proto.graph)
    return counts


def verification_inputs(in_chans: int, image_size: int) -> list[torch.Tensor]:
    """Two batches that exercise the dynamic axes: 2 images at the export size, 3 at an odd size."""
    generator = torch.Generator().manual_seed(0)
    odd = max(5, image_size - image_size // 8) | 1
    return [torch.randn(2, in_chans, image_size, image_size, generator=generator),
            torch.randn(3, in_chans, odd, odd, generator=generator)]


def max_difference(model: nn.Module, onnx_bytes: bytes, inputs: list[torch.Tensor]) -> float:
    """The largest difference between ONNX Runtime's and PyTorch's logits over ``inputs``,
    relative to the logits' largest magnitude (at least 1)."""
    run = session(onnx_bytes)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model.eval()(x).numpy()
            if not np.isfinite(expected).all():
                raise DeployError("the model's own logits are not finite (NaN or inf) on a random batch, so there "
                                  "is nothing to compare the export with; is the checkpoint from a diverged run?")
            got = run.run([OUTPUT], {INPUT: x.numpy()})[0]
            if got.shape != expected.shape or not np.isfinite(got).all():
                return float("inf")
            worst = max(worst, float(np.abs(got - expected).max()) / max(1.0, float(np.abs(expected).max())))
    return worst


def export_onnx(model: nn.Module, path: str | Path, in_chans: int, image_size: int, meta: dict | None = None,
                formulation: str = DEFAULT) -> dict:
    """Writes ``model`` to ``path`` (ONNX) and its sidecar ``path`` with ``.json``, once ONNX
    Runtime has been checked to match PyTorch. Returns the sidecar's contents.

    ``meta`` goes into the sidecar (class names, mean and std, the config: whatever eval.py needs).
    Both files are written to temporary names and renamed only when everything succeeded; on any
    failure neither is left behind and :class:`~rednet.errors.DeployError` says why.
    """
    path = Path(path)
    side = sidecar_path(path)
    if path.suffix != ".onnx":
        raise DeployError(f"out={path} must end in .onnx (its sidecar goes to the same name with .json)")
    check_writable(path)  # before the slow part
    model = model.float().cpu().eval()
    proto = to_onnx(model, in_chans, image_size, formulation)
    data = proto.SerializeToString()
    inputs = verification_inputs(in_chans, image_size)
    error = max_difference(model, data, inputs)
    if not error <= TOLERANCE:
        raise DeployError(f"the exported {path.name} disagrees with PyTorch (logits differ by {error:.2e} of "
                          f"their scale, more than {TOLERANCE:g}); nothing was written. This is a bug: please "
                          f"report it with the model and the checkpoint")
    info = {**(meta or {}), "in_chans": in_chans, "image_size": image_size, "input": INPUT, "output": OUTPUT,
            "opset": OPSET, "involution": formulation,
            "verified": {"max_difference": error, "shapes": [list(x.shape) for x in inputs]}}
    # Both files are written before either is renamed: a model.onnx never sits beside another's sidecar.
    atomic_write_all({path: data, side: json.dumps(info, indent=2)}, "export")
    return info


def check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise DeployError(f"cannot write {path}: {e.strerror or e}; choose another out=path/to/model.onnx") from None


def export_checkpoint(cfg: DictConfig, trained: Trained) -> Path:
    """``export.py``: exports ``trained`` (what ``cfg.ckpt`` holds) to ``cfg.out``, by default
    ``model.onnx`` beside the checkpoint, and prints what it wrote. The cheap checks (the output
    path, the checkpoint) come before the [deploy] extra is asked for."""
    if trained.runtime != "torch":
        raise DeployError(f"{trained.path} is already an export; export.py takes a checkpoint (.pt or .pth)")
    out = Path(cfg.out) if cfg.out else trained.path.with_name("model.onnx")
    check_writable(out)
    num_classes = trained.require_classifier("export.py")
    require("onnx", "onnxruntime")
    d = cfg.data
    # The fused generator (model.fused_generator) is a Triton operator with no ONNX counterpart; the
    # same weights run unfused, which is what the file computes and what it is checked against.
    model = trained.build(OmegaConf.merge(cfg.model, {"fused_generator": False}), num_classes, d.in_chans,
                          d.image_size)
    containers = {group: OmegaConf.to_container(cfg[group], enum_to_str=True) for group in ("model", "data")}
    meta = {"model": cfg.model.name, "class_names": trained.class_names, "num_classes": num_classes,
            "mean": list(d.mean), "std": list(d.std), "checkpoint": str(trained.path), "config": containers}
    info = export_onnx(model, out, d.in_chans, d.image_size, meta)
    log.info(f"wrote {out} and {sidecar_path(out)}: {cfg.model.name}, {num_classes} classes, input (batch, "
             f"{d.in_chans}, height, width) normalised with the data's mean and std ({d.image_size} px as trained); "
             f"ONNX Runtime matches PyTorch to {info['verified']['max_difference']:.1e}")
    return out
