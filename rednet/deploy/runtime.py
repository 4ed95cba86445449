"""Running an exported ``.onnx`` file in ONNX Runtime, and evaluating it like a checkpoint.

``eval.py ckpt=model.onnx`` runs :func:`evaluate_onnx`: the data config comes from the file's
sidecar (``model.json``, written by export.py) with the command line's overrides on top, and the
report is the one a checkpoint gets, so what is measured is the file that ships.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

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


def read_sidecar(onnx_path: str | Path) -> dict:
    """The JSON sidecar export.py wrote beside ``onnx_path``, checked enough that eval can use it."""
    from rednet.deploy.export import sidecar_path

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


def evaluate_onnx(cfg, info: dict, run_dir: str | Path):
    """``eval.py ckpt=model.onnx``: evaluates the file through ONNX Runtime on ``cfg.data``'s
    validation split and writes eval.py's report into ``run_dir``."""
    from rednet.data import build_datamodule
    from rednet.engine.evaluate import MISCLASSIFIED_SHOWN, check_class_names, evaluate, write_report

    if cfg.trainer.strategy != "single":
        raise DeployError(f"an .onnx file is evaluated in one process; drop trainer={cfg.trainer.strategy}")
    data = build_datamodule(cfg.data)
    if info["num_classes"] != data.num_classes:
        raise DeployError(f"{cfg.ckpt} has {info['num_classes']} classes but data={cfg.data.name} has "
                          f"{data.num_classes}; evaluate it on data with the same classes")
    check_class_names(info.get("class_names"), list(data.class_names), str(cfg.ckpt), f"data={cfg.data.name}")
    if info.get("in_chans", data.in_chans) != data.in_chans:
        raise DeployError(f"{cfg.ckpt} takes {info['in_chans']}-channel images but data={cfg.data.name} has "
                          f"{data.in_chans}; set data.in_chans={info['in_chans']}")
    model = OnnxClassifier(cfg.ckpt)
    loader = data.val_loader(cfg.data.batch_size)
    result = evaluate(model, loader, torch.device("cpu"), None, list(data.class_names),
                      limit_batches=cfg.trainer.limit_val_batches, desc="eval", keep_mistakes=MISCLASSIFIED_SHOWN)
    write_report(result, run_dir, {"checkpoint": str(cfg.ckpt), "runtime": "onnxruntime", "model": info["model"],
                                   "data": cfg.data.name}, cfg.data)
    return result
