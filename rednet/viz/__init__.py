"""Figures: kernel heat-maps and the kernels at one point, confusion matrices, misclassified examples."""

from rednet.viz.kernels import capture_kernels, involution_layers, kernel_heatmaps, kernels_at, resolve_layers

__all__ = ["capture_kernels", "involution_layers", "kernel_heatmaps", "kernels_at", "resolve_layers"]
