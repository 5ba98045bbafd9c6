"""Classification metrics per node and pooled over nodes, without moving labels or predictions.

A node summarises its validation predictions as an :class:`EvalSummary`:
sample count, summed loss, the confusion matrix, and for every class a
histogram of one-vs-rest scores (log-odds, 640 bins over [-16, 16]) for the
positives and for the negatives.  No per-image label or score leaves the node.

The hub adds summaries (counts add exactly) and derives the metrics:
accuracy, per-class sensitivity and specificity, Matthews' correlation
coefficient (the multiclass form, Gorodkin 2004), ROC-AUC per class and its
macro mean, and ROC curves.  A node's own ROC-AUC is exact (computed from its
scores before binning); the pooled ROC-AUC comes from the binned histograms,
and ``auc_tie_bound`` is the most binning can have moved it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "SCORE_BINS",
    "LOGIT_LIMIT",
    "EvalSummary",
    "summarize_predictions",
    "pool",
    "compute_metrics",
    "exact_auc",
    "histogram_auc",
    "histogram_roc",
    "matthews_corrcoef",
]

SCORE_BINS = 640
LOGIT_LIMIT = 16.0


@dataclass
class EvalSummary:
    """Sufficient statistics of one node's (or a pool's) validation predictions."""

    samples: int
    loss_sum: float
    confusion: np.ndarray  # (C, C) int64, rows = true class, columns = predicted class
    pos_hist: np.ndarray  # (C, SCORE_BINS) int64: scores of class-c images for class c
    neg_hist: np.ndarray  # (C, SCORE_BINS) int64: scores of other images for class c
    exact_auc: list[float | None]  # per class, from unbinned scores; None where undefined or pooled

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def header(self) -> dict[str, Any]:
        return {"samples": self.samples, "loss_sum": self.loss_sum, "exact_auc": list(self.exact_auc)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"confusion": self.confusion, "pos_hist": self.pos_hist, "neg_hist": self.neg_hist}


def _scores_to_bins(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-300, 1.0)
    logit = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 1e-16))
    scaled = (np.clip(logit, -LOGIT_LIMIT, LOGIT_LIMIT) + LOGIT_LIMIT) / (2 * LOGIT_LIMIT)
    return np.minimum((scaled * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)


def summarize_predictions(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> EvalSummary:
    """Summarise class probabilities ``probs`` (N, C) against integer ``labels`` (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(labels)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    pos = np.zeros((num_classes, SCORE_BINS), dtype=np.int64)
    neg = np.zeros((num_classes, SCORE_BINS), dtype=np.int64)
    aucs: list[float | None] = [None] * num_classes
    loss_sum = 0.0
    if n:
        np.add.at(confusion, (labels, probs.argmax(1)), 1)
        loss_sum = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-300, None)).sum())
        bins = _scores_to_bins(probs)
        for c in range(num_classes):
            is_pos = labels == c
            pos[c] = np.bincount(bins[is_pos, c], minlength=SCORE_BINS)
            neg[c] = np.bincount(bins[~is_pos, c], minlength=SCORE_BINS)
            aucs[c] = exact_auc(is_pos, probs[:, c])
    return EvalSummary(n, loss_sum, confusion, pos, neg, aucs)


def pool(summaries: Sequence[EvalSummary]) -> EvalSummary:
    """Add summaries from several nodes (exact for counts; AUC then comes from the histograms)."""
    first = summaries[0]
    return EvalSummary(
        samples=sum(s.samples for s in summaries),
        loss_sum=sum(s.loss_sum for s in summaries),
        confusion=sum((s.confusion for s in summaries), np.zeros_like(first.confusion)),
        pos_hist=sum((s.pos_hist for s in summaries), np.zeros_like(first.pos_hist)),
        neg_hist=sum((s.neg_hist for s in summaries), np.zeros_like(first.neg_hist)),
        exact_auc=[None] * first.num_classes,
    )


def exact_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC as the Mann-Whitney statistic (ties count one half); None without both classes."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average rank of each distinct value, 1-based
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float | None, float]:
    """(ROC-AUC, tie bound) from score histograms over increasing bins.

    Pairs in the same bin count one half; the tie bound is half their share,
    the largest error that can cause.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None, 0.0
    neg_below = np.cumsum(neg) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    ties = (pos * neg).sum()
    return float(wins / (n_pos * n_neg)), float(0.5 * ties / (n_pos * n_neg))


def histogram_roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points (false positive rate, true positive rate), thresholds from high to low."""
    pos = np.asarray(pos, dtype=np.float64)[::-1]
    neg = np.asarray(neg, dtype=np.float64)[::-1]
    tpr = np.concatenate([[0.0], np.cumsum(pos) / max(pos.sum(), 1.0)])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / max(neg.sum(), 1.0)])
    return fpr, tpr


def matthews_corrcoef(confusion: np.ndarray) -> float:
    """Multiclass MCC from a confusion matrix (0 where undefined)."""
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum()
    correct = np.trace(c)
    true_counts = c.sum(1)
    pred_counts = c.sum(0)
    numerator = correct * total - (pred_counts * true_counts).sum()
    denominator = np.sqrt((total**2 - (pred_counts**2).sum()) * (total**2 - (true_counts**2).sum()))
    return float(numerator / denominator) if denominator > 0 else 0.0


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def compute_metrics(summary: EvalSummary, class_names: Sequence[str]) -> dict[str, Any]:
    """Every reported metric, as JSON-ready data (None where a metric is undefined)."""
    c = summary.confusion.astype(np.float64)
    total = c.sum()
    tp = np.diag(c)
    fn = c.sum(1) - tp
    fp = c.sum(0) - tp
    tn = total - tp - fn - fp
    per_class: dict[str, dict[str, Any]] = {}
    aucs = []
    tie_bound = 0.0
    for k, name in enumerate(class_names):
        auc = summary.exact_auc[k] if k < len(summary.exact_auc) else None
        if auc is None:
            auc, bound = histogram_auc(summary.pos_hist[k], summary.neg_hist[k])
            tie_bound = max(tie_bound, bound)
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "sensitivity": _ratio(tp[k], tp[k] + fn[k]),
            "specificity": _ratio(tn[k], tn[k] + fp[k]),
            "precision": _ratio(tp[k], tp[k] + fp[k]),
            "roc_auc": auc,
            "support": int(c.sum(1)[k]),
        }
    return {
        "samples": int(summary.samples),
        "loss": _ratio(summary.loss_sum, summary.samples),
        "accuracy": _ratio(tp.sum(), total),
        "mcc": matthews_corrcoef(summary.confusion) if total else None,
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "auc_tie_bound": tie_bound,
        "per_class": per_class,
        "confusion_matrix": summary.confusion.astype(int).tolist(),
    }
