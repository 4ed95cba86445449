"""Figures: kernel heat-maps and the kernels at one point (``visualize.py``), misclassified examples."""

from rednet.viz.kernels import capture_kernels, involution_layers, kernel_heatmaps, kernels_at, resolve_layers
from rednet.viz.visualize import log_kernel_heatmaps, visualize_checkpoint

__all__ = ["capture_kernels", "involution_layers", "kernel_heatmaps", "kernels_at", "resolve_layers",
           "log_kernel_heatmaps", "visualize_checkpoint"]
