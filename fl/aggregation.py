"""Federated averaging as plain numpy: weights, the weighted mean, and the server step.

FedAvg (McMahan et al. 2017): node i trains from the global weights g and
returns the update u_i = local_i - g; the hub forms the weighted mean
ū = Σ w_i u_i / Σ w_i over the nodes that completed the round, with w_i the
node's training-sample count (``weighting = "samples"``) or 1
(``"equal"``), normalised to sum to one over the nodes asked to train.
The same mean covers BatchNorm running statistics (they are in the update
vector).

The server step (FedAvgM, Hsu et al. 2019) applies ū to the parameters
through momentum: v ← β v + ū, g ← g + η v; running statistics take ū
directly.  With η = 1 and β = 0 this is exactly FedAvg: g ← Σ w_i local_i / Σ w_i.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["round_weights", "weighted_mean", "WeightedSum", "ServerOptimizer"]

_CHUNK = 1 << 16


def round_weights(samples: Mapping[str, int], weighting: str) -> dict[str, float]:
    """Each node's weight for a round, summing to one.

    Raises:
        ValueError: unknown weighting, no nodes, or no samples at all.
    """
    if not samples:
        raise ValueError("no nodes to weight")
    if weighting == "equal":
        return {name: 1.0 / len(samples) for name in samples}
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}")
    total = sum(samples.values())
    if total <= 0:
        raise ValueError("the nodes hold no training samples")
    return {name: count / total for name, count in samples.items()}


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ w_i a_i / Σ w_i in float64."""
    acc = WeightedSum()
    for arr, w in zip(arrays, weights, strict=True):
        acc.add(arr, w)
    return acc.mean()


class WeightedSum:
    """A running Σ w_i a_i and Σ w_i, so that updates can be folded in as they arrive."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.weight = 0.0
        self.count = 0

    def add(self, arr: np.ndarray, weight: float) -> None:
        arr = np.asarray(arr)
        if self.total is None:
            self.total = np.zeros(arr.shape, dtype=np.float64)
        flat_total, flat = self.total.reshape(-1), arr.reshape(-1)
        for start in range(0, flat.size, _CHUNK):  # cache-sized pieces: no array-sized temporaries
            piece = flat_total[start : start + _CHUNK]
            piece += np.multiply(flat[start : start + _CHUNK], weight, dtype=np.float64)
        self.weight += weight
        self.count += 1

    def mean(self) -> np.ndarray:
        if self.total is None or self.weight <= 0:
            raise ValueError("nothing to average")
        return self.total / self.weight


class ServerOptimizer:
    """FedAvgM on a flat weight vector; ``param_mask`` marks trained parameters (the rest are statistics)."""

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0, param_mask: np.ndarray):
        self.lr = lr
        self.momentum = momentum
        self.param_mask = np.asarray(param_mask, dtype=bool)
        self.velocity: np.ndarray | None = None

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        """The new global weights (float32) from the old ones and the averaged update."""
        update = np.asarray(mean_update, dtype=np.float64)
        if self.momentum:
            if self.velocity is None:
                self.velocity = np.zeros(update.shape, dtype=np.float64)
            self.velocity *= self.momentum
            self.velocity += update
            step = self.velocity
        else:
            step = update
        new = weights.astype(np.float64)
        new[self.param_mask] += self.lr * step[self.param_mask]
        new[~self.param_mask] += update[~self.param_mask]
        return new.astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        velocity = state.get("velocity")
        self.velocity = None if velocity is None else np.asarray(velocity, dtype=np.float64).copy()
