"""The images a model gets most confidently wrong, as one figure (eval.py's ``misclassified.png``)."""

from __future__ import annotations

import math

from rednet.viz.images import denormalize, pyplot, show

COLUMNS = 8


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def misclassified_figure(mistakes: list, class_names: list[str], mean, std, total: int):
    """A grid of ``mistakes`` (:class:`rednet.engine.evaluate.Mistake`, most confident first): each
    image de-normalised with ``mean`` and ``std``, its true class, the predicted class and the
    model's confidence in it. Without mistakes, a note that all ``total`` images were right."""
    plt = pyplot()
    if not mistakes:
        fig = plt.figure(figsize=(6.0, 1.6))
        fig.text(0.5, 0.5, f"No mistakes: all {total} images were classified correctly.", ha="center",
                 va="center", fontsize=12)
        return fig
    columns = min(COLUMNS, len(mistakes))
    rows = math.ceil(len(mistakes) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.75 * columns + 0.3, 2.05 * rows + 0.5), squeeze=False,
                             layout="constrained")
    fig.suptitle(f"The {len(mistakes)} most confident mistakes of {total} images", fontsize=12)
    for ax in axes.ravel()[len(mistakes):]:
        ax.set_visible(False)
    for ax, m in zip(axes.ravel(), mistakes):
        show(ax, denormalize(m.image, mean, std))
        ax.set_title(f"true: {_short(class_names[m.target])}\npredicted: {_short(class_names[m.pred])}\n"
                     f"confidence {m.confidence:.1%}", fontsize=8, loc="left")
    return fig
