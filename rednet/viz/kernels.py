"""What the involution kernels attend to: the paper's heat-maps, and the kernels at one point.

An involution generates a K x K kernel for each of its G groups at every output pixel: its kernel
generator's output, (B, G*K*K, Ho, Wo), which a forward hook captures. Summing each kernel's K*K
values, as the paper does (Li et al., CVPR 2021, Fig. 2), gives one map per group: large where the
kernel passes much of its neighbourhood on, which in a trained RedNet follows the object.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rednet.data.transforms import normalize_batch
from rednet.errors import ConfigError
from rednet.models.involution import Involution
from rednet.viz.images import grey, pyplot, show

HEATMAP_CMAP = "magma"  # monotonic in lightness: the order of values survives a greyscale print
KERNEL_CMAP = "viridis"
HEATMAP_COLUMNS = 8  # group maps per row
KERNEL_COLUMNS = 16  # K x K matrices per row
_STAGE_BLOCK = re.compile(r"layer\d+\.\d+")


def involution_layers(model: nn.Module) -> dict[str, Involution]:
    """Every involution of ``model`` under the name ``layers=`` takes: its block's for the involution
    of a residual block (``layer1.2``: stage 1, block 2, counted from 0 as in the state dict), its
    module path otherwise (``stem.1``)."""
    return {path.removeprefix("backbone.").removesuffix(".conv2"): module
            for path, module in model.named_modules() if isinstance(module, Involution)}


def resolve_layers(model: nn.Module, names, model_name: str) -> list[str]:
    """``names`` (a name or a list of them) checked against the model's involutions; None gives the
    last block of each stage."""
    available = list(involution_layers(model))
    if not available:
        raise ConfigError(f"model={model_name} has no involution layers to draw; visualize.py needs a RedNet")
    if names is None:
        last = {name.split(".")[0]: name for name in available if _STAGE_BLOCK.fullmatch(name)}
        return list(last.values()) or available
    names = [str(names)] if isinstance(names, (str, int, float)) else [str(name) for name in names]
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        culprit = f"{unknown[0]!r} is not an involution layer of {model_name}" if unknown else "no layer named"
        raise ConfigError(f"layers={names}: {culprit}; choose from: {', '.join(available)}")
    return names


@torch.no_grad()
def capture_kernels(model: nn.Module, images: torch.Tensor,
                    layers: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Runs ``model`` on ``images`` (eval mode, float32) and returns the kernels each named layer
    generated, as (B, G, K*K, Ho, Wo) float32 tensors on the CPU, and the logits."""
    modules = involution_layers(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, layer: Involution):
        def hook(module, inputs, output):
            b, _, h, w = output.shape
            captured[name] = output.detach().float().cpu().reshape(b, layer.groups, layer.kernel_size**2, h, w)
        return hook

    handles = [modules[name].conv2.register_forward_hook(keep(name, modules[name])) for name in layers]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(images.to(device)).float().cpu()
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return captured, logits


def kernel_heatmaps(kernels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, G, K*K, Ho, Wo) kernels -> (B, G, H, W): each kernel's values summed, one map per group,
    upsampled (bilinear) to the image's ``size``."""
    return F.interpolate(kernels.sum(2), size=size, mode="bilinear", align_corners=False)


def map_position(point: tuple[int, int], image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int]:
    """The pixel of an (Ho, Wo) map whose kernel sits over image pixel ``point`` = (y, x)."""
    return tuple(min(p * m // s, m - 1) for p, s, m in zip(point, image_size, map_size))


def kernels_at(kernels: torch.Tensor, position: tuple[int, int]) -> torch.Tensor:
    """(B, G, K*K, Ho, Wo) kernels -> the (B, G, K, K) kernels generated at map pixel ``position``."""
    b, g, kk = kernels.shape[:3]
    k = math.isqrt(kk)
    return kernels[:, :, :, position[0], position[1]].reshape(b, g, k, k)


# The figures are laid out by hand in inches, and each layer's groups are one image (a mosaic): with
# an axes per group, a figure took seconds to draw, and matplotlib's constrained layout a minute.
WIDTH = 13.0  # inches, at 100 dpi: 1300 px
LEFT = 2.9  # the input image's column
BAR = 1.0  # the colour bars' column
TITLE = 0.55  # the figure's title
HEADER = 0.3  # a layer's title


def _mosaic(values: np.ndarray, columns: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(G, h, w) -> one (rows * (band + h), columns * (w + gap)) array, NaN between the cells and in a
    band above each for its label, and where each label goes (x, y in the array's pixels)."""
    g, h, w = values.shape
    gap, band = max(1, round(0.1 * w)), max(2, round(0.22 * w))
    rows = math.ceil(g / columns)
    out = np.full((rows * (band + h), columns * (w + gap)), np.nan, dtype=np.float32)
    labels = []
    for i, v in enumerate(values):
        r, c = divmod(i, columns)
        top, left = r * (band + h) + band, c * (w + gap)
        out[top:top + h, left:left + w] = v
        labels.append((left - 0.5, top - 0.5 - band * 0.15))
    return out, labels


def _panels_figure(image: np.ndarray, panels: dict[str, np.ndarray], notes: dict[str, str], title: str,
                   columns: int, cell: float, cmap: str, bar_label: str, image_title: str, underlay=None):
    """The image on the left; on the right one panel per layer: its (G, h, w) values as a grid of
    ``columns`` cells per row, ``cell`` inches wide, each labelled with its group, on one colour
    scale shown in a bar at the panel's right. ``underlay`` (h, w), if given, is drawn in grey under
    every cell. Returns the figure and the image's axes."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    plt = pyplot()
    colours = colormaps[cmap].with_extremes(bad=(1, 1, 1, 0))  # NaN: transparent
    mosaics = {name: _mosaic(values, columns) for name, values in panels.items()}
    grid_width = columns * cell
    heights = [grid_width * m.shape[0] / m.shape[1] for m, _ in mosaics.values()]
    body = max(sum(HEADER + h for h in heights), 3.0)
    height = TITLE + body + 0.15
    fig = plt.figure(figsize=(WIDTH, height))
    fig.suptitle(title, fontsize=12, y=1 - 0.12 / height, va="top")

    def box(x: float, top: float, w: float, h: float) -> list[float]:  # inches from the top left
        return [x / WIDTH, 1 - (top + h) / height, w / WIDTH, h / height]

    side = LEFT - 0.4
    image_h = min(side * image.shape[0] / image.shape[1], body - 0.4)
    image_ax = fig.add_axes(box(0.2, TITLE + (body - image_h) / 2, side, image_h))
    show(image_ax, image)
    image_ax.set_title(image_title, fontsize=10)

    top = TITLE
    for (name, values), (mosaic, labels), h in zip(panels.items(), mosaics.values(), heights):
        fig.text(LEFT / WIDTH, 1 - (top + HEADER * 0.7) / height, f"{name}: {notes[name]}", fontsize=10)
        ax = fig.add_axes(box(LEFT, top + HEADER, grid_width, h))
        ax.set_axis_off()
        if underlay is not None:
            ax.imshow(_mosaic(np.broadcast_to(underlay, values.shape), columns)[0], cmap="gray", vmin=0, vmax=1)
        norm = Normalize(float(values.min()), float(values.max()))
        im = ax.imshow(mosaic, cmap=colours, norm=norm, alpha=None if underlay is None else 0.75)
        for g, (x, y) in enumerate(labels):
            ax.text(x, y, f"g{g}", fontsize=7, va="bottom", ha="left")
        bar = fig.colorbar(im, cax=fig.add_axes(box(WIDTH - BAR + 0.1, top + HEADER, 0.14, h)))
        bar.solids.set_alpha(1)  # the scale, not the blend with the image
        bar.set_label(bar_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
        top += HEADER + h
    return fig, image_ax


def heatmap_figure(image: np.ndarray, heatmaps: dict[str, torch.Tensor], title: str, notes: dict[str, str]):
    """The image, then one panel per layer with a map per group laid over the image.

    ``image`` is (H, W, C) in [0, 1]; ``heatmaps`` maps a layer's name to its (G, H, W) maps; a
    layer's maps share one colour scale, shown beside them; ``notes`` says per layer what its maps are.
    """
    panels = {name: maps.numpy() for name, maps in heatmaps.items()}
    fig, _ = _panels_figure(image, panels, notes, title, HEATMAP_COLUMNS, 1.1, HEATMAP_CMAP, "kernel sum", "input",
                            underlay=grey(image))
    return fig


def kernels_figure(image: np.ndarray, point: tuple[int, int], kernels: dict[str, torch.Tensor], title: str,
                   notes: dict[str, str]):
    """The image with ``point`` = (y, x) marked, then one panel per layer with the K x K kernel of
    each group generated there (``kernels`` maps a layer's name to its (G, K, K) kernels), one colour
    scale per layer."""
    panels = {name: k.numpy() for name, k in kernels.items()}
    fig, ax = _panels_figure(image, panels, notes, title, KERNEL_COLUMNS, 0.55, KERNEL_CMAP, "weight",
                             f"input, point (y, x) = ({point[0]}, {point[1]})")
    # A black cross under a white one: visible on any image, in colour or grey.
    for colour, width, size in (("black", 5.0, 18), ("white", 2.0, 15)):
        ax.plot(point[1], point[0], marker="+", markersize=size, markeredgewidth=width, color=colour)
    return fig


# -- one image's figures, for visualize.py and for TensorBoard (trainer.log_kernels) --------------

LOGGED_IMAGES = 4  # trainer.log_kernels: the first validation images, the same ones at every validation


@dataclass
class Sample:
    name: str  # for titles and file names
    image: torch.Tensor  # (C, H, W) uint8, as the data's transforms give it
    target: int | None = None  # the true class, where known


def first_validation_images(val_set, count: int) -> list[Sample]:
    """The first ``count`` readable images of the validation set (an unreadable one under
    ``data.bad_images=skip`` is passed over)."""
    samples = []
    for index in range(len(val_set)):
        if len(samples) == count:
            break
        item = val_set[index]
        if item is not None:
            samples.append(Sample(f"val{index:05d}", item[0], int(item[1])))
    return samples


def _layer_notes(model: nn.Module, kernels: dict[str, torch.Tensor]) -> dict[str, str]:
    layers = involution_layers(model)
    notes = {}
    for name, k in kernels.items():
        layer = layers[name]
        ks, (h, w) = layer.kernel_size, k.shape[-2:]
        notes[name] = (f"{layer.groups} groups of {layer.channels // layer.groups} channels, {ks}x{ks} kernels "
                       f"on a {h}x{w} map (stride {layer.stride})")
    return notes


def _title(sample: Sample, logits: torch.Tensor, class_names: list[str]) -> str:
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    title = f"{sample.name}: predicted {class_names[int(pred)]} ({float(conf):.0%})"
    return title + (f", true {class_names[sample.target]}" if sample.target is not None else "")


def draw(model: nn.Module, sample: Sample, layers: list[str], mean, std, class_names: list[str],
         point: tuple[int, int] | None = None):
    """One image's heat-map figure and, given a ``point``, its kernels-at-a-point figure (else None),
    from one forward pass."""
    kernels, logits = capture_kernels(model, normalize_batch(sample.image[None], mean, std), layers)
    size = tuple(sample.image.shape[-2:])
    image = sample.image.permute(1, 2, 0).float().div(255).numpy()
    title, notes = _title(sample, logits[0], class_names), _layer_notes(model, kernels)
    heatmaps = heatmap_figure(image, {name: kernel_heatmaps(k, size)[0] for name, k in kernels.items()}, title, notes)
    if point is None:
        return heatmaps, None
    where = {name: map_position(point, size, tuple(k.shape[-2:])) for name, k in kernels.items()}
    at = {name: kernels_at(k, where[name])[0] for name, k in kernels.items()}
    notes = {name: f"{note}; at map pixel {where[name]}" for name, note in notes.items()}
    return heatmaps, kernels_figure(image, point, at, title, notes)


def log_kernel_heatmaps(writer, model: nn.Module, data, data_cfg, step: int) -> None:
    """TensorBoard: the heat-maps of the first validation images (``kernels/val00000``, ...), so
    that they can be watched forming over the epochs."""
    layers = resolve_layers(model, None, "the model")
    for sample in first_validation_images(data.val_set, LOGGED_IMAGES):
        fig, _ = draw(model, sample, layers, data_cfg.mean, data_cfg.std, list(data.class_names))
        writer.add_figure(f"kernels/{sample.name}", fig, step, close=True)
