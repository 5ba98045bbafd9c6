"""Local training and evaluation on a node.

:class:`LocalTrainer` holds one run's model, the node's images (already
decoded, uint8, in memory) and its optimizer state.  Each round it loads the
global weights, trains for ``training.local_epochs`` passes or
``training.local_steps`` steps at the learning rate the hub chose for the
round, and returns the update ``local - global`` as one float32 vector.

Optimizer state (momentum, Adam moments) stays on the node.  With
``training.optimizer_state = "keep"`` round r starts from the state saved at
the end of the latest earlier round this node trained, so a round that is run
again (after a hub restart) starts from the same state as the first time.

Randomness (shuffling, augmentation) is seeded from (run seed, node name,
round): a rerun of a round on the same data reproduces it exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import Config, TrainingConfig
from .metrics import EvalSummary, summarize_predictions
from .models import Layout
from .optim import make_local_optimizer

__all__ = ["round_lr", "TrainResult", "LocalTrainer", "derive_seed", "evaluate_model"]

_EVAL_BATCH = 256
_KEPT_STATES = 2


def round_lr(cfg: TrainingConfig, round_index: int, rounds: int) -> float:
    """Learning rate for round ``round_index`` (0-based) of ``rounds``; the hub sends it to every node."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        progress = round_index / max(rounds - 1, 1)
        return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.gamma ** (round_index // cfg.step_rounds)
    return cfg.lr * cfg.gamma**round_index


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class TrainResult:
    """What a node reports about its local training (plain numbers, sent to the hub)."""

    loss: float
    accuracy: float
    samples: int
    steps: int

    def as_plain(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "samples": self.samples, "steps": self.steps}


class LocalTrainer:
    """A node's model, data and optimizer state for one run.

    Args:
        cfg: the run's configuration (from the hub).
        model: built for the run's classes and channels.
        images: uint8 (N, C, S, S).
        labels: int64 (N,), indices into the run's class list.
        train_idx, val_idx: the local split.
        augment: per-image transform for training (float (C, S, S) in [0, 1]), or None.
        node_name: mixed into the seeds.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        num_classes: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        node_name: str = "node",
        device: str = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.layout = Layout.of(model)
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.train_idx = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
        self.val_idx = torch.from_numpy(np.asarray(val_idx, dtype=np.int64))
        self.num_classes = num_classes
        self.augment = augment
        self.node_name = node_name
        channels = images.shape[1]
        mean = torch.tensor(cfg.data.mean, dtype=torch.float32)
        std = torch.tensor(cfg.data.std, dtype=torch.float32)
        self._mean = mean.expand(channels).reshape(1, channels, 1, 1).clone() if mean.numel() == 1 else mean.reshape(1, -1, 1, 1)
        self._std = std.expand(channels).reshape(1, channels, 1, 1).clone() if std.numel() == 1 else std.reshape(1, -1, 1, 1)
        self._opt_states: dict[int, dict[str, Any]] = {}

    @property
    def train_samples(self) -> int:
        return int(self.train_idx.numel())

    @property
    def val_samples(self) -> int:
        return int(self.val_idx.numel())

    def _batch(self, idx: torch.Tensor, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].to(torch.float32) / 255.0
        if train and self.augment is not None:
            x = torch.stack([self.augment(img) for img in x])
        x = (x - self._mean) / self._std
        return x.to(self.device), self.labels[idx].to(self.device)

    def _batches(self, generator: torch.Generator) -> Any:
        """Endless shuffled passes over the training split, yielding index batches."""
        n, bs = self.train_samples, self.cfg.training.batch_size
        while True:
            order = self.train_idx[torch.randperm(n, generator=generator)]
            for start in range(0, n, bs):
                chunk = order[start : start + bs]
                if chunk.numel() == 1 and n > 1:
                    continue  # BatchNorm cannot train on a batch of one
                yield chunk

    def steps_per_round(self) -> int:
        t = self.cfg.training
        if t.local_steps:
            return t.local_steps
        n, bs = self.train_samples, t.batch_size
        per_epoch = n // bs + (n % bs > 1)  # as many batches as _batches yields per pass
        return max(per_epoch, 1) * t.local_epochs

    def train_round(self, round_index: int, global_flat: np.ndarray, lr: float) -> tuple[np.ndarray, TrainResult]:
        """Train from the global weights; return (local - global) as float32, and the training figures."""
        if self.train_samples == 0:
            raise ValueError("this node has no training images (every image went to validation)")
        seed = derive_seed(self.cfg.run.seed, self.node_name, round_index)
        torch.manual_seed(seed)  # augmentations draw from the global generator
        generator = torch.Generator().manual_seed(seed)
        self.layout.load(self.model, global_flat)
        optimizer = make_local_optimizer(self.model, self.cfg.training, lr)
        if self.cfg.training.optimizer_state == "keep":
            earlier = [r for r in self._opt_states if r < round_index]
            if earlier:
                optimizer.load_state_dict(self._opt_states[max(earlier)])
        self.model.train()
        loss_fn = nn.CrossEntropyLoss()
        total_loss, correct, seen, steps = 0.0, 0, 0, self.steps_per_round()
        batches = self._batches(generator)
        for _ in range(steps):
            x, y = self._batch(next(batches), train=True)
            optimizer.zero_grad()
            out = self.model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        if self.cfg.training.optimizer_state == "keep":
            self._opt_states[round_index] = optimizer.state_dict()
            for r in sorted(self._opt_states)[:-_KEPT_STATES]:
                del self._opt_states[r]
        delta = self.layout.flatten(self.model) - global_flat
        return delta, TrainResult(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps)

    @torch.no_grad()
    def evaluate(self, flat: np.ndarray) -> EvalSummary:
        """Metrics of the given weights on the local validation split."""
        self.layout.load(self.model, flat)
        return evaluate_model(self.model, lambda idx: self._batch(idx, train=False), self.val_idx, self.num_classes)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    indices: torch.Tensor,
    num_classes: int,
) -> EvalSummary:
    """Run ``model`` in eval mode over ``indices`` and summarise the predictions."""
    model.eval()
    probs, labels = [], []
    for start in range(0, int(indices.numel()), _EVAL_BATCH):
        x, y = batch(indices[start : start + _EVAL_BATCH])
        probs.append(torch.softmax(model(x).to(torch.float64), dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    if not probs:
        return summarize_predictions(np.zeros(0, np.int64), np.zeros((0, num_classes)), num_classes)
    return summarize_predictions(np.concatenate(labels), np.concatenate(probs), num_classes)
