"""``visualize.py``: kernel heat-maps and the kernels at one point for a checkpoint and some images."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from rednet.data import build_datamodule
from rednet.data.files import image_files, load_image
from rednet.engine.precision import resolve_device
from rednet.engine.trained import Trained
from rednet.errors import ConfigError
from rednet.viz.images import save_figure
from rednet.viz.kernels import Sample, draw, first_validation_images, resolve_layers

log = logging.getLogger("rednet")


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
        image = load_image(path, in_chans, cfg.data.image_size)
        samples.append(Sample(name, image))
    return samples


def visualize_checkpoint(cfg: DictConfig, trained: Trained, run_dir: str | Path) -> list[Path]:
    """``visualize.py``: draws ``trained`` (what ``cfg.ckpt`` holds) on ``cfg.images``, or on the
    first validation images of ``cfg.data``, into ``run_dir``: per image ``<name>_heatmaps.png`` and
    ``<name>_kernels.png``. Every input is checked before anything is drawn."""
    if cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} must be at least 1")
    if trained.runtime != "torch":
        raise ConfigError(f"{trained.path} runs in {trained.runtime}, where its kernels cannot be watched; pass the "
                          f"checkpoint it was exported from")
    num_classes = trained.require_classifier("visualize.py")
    if cfg.images is None:
        data = build_datamodule(cfg.data)
        class_names, in_chans, where = list(data.class_names), data.in_chans, f"data={cfg.data.name}"
        samples = first_validation_images(data.val_set, cfg.num_images)
    else:  # the user's own images: the model's classes and channels are the file's
        class_names = trained.class_names or [str(i) for i in range(num_classes)]
        in_chans, where = trained.in_chans or cfg.data.in_chans, f"images={cfg.images}"
        samples = _file_samples(cfg, in_chans)
    points = _check_point(cfg.point, samples)
    model = trained.model_for(cfg, class_names, in_chans, where, "visualize.py")
    layers = resolve_layers(model, cfg.layers, cfg.model.name)
    model.to(resolve_device(str(cfg.trainer.device)))

    run_dir = Path(run_dir)
    written = []
    for sample, point in zip(samples, points):
        heatmaps, kernels = draw(model, sample, layers, cfg.data.mean, cfg.data.std, class_names, point)
        written.append(save_figure(heatmaps, run_dir / f"{sample.name}_heatmaps.png"))
        written.append(save_figure(kernels, run_dir / f"{sample.name}_kernels.png"))
    log.info(f"{cfg.model.name} ({trained.path}): heat-maps and kernels of {len(samples)} image(s) at "
             f"{', '.join(layers)}, in {run_dir}")
    return written
