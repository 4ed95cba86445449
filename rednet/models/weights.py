"""Loading weights: our checkpoints and the official mmcls RedNet release."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rednet.errors import CheckpointError
from rednet.io import read_checkpoint

HEAD_PREFIX = "head.fc."


def state_dict_of(obj: Mapping) -> Mapping[str, torch.Tensor]:
    """Finds the state_dict inside the formats we know: ours (``model``), mmcls (``state_dict``),
    or a bare state_dict. A DDP ``module.`` prefix is removed."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("no state_dict found: expected a 'model' or 'state_dict' entry, or a dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, src: str | Path | Mapping, strict: bool = True,
                 drop_head: bool = False, name: str | None = None) -> nn.Module:
    """Loads weights from a path or a dict into ``model`` and returns it.

    ``src`` may be one of our checkpoints, an official mmcls checkpoint (``{'meta', 'state_dict'}``
    with ``backbone.`` and ``head.fc.`` keys, which is our layout), or a bare state_dict. Files are
    read with ``weights_only=True``.

    To fine-tune on another label set, pass ``drop_head=True``: the checkpoint's ``head.fc`` is
    ignored and the model keeps its freshly initialised classifier.

    Raises :class:`~rednet.errors.CheckpointError` listing missing, unexpected and mis-shaped keys
    when the weights do not fit (with ``strict=False`` only mis-shaped keys are an error). ``name``
    says where a dict came from (its file), for that message.
    """
    obj = read_checkpoint(src) if isinstance(src, (str, Path)) else src
    state = dict(state_dict_of(obj))
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (drop_head and k.startswith(HEAD_PREFIX))]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})"
                 for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_first(misshaped)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_first(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if problems:
        hint = ("; the class count differs: to fine-tune, drop its classifier (drop_head=True, or "
                "model.drop_head=true on the command line)"
                if all(m.startswith(HEAD_PREFIX) for m in misshaped) and misshaped and not missing else
                "; the checkpoint is for a different model")
        name = name or (f"{src}" if isinstance(src, (str, Path)) else "the given state_dict")
        raise CheckpointError(f"weights in {name} do not fit {type(model).__name__}: " + "; ".join(problems) + hint)
    model.load_state_dict(state, strict=False)
    return model
