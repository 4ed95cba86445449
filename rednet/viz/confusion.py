"""The confusion matrix as a figure (eval.py's ``confusion_matrix.png``, TensorBoard's ``val/confusion_matrix``)."""

from __future__ import annotations

import torch

from rednet.metrics import ConfusionMatrix
from rednet.viz.images import pyplot


def confusion_figure(confusion: ConfusionMatrix, max_labelled: int = 30, top_confusions: int = 25):
    """A matplotlib figure: counts and row-normalised matrices, annotated for up to
    ``max_labelled`` classes. Beyond that (ImageNet's 1,000) single cells are unreadable, so it
    shows the row-normalised matrix as an image beside the most frequent confusions."""
    plt = pyplot()
    counts = confusion.matrix.double()
    normalised = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = confusion.num_classes
    if n <= max_labelled:
        from sklearn.metrics import ConfusionMatrixDisplay  # 2 s to import; only small matrices use it

        size = max(6.0, 0.45 * n + 3)
        fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
        for ax, data, title, fmt in ((axes[0], counts, "counts", ".0f"),
                                     (axes[1], normalised, "row-normalised (recall)", ".2f")):
            shown = ConfusionMatrixDisplay(data.numpy(), display_labels=confusion.class_names).plot(
                ax=ax, cmap="Blues", values_format=fmt, xticks_rotation="vertical", colorbar=False,
                im_kw={"vmin": 0}, text_kw={"fontsize": 8})
            for text, value in zip(shown.text_.flat, data.flatten().tolist()):
                text.set_visible(value > 0)  # a grid of zeros would hide the few confusions
            ax.set(title=title, xlabel="predicted", ylabel="true")
            fig.colorbar(shown.im_, ax=ax, shrink=0.8)
        return fig
    fig, axes = plt.subplots(1, 2, figsize=(18, 9), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.2, 1]})
    im = axes[0].imshow(normalised.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set(title=f"row-normalised, {n} classes (accuracy {confusion.accuracy:.2%})",
                xlabel="predicted class index", ylabel="true class index")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    off = counts.clone()
    off.fill_diagonal_(0)
    k = min(top_confusions, int((off > 0).sum()))
    values, flat = off.flatten().topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    labels = [f"{confusion.class_names[int(i) // n]} → {confusion.class_names[int(i) % n]}" for i in flat]
    axes[1].barh(range(k), values.numpy()[::-1])
    axes[1].set_yticks(range(k))
    axes[1].set_yticklabels(labels[::-1], fontsize=8)
    axes[1].set(title=f"top {k} confusions (true → predicted)", xlabel="count")
    return fig

