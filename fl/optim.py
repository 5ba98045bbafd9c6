"""Local optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with torch.optim's update rules.

Why not ``torch.optim``: in this torch every optimizer step imports
``torch._dynamo`` (5-7 s of CPU per process on a 2-core machine), which every
node process would pay on its first round.  These few lines compute the same
updates (``tests/test_fl_training.py`` checks them against ``torch.optim``
step by step) and keep their state as plain tensors.

SGD (dampening 0):  g ← ∇ + λ p;  b ← μ b + g (b = g at the first step);
                     g ← g + μ b (Nesterov) or b;  p ← p - η g
Adam:               g ← ∇ (+ λ p for adam);  p ← p (1 - η λ) for adamw;
                     m ← β1 m + (1 - β1) g;  v ← β2 v + (1 - β2) g²;
                     p ← p - η/(1 - β1^t) · m / (√v / √(1 - β2^t) + ε)
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

__all__ = ["LocalOptimizer", "make_local_optimizer"]

_EPS = 1e-8


class LocalOptimizer:
    """One of 'sgd', 'adam', 'adamw' over a list of parameters; ``lr`` may change between steps."""

    def __init__(self, params: Iterable[torch.nn.Parameter], kind: str, *, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0):
        if kind not in ("sgd", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.params = [p for p in params if p.requires_grad]
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.betas = betas
        self.weight_decay = weight_decay
        self.steps = 0
        self.buffers: list[list[torch.Tensor]] = []  # per parameter: [momentum] or [m, v]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if not self.buffers:
            self.buffers = [self._new_state(p) for p in self.params]
        self.steps += 1
        for p, state in zip(self.params, self.buffers):
            if p.grad is None:
                continue
            if self.kind == "sgd":
                self._sgd(p, state)
            else:
                self._adam(p, state)

    def _new_state(self, p: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "sgd":
            return [] if self.momentum == 0 else [torch.empty(0)]
        return [torch.zeros_like(p), torch.zeros_like(p)]

    def _sgd(self, p: torch.Tensor, state: list[torch.Tensor]) -> None:
        grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
        if self.momentum:
            if state[0].numel() == 0:
                state[0] = grad.clone()
            else:
                state[0].mul_(self.momentum).add_(grad)
            grad = grad.add(state[0], alpha=self.momentum) if self.nesterov else state[0]
        p.add_(grad, alpha=-self.lr)

    def _adam(self, p: torch.Tensor, state: list[torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        grad = p.grad
        if self.weight_decay:
            if self.kind == "adamw":
                p.mul_(1 - self.lr * self.weight_decay)
            else:
                grad = grad.add(p, alpha=self.weight_decay)
        m, v = state
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self.steps
        bias2 = 1 - beta2**self.steps
        denom = (v.sqrt() / math.sqrt(bias2)).add_(_EPS)
        p.addcdiv_(m, denom, value=-self.lr / bias1)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as plain data (copies)."""
        return {"steps": self.steps, "buffers": [[t.clone() for t in state] for state in self.buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = state["buffers"]
        if buffers and len(buffers) != len(self.params):
            raise ValueError(f"optimizer state for {len(buffers)} parameters, this model has {len(self.params)}")
        self.steps = int(state["steps"])
        self.buffers = [[t.clone() for t in entry] for entry in buffers]


def make_local_optimizer(model: torch.nn.Module, cfg: Any, lr: float) -> LocalOptimizer:
    """The optimizer ``cfg`` (a :class:`fl.config.TrainingConfig`) names, for ``model``'s parameters."""
    return LocalOptimizer(
        model.parameters(), cfg.optimizer, lr=lr, momentum=cfg.momentum if cfg.optimizer == "sgd" else 0.0,
        nesterov=cfg.nesterov, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
    )
