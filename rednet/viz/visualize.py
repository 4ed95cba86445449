"""``visualize.py``: kernel heat-maps and the kernels at one point for a checkpoint and some images;
and the same heat-maps in TensorBoard during training (``trainer.log_kernels=true``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rednet.errors import CheckpointError, ConfigError
from rednet.viz.images import denormalize, image_files, load_image, save_figure
from rednet.viz.kernels import (
    capture_kernels,
    heatmap_figure,
    involution_layers,
    kernel_heatmaps,
    kernels_at,
    kernels_figure,
    map_position,
    resolve_layers,
)

log = logging.getLogger("rednet")
LOGGED_IMAGES = 4  # trainer.log_kernels: the first validation images, the same ones at every validation


@dataclass
class Sample:
    name: str  # for titles and file names
    image: torch.Tensor  # (C, H, W), normalised as the model expects
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
    kernels, logits = capture_kernels(model, sample.image[None], layers)
    size = tuple(sample.image.shape[-2:])
    image = denormalize(sample.image, mean, std)
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


def _check_point(point, samples: list[Sample]) -> list[tuple[int, int]]:
    """Each image's point: ``point`` = [y, x] inside every image, or each image's centre."""
    sizes = [tuple(s.image.shape[-2:]) for s in samples]
    if point is None:
        return [(h // 2, w // 2) for h, w in sizes]
    point = list(point)
    for sample, (h, w) in zip(samples, sizes):
        if len(point) != 2 or not (0 <= point[0] < h and 0 <= point[1] < w):
            raise ConfigError(f"point={point} is not a pixel of {sample.name} ({h}x{w} as the model sees it); "
                              f"give point=[y,x] with y in 0..{h - 1} and x in 0..{w - 1}, or leave it out for "
                              f"the centre")
    return [tuple(point)] * len(samples)


def _file_samples(cfg, in_chans: int) -> list[Sample]:
    files = image_files(cfg.images)
    if len(files) > cfg.num_images:
        log.info(f"drawing the first {cfg.num_images} of the {len(files)} images in {cfg.images} "
                 f"(num_images={cfg.num_images})")
    root = Path(cfg.images)
    samples = []
    for path in files[:cfg.num_images]:
        name = path.stem if path == root else "_".join(path.relative_to(root).with_suffix("").parts)
        image = load_image(path, in_chans, cfg.data.image_size, cfg.data.mean, cfg.data.std)
        samples.append(Sample(name, image))
    return samples


def visualize_checkpoint(cfg, ckpt: dict, run_dir: str | Path) -> list[Path]:
    """``visualize.py``: draws ``ckpt`` (the contents of ``cfg.ckpt``) on ``cfg.images``, or on the
    first validation images of ``cfg.data``, into ``run_dir``: per image ``<name>_heatmaps.png`` and
    ``<name>_kernels.png``. Every input is checked before anything is drawn."""
    from rednet.engine.evaluate import check_class_names
    from rednet.engine.precision import resolve_device
    from rednet.models import build_model, load_weights
    from rednet.models.weights import state_dict_of

    if cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} must be at least 1")
    head = state_dict_of(ckpt).get("head.fc.weight")
    if head is None:
        raise CheckpointError(f"checkpoint {cfg.ckpt} has no classifier (head.fc.weight); visualize.py needs a "
                              f"whole model")
    class_names = ckpt.get("class_names") or [str(i) for i in range(head.shape[0])]
    in_chans = cfg.data.in_chans
    if cfg.images is None:
        from rednet.data import build_datamodule

        data = build_datamodule(cfg.data)
        check_class_names(ckpt.get("class_names"), list(data.class_names), f"checkpoint {cfg.ckpt}",
                          f"data={cfg.data.name}")
        class_names, in_chans = list(data.class_names), data.in_chans
        samples = first_validation_images(data.val_set, cfg.num_images)
    else:
        samples = _file_samples(cfg, in_chans)
    points = _check_point(cfg.point, samples)
    if len(class_names) != head.shape[0]:
        raise CheckpointError(f"checkpoint {cfg.ckpt} has {head.shape[0]} classes but data={cfg.data.name} has "
                              f"{len(class_names)}; use data with the same classes")

    model = build_model(cfg.model, len(class_names), in_chans, cfg.data.image_size)
    load_weights(model, ckpt, name=str(cfg.ckpt))
    layers = resolve_layers(model, cfg.layers, cfg.model.name)
    model.to(resolve_device(cfg.trainer.device)).eval()

    run_dir = Path(run_dir)
    written = []
    for sample, point in zip(samples, points):
        heatmaps, kernels = draw(model, sample, layers, cfg.data.mean, cfg.data.std, class_names, point)
        written.append(save_figure(heatmaps, run_dir / f"{sample.name}_heatmaps.png"))
        written.append(save_figure(kernels, run_dir / f"{sample.name}_kernels.png"))
    print(f"{cfg.model.name} ({cfg.ckpt}): heat-maps and kernels of {len(samples)} image(s) at "
          f"{', '.join(layers)}, in {run_dir}")
    return written
