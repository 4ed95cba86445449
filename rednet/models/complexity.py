"""Parameter and multiply-accumulate counts, including the involution operator itself."""

from __future__ import annotations

import torch
from torch import nn

from rednet.models.involution import Involution


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass for one image.

    Counted: convolutions, linear layers and the involution operator (K*K per output element);
    the kernel generator's convolutions count as the convolutions they are. Normalisation,
    activations and pooling are left out, as in the FLOPs columns of the papers we compare to.
    """
    macs = 0

    def conv_hook(m: nn.Conv2d, _, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() // out.shape[0] * m.in_features

    def involution_hook(m: Involution, _, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() // out.shape[0] * m.kernel_size * m.kernel_size

    hooks = []
    for m in model.modules():
        hook = {nn.Conv2d: conv_hook, nn.Linear: linear_hook, Involution: involution_hook}.get(type(m))
        if hook is not None:
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs
