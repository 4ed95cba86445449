"""Top-k accuracy, the confusion matrix, and per-class precision, recall and F1.

Everything is computed from counts, so results from several processes add up exactly.
"""

from __future__ import annotations

import csv
import io

import torch


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

    def csv(self) -> str:
        """Counts, with the class names as header row and first column ("true \\ predicted" in the corner)."""
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["true \\ predicted", *self.class_names])
        for name, row in zip(self.class_names, self.matrix.tolist()):
            writer.writerow([name, *row])
        return text.getvalue()
