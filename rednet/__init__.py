"""RedNet: involution networks in PyTorch. See README.md."""

import importlib

from rednet.integrations import when_imported

# RedNet in timm's registry, registered only once timm is imported: timm costs seconds to import.
when_imported("timm", lambda: importlib.import_module("rednet.integrations.timm"))

# The public API, imported on first use: `import rednet` stays cheap (no torch, no Hydra).
_LAZY = {"Predictor": "rednet.predict", "Prediction": "rednet.predict"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rednet' has no attribute {name!r}")


__all__ = ["Predictor", "Prediction"]
