"""Top-k accuracy, the confusion matrix, and per-class precision, recall and F1.

Everything is computed from counts, so results from several processes add up exactly.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch


def to_json(obj) -> str:
    """``obj`` as strict JSON: a NaN or infinite number (a diverged loss) becomes null, which every
    JSON parser reads, where Python's default NaN is not JSON at all."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many samples have their label among the top k logits, for each k (capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


class ConfusionMatrix:
    """Counts: row = true class, column = predicted class."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        idx = target.long().cpu() * self.num_classes + pred.long().cpu()
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        return float(self.matrix.diag().sum()) / max(self.total, 1)

    def per_class(self) -> list[dict]:
        """Precision, recall, F1 and support of every class (0 where undefined, as scikit-learn does)."""
        m = self.matrix.double()
        tp, predicted, support = m.diag(), m.sum(0), m.sum(1)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
        return [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(self.class_names, precision, recall, f1, support)]

    def write_csv(self, path: str | Path) -> None:
        """Counts, with the class names as header row and first column ("true \\ predicted" in the corner)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *self.class_names])
            for name, row in zip(self.class_names, self.matrix.tolist()):
                writer.writerow([name, *row])

    def figure(self, max_labelled: int = 30, top_confusions: int = 25):
        """A matplotlib figure: counts and row-normalised matrices, annotated for up to
        ``max_labelled`` classes. Beyond that (ImageNet's 1,000) single cells are unreadable, so it
        shows the row-normalised matrix as an image beside the most frequent confusions."""
        from rednet.viz.images import pyplot

        plt = pyplot()
        counts = self.matrix.double()
        normalised = counts / counts.sum(1, keepdim=True).clamp(min=1)
        n = self.num_classes
        if n <= max_labelled:
            from sklearn.metrics import ConfusionMatrixDisplay

            size = max(6.0, 0.45 * n + 3)
            fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
            for ax, data, title, fmt in ((axes[0], counts, "counts", ".0f"),
                                         (axes[1], normalised, "row-normalised (recall)", ".2f")):
                shown = ConfusionMatrixDisplay(data.numpy(), display_labels=self.class_names).plot(
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
        axes[0].set(title=f"row-normalised, {n} classes (accuracy {self.accuracy:.2%})",
                    xlabel="predicted class index", ylabel="true class index")
        fig.colorbar(im, ax=axes[0], shrink=0.8)
        off = counts.clone()
        off.fill_diagonal_(0)
        k = min(top_confusions, int((off > 0).sum()))
        values, flat = off.flatten().topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        labels = [f"{self.class_names[int(i) // n]} → {self.class_names[int(i) % n]}" for i in flat]
        axes[1].barh(range(k), values.numpy()[::-1])
        axes[1].set_yticks(range(k))
        axes[1].set_yticklabels(labels[::-1], fontsize=8)
        axes[1].set(title=f"top {k} confusions (true → predicted)", xlabel="count")
        return fig

    def write_png(self, path: str | Path) -> None:
        from rednet.viz.images import save_figure

        save_figure(self.figure(), path, dpi=110)
