"""Metrics against scikit-learn as the independent reference."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from rednet.metrics import ConfusionMatrix, topk_correct
from rednet.viz.confusion import confusion_figure
from rednet.viz.images import save_figure


def test_confusion_matrix_and_per_class_match_sklearn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 7, 500)
    pred = np.where(rng.random(500) < 0.6, target, rng.integers(0, 7, 500))
    pred[pred == 6] = 5  # class 6 is never predicted: precision undefined, reported as 0
    cm = ConfusionMatrix(7)
    cm.update(torch.from_numpy(pred[:200]), torch.from_numpy(target[:200]))
    cm.update(torch.from_numpy(pred[200:]), torch.from_numpy(target[200:]))
    np.testing.assert_array_equal(cm.matrix.numpy(), confusion_matrix(target, pred, labels=range(7)))
    p, r, f, s = precision_recall_fscore_support(target, pred, labels=range(7), zero_division=0)
    rows = cm.per_class()
    np.testing.assert_allclose([x["precision"] for x in rows], p)
    np.testing.assert_allclose([x["recall"] for x in rows], r)
    np.testing.assert_allclose([x["f1"] for x in rows], f)
    assert [x["support"] for x in rows] == s.tolist()
    assert cm.accuracy == pytest.approx((pred == target).mean())


def test_topk_matches_sklearn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 12)).astype(np.float32)
    target = rng.integers(0, 12, 300)
    hits = topk_correct(torch.from_numpy(logits), torch.from_numpy(target), (1, 5))
    for k, h in zip((1, 5), hits):
        assert h == round(top_k_accuracy_score(target, logits, k=k, labels=range(12)) * 300)


def test_topk_with_fewer_classes_than_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(logits, torch.tensor([2, 1]), (1, 5)) == [0, 2]


def test_small_figure_shows_counts_and_recall(tmp_path):
    from PIL import Image

    names = [f"c{i}" for i in range(4)]
    cm = ConfusionMatrix(4, names)
    cm.update(torch.tensor([0, 0, 1, 1, 1, 3, 2, 3]), torch.tensor([0, 0, 0, 1, 1, 1, 2, 3]))
    counts = np.array([[2, 1, 0, 0], [0, 2, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    recall = counts / counts.sum(1, keepdims=True)
    fig = confusion_figure(cm)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["counts", "row-normalised (recall)"]
    for ax, expected, fmt in zip(panels, (counts, recall), ("{:.0f}", "{:.2f}")):
        np.testing.assert_allclose(ax.images[0].get_array(), expected)  # rows true, columns predicted
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        assert [t.get_text() for t in ax.get_yticklabels()] == names
        shown = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
                 for t in ax.texts if t.get_visible()}
        # Every non-zero cell is written in, and no zero cell is.
        assert shown == {(i, j): fmt.format(expected[i, j]) for i, j in zip(*np.nonzero(expected))}
    save_figure(fig, tmp_path / "small.png")
    with Image.open(tmp_path / "small.png") as png:
        png.load()
        assert png.size[0] > 500


def test_large_figure_shows_recall_and_the_top_confusions(tmp_path):
    from PIL import Image

    big = ConfusionMatrix(1000)
    rng = torch.Generator().manual_seed(0)
    target = torch.randint(0, 1000, (20000,), generator=rng)
    pred = torch.where(torch.rand(20000, generator=rng) < 0.7, target, torch.randint(0, 1000, (20000,), generator=rng))
    pred[:30] = 7  # one confusion far more frequent than the rest
    target[:30] = 3
    big.update(pred, target)
    fig = confusion_figure(big)
    counts = confusion_matrix(target.numpy(), pred.numpy(), labels=range(1000))
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), counts / np.maximum(counts.sum(1, keepdims=True), 1))
    bars = fig.axes[1]
    assert bars.get_title() == "top 25 confusions (true → predicted)"
    widths = [p.get_width() for p in bars.patches][::-1]  # drawn bottom-up, the largest on top
    off = counts - np.diag(np.diag(counts))
    assert widths == sorted(off.flatten().tolist(), reverse=True)[:25]
    assert bars.get_yticklabels()[-1].get_text() == "3 → 7" and widths[0] == off[3, 7]
    save_figure(fig, tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as png:
        png.load()
        assert png.size[0] > 1000
