"""Metrics against scikit-learn as the independent reference."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from rednet.metrics import ConfusionMatrix, topk_correct


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


def test_figures_for_few_and_many_classes(tmp_path):
    from PIL import Image

    small = ConfusionMatrix(10, [f"c{i}" for i in range(10)])
    small.update(torch.arange(10), torch.arange(10))
    small.write_png(tmp_path / "small.png")
    big = ConfusionMatrix(1000)
    rng = torch.Generator().manual_seed(0)
    target = torch.randint(0, 1000, (20000,), generator=rng)
    big.update(torch.where(torch.rand(20000, generator=rng) < 0.7, target, torch.randint(0, 1000, (20000,), generator=rng)), target)
    fig = big.figure()
    assert "top 25 confusions" in fig.axes[1].get_title()
    big.write_png(tmp_path / "big.png")
    assert Image.open(tmp_path / "small.png").size[0] > 500 and Image.open(tmp_path / "big.png").size[0] > 1000
