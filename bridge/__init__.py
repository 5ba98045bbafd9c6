"""primia's torch bridge: encrypted inference of torch models on the MPC engine.

    import bridge
    result = bridge.infer_local(model.eval(), images)   # three processes on 127.0.0.1
    result.logits, result.stats["seconds"], result.stats["rounds"], result.stats["bytes"]

- :mod:`bridge.ops`: every layer type, one :class:`~bridge.registry.OpKind` record each (trace
  rule, plaintext rule, encrypted rule, what it compares, what it forms in the ring).
- :mod:`bridge.trace`: ``torch.fx`` tracing into a :class:`~bridge.plan.Plan` (public
  architecture) and the weights (private), with BatchNorm folding; names every blocker at once.
- :mod:`bridge.interpret`: the one loop both executors run; :mod:`bridge.windows`: the one
  pooling and resampling geometry.
- :mod:`bridge.plaintext`: the plan in float64 numpy (checks the conversion).
- :mod:`bridge.secure`: the plan on secret-shared tensors.
- :mod:`bridge.sizing`: comparison domains from value ranges (differences included), the ring check.
- :mod:`bridge.roles`: the model server and data owner programs.
- :mod:`bridge.local`: :func:`infer_local`.
- :mod:`bridge.service`: the roles as ``primia infer`` runs them (files in, JSON out).
- :mod:`bridge.card`, :mod:`bridge.models`, :mod:`bridge.images`: model cards, weights, images.

See docs/inference.md.  The names below load on first use: party processes
import :mod:`bridge.plan` and :mod:`bridge.secure` without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "convert",
    "ConvertedModel",
    "Plan",
    "Op",
    "SUPPORTED",
    "run_plaintext",
    "infer_local",
    "InferenceResult",
]

_HOMES = {
    "convert": "trace",
    "ConvertedModel": "trace",
    "SUPPORTED": "trace",
    "Plan": "plan",
    "Op": "plan",
    "run_plaintext": "plaintext",
    "infer_local": "local",
    "InferenceResult": "local",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
