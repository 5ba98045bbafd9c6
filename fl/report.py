"""The final report of a run: ``report.json`` and two PNG plots.

- ``report.json``: the run, the configuration (without secrets), every node's
  data summary, and per round: learning rate, included and dropped nodes,
  weights, bytes per node (``bytes``: the round; ``eval_bytes``: the
  evaluation), seconds, training figures per node, validation
  metrics per node and pooled; the final metrics; the pooled ROC curves.
- ``metrics.png``: loss, accuracy, MCC and macro ROC-AUC per round, pooled
  (thick) and per node (thin).
- ``roc.png``: the final pooled one-vs-rest ROC curve of every class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import write_json
from .files import atomic_write
from .metrics import EvalSummary, histogram_roc

__all__ = ["roc_curves", "write_report", "plot_metrics", "plot_roc"]

_MAX_LEGEND = 20
_PANELS = (("loss", "validation loss"), ("accuracy", "accuracy"), ("mcc", "MCC"), ("roc_auc_macro", "ROC-AUC (macro)"))


def roc_curves(pooled: EvalSummary, classes: list[str]) -> dict[str, dict[str, list[float]]]:
    """Pooled ROC points per class, keeping only the corners of the curve."""
    out = {}
    for k, name in enumerate(classes):
        fpr, tpr = histogram_roc(pooled.pos_hist[k], pooled.neg_hist[k])
        keep = np.ones(len(fpr), dtype=bool)
        keep[1:-1] = (np.diff(fpr)[:-1] != 0) | (np.diff(tpr)[:-1] != 0)
        out[name] = {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}
    return out


def write_report(out_dir: str | Path, report: dict[str, Any]) -> dict[str, str]:
    """Write report.json, metrics.png and roc.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"report": str(out_dir / "report.json")}
    rounds = report.get("rounds", [])
    if any(r.get("eval") for r in rounds):
        paths["metrics_plot"] = str(out_dir / "metrics.png")
        plot_metrics(rounds, out_dir / "metrics.png")
    if report.get("roc"):
        paths["roc_plot"] = str(out_dir / "roc.png")
        plot_roc(report["roc"], out_dir / "roc.png")
    report = {**report, "outputs": {**report.get("outputs", {}), **paths}}
    write_json(out_dir / "report.json", report)
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def plot_metrics(rounds: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    evaluated = [r for r in rounds if r.get("eval")]
    nodes = sorted({n for r in evaluated for n in r["eval"]["nodes"]})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, _PANELS):
        xs = [r["round"] for r in evaluated]
        ax.plot(xs, [_num(r["eval"]["pooled"].get(key)) for r in evaluated], "k-o", lw=2.2, ms=4, label="pooled")
        for node in nodes:
            ys = [_num(r["eval"]["nodes"].get(node, {}).get(key)) for r in evaluated]
            ax.plot(xs, ys, lw=1, alpha=0.8, label=node)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("round")
    if len(nodes) <= _MAX_LEGEND:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_roc(roc: dict[str, dict[str, list[float]]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, curve in roc.items():
        ax.plot(curve["fpr"], curve["tpr"], lw=1.4, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    if len(roc) <= _MAX_LEGEND:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("pooled ROC, one class vs rest")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
