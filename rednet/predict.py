"""Classifying one's own images with a trained model: ``predict.py`` / ``rednet-predict`` and the
Python API, :class:`Predictor`.

An image goes through exactly what the checkpoint's validation images went through in eval.py:
:func:`rednet.data.transforms.eval_transform` of the file's data config (resize, centre crop, grey
or RGB) and :func:`rednet.data.transforms.normalize_batch` with its mean and std, so a file of the
validation set gets the class eval.py counted for it (timm issue 49 is the opposite). Where a
user's picture needs more than the validation data ever did, it is converted as a viewer would
show it, before that transform:

- a JPEG with an EXIF orientation is turned upright (cameras and phones store it on its side);
- a 16-bit PNG is scaled to 8 bits (PIL's own conversion clips every value above 255 to white);
- alpha is dropped and CMYK, palette, grey and RGB convert to the model's mode by PIL's
  ``convert``, as torchvision's ImageFolder and eval.py read them.

Arrays and tensors given to the API are pictures too: numpy (height, width[, channels]) and torch
(channels, height, width) or (height, width), uint8 0-255 or float 0-1, with 1, 3 or 4 channels;
they go through the same transform as a file.

Images are decoded on a background thread while the model works on the previous batch.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

import rednet.deploy.runtime  # noqa: F401  (registers .onnx files with open_trained)
from rednet.config import PredictConfig, register_configs
from rednet.data.files import find_images
from rednet.data.transforms import IMAGE_ERRORS, check_pixels, eval_transform
from rednet.engine.context import setup_run
from rednet.engine.feed import DeviceFeed
from rednet.engine.precision import autocast
from rednet.engine.trained import Trained, config_for, open_trained
from rednet.errors import ConfigError, DataError
from rednet.io import atomic_write, write_json
from rednet.viz.images import pyplot, save_figure

log = logging.getLogger("rednet")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
DEFAULT_TOPK = 5
PRINTED = 20  # up to this many images, each gets a line on stdout
SHOWN = 48  # predictions.png draws at most this many images
EXIF_ORIENTATION = 0x0112

Input = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class Guess(NamedTuple):
    class_name: str
    index: int
    probability: float


@dataclass
class Prediction:
    """What the model says about one image: its top-1 class (``class_name``, ``index``,
    ``probability``) and the ``topk`` guesses, most probable first. An image that could not be
    read has ``error`` set and no class."""

    source: str  # the file's path, or "<image i>" for an image given in memory
    class_name: str | None
    index: int | None
    probability: float | None
    topk: list[Guess] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["topk"] = [g._asdict() for g in self.topk]
        return out


# -- an input as the transform's source ---------------------------------------------------------------

def _upright_8bit(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says, and 16-bit grey scaled to 8 bits."""
    check_pixels(image.width, image.height)
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG's "I;16", some TIFFs' "I"): PIL's convert("L") would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) // 257).clip(0, 255).astype(np.uint8), "L")
    return image


def _file_source(path: Path) -> bytes | Image.Image:
    """A file as the eval transform's source: its bytes as they are (the fast JPEG path, and
    exactly what eval.py reads), or a PIL image where it must be turned or rescaled first."""
    data = path.read_bytes()
    image = Image.open(io.BytesIO(data))  # the header only
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1 and not image.mode.startswith("I"):
        return data
    return _upright_8bit(image)


def _array_image(array: np.ndarray, what: str) -> Image.Image:
    """A (height, width[, channels]) array, uint8 0-255 or float 0-1, as a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise DataError(f"{what} has shape {tuple(array.shape)}; give an image as (height, width) or (height, "
                        f"width, 1|3|4) for numpy, (1|3|4, height, width) or (height, width) for a tensor")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{what} is of type {array.dtype}; give uint8 (0-255) or float (0-1) pixels")
        if np.issubdtype(array.dtype, np.floating):
            array = np.rint(np.clip(array, 0, 1) * 255)
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def to_source(item: Input, position: int) -> tuple[str, Any]:
    """(its name in the results, what the eval transform takes) for one input of the API."""
    if isinstance(item, (str, os.PathLike)):
        return str(item), _file_source(Path(item))
    name = f"<image {position}>"
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or name, _upright_8bit(item)
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)  # torch's (C, H, W) as numpy's (H, W, C)
        return name, _array_image(tensor.numpy(), f"{name} (a tensor)")
    if isinstance(item, np.ndarray):
        return name, _array_image(item, f"{name} (an array)")
    raise DataError(f"{name} is a {type(item).__name__}; give a path, a PIL image, a numpy array or a tensor")


# -- the predictor ------------------------------------------------------------------------------------

def compose_predict_config(overrides: Sequence[str]) -> DictConfig:
    """predict.py's config for ``overrides``, as the command line would compose it."""
    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config folder
        return compose(config_name="predict", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


class Predictor:
    """A trained model that names what is in pictures::

        predictor = Predictor("outputs/train/.../best.pt")
        predictor("cat.jpg")          # -> Prediction(class_name='cat', index=3, probability=0.91, ...)
        predictor(["a.jpg", array])   # -> [Prediction, Prediction]

    ``source`` is a checkpoint (``.pt``), an official ``.pth`` (with ``model="rednet26"``), an
    exported ``.onnx`` (with its sidecar; it runs in ONNX Runtime on the CPU), or a model in
    memory: then ``data`` gives its eval transform and normalisation (``image_size``, ``mean``,
    ``std``, ``in_chans``, optionally ``val_resize``) and ``class_names`` its classes.
    ``overrides`` are predict.py's command-line keys (``["data.val_resize=256"]``).
    """

    def __init__(self, source: str | os.PathLike | nn.Module, *, model: str | None = None,
                 data: dict | DictConfig | None = None, class_names: Sequence[str] | None = None,
                 device: str = "auto", batch_size: int | None = None, topk: int | None = None,
                 overrides: Sequence[str] = ()) -> None:
        if isinstance(source, nn.Module):
            self._from_module(source, data, class_names, device, batch_size or 32)
        else:
            # No ckpt= among them: a path with spaces or quotes would need Hydra's quoting, and
            # config_for takes the file itself.
            keys = ["images=[]", f"trainer.device={device}", *overrides]
            keys += [f"model={model}"] if model else []
            keys += [f"data.batch_size={batch_size}"] if batch_size else []
            trained = open_trained(source)
            self._from_trained(config_for(compose_predict_config(keys), trained, keys), trained)
        self.topk = self.check_topk(topk)

    @classmethod
    def from_config(cls, cfg: DictConfig, trained: Trained) -> Predictor:
        """predict.py's predictor: ``cfg`` already completed from ``trained`` (:func:`config_for`)."""
        predictor = cls.__new__(cls)
        predictor._from_trained(cfg, trained)
        predictor.topk = predictor.check_topk(cfg.topk)
        return predictor

    def _from_trained(self, cfg: DictConfig, trained: Trained) -> None:
        trained.settle_runtime(cfg)
        if cfg.trainer.strategy != "single":
            raise ConfigError("predict.py runs in one process; drop trainer=ddp")
        num_classes = trained.require_classifier("predict.py")
        # Official releases name no classes: their indices stand in (the project ships no ImageNet names).
        names = list(trained.class_names or [str(i) for i in range(num_classes)])
        # The transform's mode is the data config's: a file that says otherwise is refused here.
        model = trained.model_for(cfg, names, cfg.data.in_chans, "the data config", "predict.py")
        ctx = setup_run(cfg, ".")
        self._setup(model, cfg.data, names, ctx.device, ctx.dtype, ctx.channels_last, cfg.data.batch_size)
        self.trained, self.cfg = trained, cfg

    def _from_module(self, model: nn.Module, data, class_names, device: str, batch_size: int) -> None:
        if data is None:
            raise ConfigError("Predictor(model) needs data=dict(image_size=..., mean=[...], std=[...], in_chans=...): "
                              "the transform and normalisation it was trained with")
        data = OmegaConf.merge({"val_resize": None, "in_chans": len(data["mean"])}, OmegaConf.create(dict(data)))
        cfg = OmegaConf.structured(PredictConfig)  # only its trainer group: device, precision, memory layout
        try:
            cfg.trainer.device = device
        except ValidationError:
            raise ConfigError(f"device={device!r}: choose auto, cpu or cuda") from None
        ctx = setup_run(cfg, ".")
        num_classes = getattr(getattr(getattr(model, "head", None), "fc", None), "out_features", None)
        names = list(class_names) if class_names is not None else None
        if names is None and num_classes is None:
            raise ConfigError("Predictor(model) cannot tell the model's class count; pass class_names=[...]")
        self._setup(model.eval(), data, names or [str(i) for i in range(num_classes)], ctx.device, ctx.dtype,
                    ctx.channels_last, batch_size)
        self.trained, self.cfg = None, None

    def _setup(self, model, data, class_names, device, dtype, channels_last, batch_size) -> None:
        self.model = model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.class_names, self.device, self.dtype = list(class_names), device, dtype
        self.channels_last, self.batch_size = channels_last, int(batch_size)
        self.transform = eval_transform(data)
        self.mean, self.std = list(data.mean), list(data.std)
        # uint8 batches to the device and normalised there, as the trainer's and eval's are
        self.feed = DeviceFeed((), device, self.mean, self.std, channels_last=channels_last, name="predict's images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_topk(self, topk: int | None) -> int:
        if topk is None:
            return min(DEFAULT_TOPK, self.num_classes)
        if not 1 <= topk <= self.num_classes:
            raise ConfigError(f"topk={topk} but the model has {self.num_classes} classes; give topk between 1 and "
                              f"{self.num_classes}")
        return int(topk)

    # -- running ----------------------------------------------------------------------------------------

    def load(self, item: Input, position: int = 0) -> tuple[str, torch.Tensor | None, str | None]:
        """(name, the uint8 (C, H, W) input the model sees, None) or (name, None, why it is unreadable)."""
        name = str(item) if isinstance(item, (str, os.PathLike)) else f"<image {position}>"
        try:
            name, source = to_source(item, position)
            return name, self.transform(source), None
        except FileNotFoundError:
            return name, None, "no such file"
        except UnidentifiedImageError:
            return name, None, "not an image file that PIL can read"
        except IMAGE_ERRORS as e:
            return name, None, f"{type(e).__name__}: {' '.join(str(e).split())}"

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits of a uint8 batch (batch, C, H, W) from the eval transform."""
        x, _ = self.feed.prepare(images, None)
        with autocast(self.device, self.dtype):
            return self.model(x).float()

    def predictions(self, logits: torch.Tensor, names: list[str], topk: int) -> list[Prediction]:
        probs, indices = logits.softmax(1).topk(topk, dim=1)
        out = []
        for name, p, i in zip(names, probs.cpu().tolist(), indices.cpu().tolist()):
            guesses = [Guess(self.class_names[k], k, float(q)) for q, k in zip(p, i)]
            out.append(Prediction(name, guesses[0].class_name, guesses[0].index, guesses[0].probability, guesses))
        return out

    def iterate(self, items: Sequence[Input], topk: int | None = None, bad_images: str = "error",
                progress: bool = False) -> Iterator[tuple[Prediction, torch.Tensor | None]]:
        """(prediction, the uint8 input the model saw) for each of ``items``, in order, batch by
        batch; the next batch is decoded on a thread while the model runs. An unreadable image is
        a DataError with ``bad_images="error"``, a Prediction with ``error`` set with ``"skip"``."""
        topk = self.check_topk(topk if topk is not None else self.topk)
        chunks = [range(start, min(start + self.batch_size, len(items)))
                  for start in range(0, len(items), self.batch_size)]

        def load_chunk(chunk: range):
            return [self.load(items[i], i) for i in chunk]

        bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load_chunk, chunks[0]) if chunks else None
            for number in range(len(chunks)):
                loaded = pending.result()
                pending = pool.submit(load_chunk, chunks[number + 1]) if number + 1 < len(chunks) else None
                for name, _, error in loaded:
                    if error is not None and bad_images == "error":
                        pending and pending.cancel()
                        raise DataError(f"{name} is not a readable image ({error}); remove it, or pass "
                                        f"bad_images=skip to list it and predict the rest")
                good = [(name, image) for name, image, error in loaded if error is None]
                results = iter(self.predictions(self.logits(torch.stack([image for _, image in good])),
                                                [name for name, _ in good], topk) if good else [])
                for name, image, error in loaded:
                    if error is None:
                        yield next(results), image
                    else:
                        yield Prediction(name, None, None, None, error=error), None
                bar.update(len(loaded))
        bar.close()

    def predict(self, items: Iterable[Input], topk: int | None = None, bad_images: str = "error",
                progress: bool = False) -> list[Prediction]:
        """A Prediction for each of ``items`` (paths, PIL images, arrays, tensors), in order."""
        return [p for p, _ in self.iterate(list(items), topk, bad_images, progress)]

    def __call__(self, images: Input | Iterable[Input], topk: int | None = None) -> Prediction | list[Prediction]:
        """One Prediction for one image (a path, a PIL image, an array or a tensor), a list for a list."""
        if isinstance(images, (list, tuple)):
            return self.predict(images, topk)
        return self.predict([images], topk)[0]


# -- predict.py ---------------------------------------------------------------------------------------

def summary(predictions: list[Prediction], shown: int = 10) -> str:
    """'20 images: cat (12), dog (8); 1 unreadable' (the ``shown`` most frequent classes, then how many more)."""
    counts = Counter(p.class_name for p in predictions if p.error is None)
    bad = sum(p.error is not None for p in predictions)
    parts = [f"{name} ({n})" for name, n in counts.most_common(shown)]
    if len(counts) > shown:
        rest = sum(n for _, n in counts.most_common()[shown:])
        parts.append(f"{rest} in {len(counts) - shown} other classes")
    text = f"{len(predictions)} image{'s' * (len(predictions) != 1)}: " + (", ".join(parts) or "none predicted")
    return text + f"; {bad} unreadable"


def predictions_csv(predictions: list[Prediction], topk: int) -> str:
    """One row per image: path, then class, probability and index for each of the top-k, then the error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path"] + [f"{key}_{r}" for r in range(1, topk + 1) for key in ("class", "probability", "index")]
                    + ["error"])
    for p in predictions:
        row = [p.source]
        for r in range(topk):
            g = p.topk[r] if r < len(p.topk) else None
            row += [g.class_name, f"{g.probability:.6f}", g.index] if g else ["", "", ""]
        writer.writerow(row + [p.error or ""])
    return buffer.getvalue()


def _line(p: Prediction, shown: int = 3) -> str:
    if p.error is not None:
        return f"{p.source}: unreadable ({p.error})"
    return f"{p.source}: " + ", ".join(f"{g.class_name} {g.probability:.1%}" for g in p.topk[:shown])


def predictions_figure(samples: list[tuple[Prediction, torch.Tensor]], total: int):
    """A grid of the images as the model saw them, each titled with its top-1 class and confidence
    and its file name."""
    plt = pyplot()
    count = len(samples)
    cols = min(count, 6)
    rows = math.ceil(count / cols)
    # constrained layout makes room for every title and file name (tight_layout let rows overlap)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.85 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, (p, image) in zip(axes.flat, samples):
        array = image.permute(1, 2, 0).numpy()
        if array.shape[2] == 1:
            ax.imshow(array[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(array, interpolation="nearest" if array.shape[0] < 64 else "antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        label = p.class_name if len(p.class_name) <= 22 else p.class_name[:21] + "…"
        ax.set_title(f"{label} · {p.probability:.0%}", fontsize=10, fontweight="bold", pad=4)
        # the file's name as the axis label: tight_layout makes room for it, so no title below covers it
        name = Path(p.source).name
        ax.set_xlabel(name if len(name) <= 30 else name[:14] + "…" + name[-14:], fontsize=7, color="0.35",
                      labelpad=3)
    title = "top-1 class and its probability" + (f" (the first {count} of {total} images)" if total > count else "")
    fig.suptitle(title, fontsize=11)
    return fig


def _shown_dir(run_dir: Path) -> str:
    """The run folder as the user would type it: relative to where they are, when it is below."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)


def predict_command(cfg: DictConfig, trained: Trained, run_dir: str | Path) -> list[Prediction]:
    """``predict.py``: the top-k classes of every image ``cfg.images`` names, into ``run_dir``
    (predictions.csv, predictions.json, with ``show`` predictions.png), a line per image on stdout
    when there are few, and a summary line. Every input is checked before anything is written."""
    if OmegaConf.is_missing(cfg, "images"):
        raise ConfigError("predict.py needs images: images=photo.jpg, a folder, a glob such as 'photos/*.jpg', or a "
                          "list [a.jpg,b.png]")
    files = find_images(OmegaConf.to_container(cfg.images) if OmegaConf.is_config(cfg.images) else cfg.images)
    return predict_files(cfg, Predictor.from_config(cfg, trained), files, run_dir)


def predict_files(cfg: DictConfig, predictor: Predictor, files: list[Path], run_dir: str | Path) -> list[Prediction]:
    """predict.py's work once the model is loaded and the files found (scripts/bench_predict.py times it)."""
    progress = str(cfg.trainer.progress) == "bar" or (str(cfg.trainer.progress) == "auto" and sys.stderr.isatty()
                                                      and len(files) > predictor.batch_size)
    predictions, shown = [], []
    for p, image in predictor.iterate(files, bad_images=str(cfg.bad_images), progress=progress):
        predictions.append(p)
        if cfg.show and image is not None and len(shown) < SHOWN:
            shown.append((p, image))
    run_dir = Path(run_dir)
    path = predictor.trained.path if predictor.trained is not None else None
    info = {"checkpoint": str(path), "model": cfg.model.name,
            "runtime": predictor.trained.runtime if predictor.trained is not None else "torch",
            "topk": predictor.topk, "count": len(predictions),
            "per_class": dict(Counter(p.class_name for p in predictions if p.error is None).most_common()),
            "unreadable": [{"path": p.source, "error": p.error} for p in predictions if p.error is not None]}
    written = [atomic_write(run_dir / "predictions.csv", predictions_csv(predictions, predictor.topk)),
               write_json(run_dir / "predictions.json",
                          {**info, "predictions": [p.as_dict() for p in predictions]})]
    if cfg.show and shown:
        written.append(save_figure(predictions_figure(shown, len(predictions) - len(info["unreadable"])),
                                   run_dir / "predictions.png", dpi=110))
    if len(predictions) <= PRINTED:
        print("\n".join(_line(p) for p in predictions))
    print(f"{summary(predictions)}; {', '.join(p.name for p in written)} in {_shown_dir(run_dir)}")
    return predictions
