"""Federated training with secure aggregation against centralised training, on the digits split.

    python benchmarks/fl_accuracy.py [--seeds 0,1,2] [--rounds 10]

The data are the demo's: scikit-learn's bundled digits written as PNG files,
20 % held out, the rest split 50 / 30 / 20 % across three nodes, each of which
keeps 20 % of its images for local validation.

- Federated: three ``primia node`` processes and the hub on 127.0.0.1, secure
  aggregation, ``rounds`` rounds of one local epoch (the demo's configuration).
- Centralised: the same model, initialisation, optimizer, learning-rate
  schedule and batch size, trained on the union of the nodes' training images
  for as many epochs as there are rounds (the same number of passes over every
  image), in one process.

Both are tested on the held-out images.  Accuracy is printed per seed, then
the mean and the difference in percentage points.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fl.config import load_config  # noqa: E402
from fl.data import load_images, scan_folder, split_indices  # noqa: E402
from fl.demo import NODE_NAMES, start_nodes, stop_nodes, write_config, write_digits  # noqa: E402
from fl.hub import run_hub  # noqa: E402
from fl.models import Layout, build_model  # noqa: E402
from fl.training import LocalTrainer, round_lr  # noqa: E402


def holdout_accuracy(model: torch.nn.Module, data: Path, cfg) -> float:
    scan = scan_folder(data / "holdout")
    x = load_images(scan, input_size=cfg.data.input_size, channels=1).astype(np.float32) / 255.0
    x = (x - cfg.data.mean[0]) / cfg.data.std[0]
    labels = np.array([int(scan.classes[i]) for i in scan.labels])
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == labels).mean())


def centralised(data: Path, cfg) -> torch.nn.Module:
    """The same model and budget trained in one place on every node's training split."""
    images, labels = [], []
    for name in NODE_NAMES:
        scan = scan_folder(data / name)
        node_labels = np.array([int(scan.classes[i]) for i in scan.labels])
        train_idx, _ = split_indices(node_labels, cfg.data.val_fraction, cfg.run.seed)  # as the node splits
        images.append(load_images(scan, input_size=cfg.data.input_size, channels=1)[train_idx])
        labels.append(node_labels[train_idx])
    images, labels = np.concatenate(images), np.concatenate(labels)
    model = build_model(cfg.model.name, num_classes=10, in_channels=1, input_size=cfg.data.input_size,
                        width=cfg.model.width, pooling=cfg.model.pooling, seed=cfg.run.seed)
    trainer = LocalTrainer(cfg, model, images, labels, np.arange(len(labels)), np.zeros(0, np.int64),
                           num_classes=10, node_name="central")
    layout = Layout.of(model)
    weights = layout.flatten(model)
    for r in range(cfg.run.rounds):  # one epoch per round, the round's learning rate
        delta, _ = trainer.train_round(r + 1, weights, round_lr(cfg.training, r, cfg.run.rounds))
        weights = weights + delta
    layout.load(model, weights)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="run seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds = centralised epochs (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ["| seed | federated, secure aggregation | centralised | difference (points) |", "|---|---|---|---|"]
    fed_acc, cen_acc = [], []
    with tempfile.TemporaryDirectory(prefix="primia-accuracy-") as tmp:
        out = Path(tmp)
        write_digits(out / "data")
        nodes = start_nodes(out, out / "data", NODE_NAMES, once=False)
        try:
            for seed in (int(s) for s in args.seeds.split(",") if s):
                config = write_config(out / f"federation-{seed}.toml", nodes, output_dir=out / f"run-{seed}",
                                      rounds=args.rounds, seed=seed)
                cfg = load_config(config)
                report = run_hub(cfg, progress=False)
                model = build_model(cfg.model.name, num_classes=10, in_channels=1, input_size=cfg.data.input_size,
                                    width=cfg.model.width, pooling=cfg.model.pooling)
                model.load_state_dict(torch.load(report["outputs"]["model"], weights_only=True))
                fed = holdout_accuracy(model, out / "data", cfg)
                cen = holdout_accuracy(centralised(out / "data", cfg), out / "data", cfg)
                fed_acc.append(fed)
                cen_acc.append(cen)
                rows.append(f"| {seed} | {fed:.4f} | {cen:.4f} | {100 * (fed - cen):+.2f} |")
        finally:
            for node in nodes.values():
                node["process"].terminate()
            stop_nodes(nodes)
    mean_fed, mean_cen = statistics.mean(fed_acc), statistics.mean(cen_acc)
    rows.append(f"| mean | {mean_fed:.4f} | {mean_cen:.4f} | {100 * (mean_fed - mean_cen):+.2f} |")
    print(f"digits: {args.rounds} rounds of one local epoch vs {args.rounds} centralised epochs, "
          "accuracy on the 359 held-out images\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
