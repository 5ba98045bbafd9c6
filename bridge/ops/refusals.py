"""Layers the bridge refuses by name, with what to do instead (they have no op kind).

Anything without a rule is refused too, generically; these get a message
that says what kind of layer it is (recurrent, embedding, attention) rather
than the name of the first tensor operation that fails.
"""

from __future__ import annotations

from typing import Any

from ..registry import Refusal, TorchRule

__all__ = ["RULES"]


def _recurrent(t: Any, c: Any) -> None:
    raise Refusal(f"recurrent layer ({type(c.module).__name__}) is not supported: the encrypted executor runs "
                  "feed-forward models (its steps and their count are public and fixed)",
                  "use a convolutional or attention model, or unroll the recurrence into explicit layers")


def _embedding(t: Any, c: Any) -> None:
    raise Refusal(f"{type(c.module).__name__} looks up rows by a secret index",
                  "feed the model one-hot or dense inputs and use nn.Linear")


def _transformer(t: Any, c: Any) -> None:
    raise Refusal(f"attention in torch.nn.{type(c.module).__name__} is not supported as a whole layer",
                  "build the block from nn.MultiheadAttention(batch_first=True), nn.LayerNorm and nn.Linear "
                  "(as torchvision's VisionTransformer does)")


RULES = (
    TorchRule(("nn.RNN", "nn.LSTM", "nn.GRU", "nn.RNNCell", "nn.LSTMCell", "nn.GRUCell"), _recurrent),
    TorchRule(("nn.Embedding", "nn.EmbeddingBag"), _embedding),
    TorchRule(("nn.Transformer", "nn.TransformerEncoder", "nn.TransformerDecoder", "nn.TransformerEncoderLayer",
               "nn.TransformerDecoderLayer"), _transformer),
)
