"""Metrics from pooled sufficient statistics against scikit-learn on the raw predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, matthews_corrcoef as sk_mcc, roc_auc_score

from fl.metrics import compute_metrics, exact_auc, histogram_auc, matthews_corrcoef, pool, summarize_predictions


def predictions(rng, n, classes, skill=2.0):
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_node_metrics_match_scikit_learn(rng):
    labels, probs = predictions(rng, 400, 3)
    m = compute_metrics(summarize_predictions(labels, probs, 3), ["a", "b", "c"])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == labels).mean())
    assert m["mcc"] == pytest.approx(sk_mcc(labels, pred))
    assert m["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    assert m["loss"] == pytest.approx(-np.log(probs[np.arange(400), labels]).mean())
    for k, name in enumerate("abc"):
        tp = ((pred == k) & (labels == k)).sum()
        tn = ((pred != k) & (labels != k)).sum()
        assert m["per_class"][name]["sensitivity"] == pytest.approx(tp / (labels == k).sum())
        assert m["per_class"][name]["specificity"] == pytest.approx(tn / (labels != k).sum())
        assert m["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_pooled_metrics_equal_metrics_of_the_pooled_predictions(rng):
    parts = [predictions(rng, n, 4) for n in (150, 60, 300)]
    pooled = compute_metrics(pool([summarize_predictions(l, p, 4) for l, p in parts]), list("wxyz"))
    labels = np.concatenate([l for l, _ in parts])
    probs = np.concatenate([p for _, p in parts])
    direct = compute_metrics(summarize_predictions(labels, probs, 4), list("wxyz"))
    assert pooled["confusion_matrix"] == direct["confusion_matrix"]
    for key in ("accuracy", "mcc", "loss", "samples"):
        assert pooled[key] == pytest.approx(direct[key])
    # the pooled AUC comes from binned scores; it stays within its own stated bound of the exact value
    bound = pooled["auc_tie_bound"]
    assert 0 < bound < 0.01
    for name in "wxyz":
        assert abs(pooled["per_class"][name]["roc_auc"] - direct["per_class"][name]["roc_auc"]) <= bound + 1e-12


def test_auc_edge_cases():
    assert exact_auc(np.array([True, True]), np.array([0.1, 0.2])) is None
    assert exact_auc(np.array([True, False, True, False]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert exact_auc(np.array([False, True]), np.array([0.1, 0.9])) == 1.0
    auc, bound = histogram_auc(np.array([0, 0, 3]), np.array([2, 1, 1]))
    assert auc == pytest.approx((3 * 3 + 0.5 * 3) / 12) and bound == pytest.approx(0.5 * 3 / 12)
    assert matthews_corrcoef(np.array([[5, 0], [0, 0]])) == 0.0


def test_undefined_metrics_are_none_not_nan():
    labels = np.zeros(5, dtype=np.int64)
    probs = np.tile([[0.9, 0.1]], (5, 1))
    m = compute_metrics(summarize_predictions(labels, probs, 2), ["neg", "pos"])
    assert m["per_class"]["pos"]["sensitivity"] is None and m["per_class"]["neg"]["roc_auc"] is None
    assert m["roc_auc_macro"] is None and m["accuracy"] == 1.0
