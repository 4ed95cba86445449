"""The involution operator: ``involution(x, weight, kernel_size, stride, dilation, impl)``."""

# Importing an implementation registers it with the dispatcher.
from rednet.ops import (
           shift,  # noqa: E402,F401  (pure PyTorch, memory-lean, every device)
           triton_kernels,  # noqa: E402,F401  (fused GPU kernels; registers only if triton imports)
)
from rednet.ops.fused_generator import fused_available, fused_involution  # noqa: E402  (involution + its generator)
from rednet.ops.involution import available_impls, check_args, involution, involution_unfold, output_size

__all__ = ["involution", "available_impls", "involution_unfold", "check_args", "output_size", "fused_involution",
           "fused_available"]
