"""Running an exported ``.onnx`` file in ONNX Runtime, and reading it like a checkpoint.

Importing this module registers the ``.onnx`` format with :func:`rednet.engine.trained.open_trained`:
``eval.py ckpt=model.onnx`` (and predict.py) then get the file's model and data config from its
sidecar (``model.json``, written by export.py), the same checks against the data as a checkpoint,
and the same report, so what is measured is the file that ships.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rednet.engine.trained import Trained, register_format
from rednet.errors import DeployError

INPUT, OUTPUT = "images", "logits"
# A sidecar holds class names and two configs: a few MB even for 21k classes. Anything larger is
# not one of ours, and is not read into memory.
MAX_SIDECAR_BYTES = 16 << 20


def require(*names: str):
    """Imports the optional modules ``names`` (returns the first); without them, one line saying
    what to install."""
    try:
        modules = [importlib.import_module(name) for name in names]
    except ImportError as e:
        raise DeployError(f"ONNX export and ONNX Runtime need the [deploy] extra ({e.name} is missing): "
                          f'pip install -e ".[deploy]"') from None
    return modules[0]


def session(model: bytes | str | Path, threads: int = 0, providers: list[str] | None = None):
    """An ONNX Runtime InferenceSession on ``model`` (bytes or a path), with all graph
    optimisations; ``threads=0`` lets ONNX Runtime choose."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | Path) -> dict:
    """The JSON sidecar export.py wrote beside ``onnx_path``, checked enough that eval can use it."""
    onnx_path = Path(onnx_path)
    side = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise DeployError(f"{onnx_path} does not exist; check ckpt=")
    if not side.is_file():
        raise DeployError(f"{onnx_path} has no sidecar {side.name} (export.py writes both); export it again with "
                          f"export.py, or put its {side.name} beside it")
    if side.stat().st_size > MAX_SIDECAR_BYTES:
        raise DeployError(f"{side} is {side.stat().st_size} bytes, too large for a sidecar of export.py")
    try:
        info = json.loads(side.read_text())
        config, num_classes = info["config"], int(info["num_classes"])
        names = info.get("class_names")
        if not (isinstance(config, dict) and isinstance(config.get("model"), dict)
                and isinstance(config.get("data"), dict)):
            raise TypeError("config must hold model and data")
        if names is not None and (len(names) != num_classes or not all(isinstance(n, str) for n in names)):
            raise TypeError("class_names must be num_classes strings")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DeployError(f"{side} is not a sidecar written by export.py ({type(e).__name__}: {e}); export "
                          f"{onnx_path.name} again") from None
    return info


class OnnxClassifier(nn.Module):
    """An exported file as a module: ``logits = OnnxClassifier("model.onnx")(images)``.

    It runs in ONNX Runtime on the CPU; ``images`` are float32 (batch, channels, height, width),
    normalised as in training (the sidecar holds mean and std).
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.session = session(self.path, threads)
        except DeployError:
            raise
        except Exception as e:  # ONNX Runtime's own errors for a damaged or foreign file
            message = " ".join(str(e).split())[:300]
            raise DeployError(f"ONNX Runtime cannot load {self.path}: {message}; export it again") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x})[0])


@register_format(".onnx")
def read_exported(path: Path) -> Trained:
    """An exported file, through its sidecar; ONNX Runtime is needed only to run it."""
    info = read_sidecar(path)

    def build(model_cfg, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
        require("onnxruntime")
        return OnnxClassifier(path)

    return Trained(path, info["config"], int(info["num_classes"]), info.get("class_names"), info.get("in_chans"),
                   build, info, runtime="onnxruntime")
