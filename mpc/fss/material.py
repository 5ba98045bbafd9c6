"""The dealer's material for the 2-party FSS comparison: one DCF key per element plus the masks.

Seed compression: each party's root seed, its share of the mask r, its mask
bits e, (party 0) its shares of delta, delta r, delta r_k and (party 1) its
shares of R, eps come from its own dealer stream.  What crosses the network is only what cannot be drawn:
  - to both parties: the DCF correction words (identical in both keys),
    :func:`mpc.fss.dcf.key_bytes` (l - 1) bytes per element:
    16 (l - 8) + 4 or 8 + 16, i.e. 920 B for l = 64 and 404 B for l = 32;
  - to party 1: its shares of delta, delta r (ReLU) and delta r_k, 8 B each;
  - to party 0, for l < 64: its shares of R = r >> (l - 1) and eps (the
    overflow terms), 8 B each, so that both parties receive the same bytes
    for a ReLU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..dealer import Material, register_material
from ..prg import Stream
from ..protocols.drelu import (
    MAX_COMPARE_ELEMENTS,
    InjectionMasks,
    assemble_injection,
    compared_bits,
    draw_injection,
    injection_corrections,
    injection_delivery,
    validate_compare_params,
)
from . import dcf

__all__ = ["FssCompare", "FssDraw", "MAX_KEY_BYTES", "max_batch"]

#: largest total of correction words one request may ask the dealer to produce: 1 GiB,
#: so that one key message stays well inside the network layer's 2 GiB message limit
#: (1.1 M comparisons at l = 64, 2.6 M at l = 32; mpc.nonlinear.drelu splits larger batches)
MAX_KEY_BYTES = 1 << 30


def max_batch(bits: int, payloads: int, slack: int = 0) -> int:
    """The most comparisons one ``cmp_fss`` request may hold."""
    by_keys = MAX_KEY_BYTES // dcf.key_bytes(compared_bits(bits, slack))
    return max(1, min(by_keys, MAX_COMPARE_ELEMENTS, 2 * MAX_COMPARE_ELEMENTS // (1 + payloads)))


class FssDraw(NamedTuple):
    seed: np.ndarray  # (n, 2) uint64 root seed of this party's DCF key
    masks: InjectionMasks
    key: dcf.DcfKey | None


class FssCompare(Material):
    """DCF keys for [y^_low < r_low] over l - 1 - k bits, and the injection masks (2 parties).

    Params: ``n``, ``bits`` (l), ``with_x``, ``payloads`` (w), ``slack`` (k, optional, 0).
    """

    name = "cmp_fss"
    #: both parties get a DCF key and party 1 the injection's corrections: the domain check's go to party 0
    overflow_rank = 0

    def validate(self, params: dict[str, Any]) -> None:
        validate_compare_params(params)
        total = params["n"] * dcf.key_bytes(compared_bits(params["bits"], params.get("slack", 0)))
        if total > MAX_KEY_BYTES:
            raise ValueError(f"{params['n']} comparisons need {total} B of DCF keys, above {MAX_KEY_BYTES}")

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> FssDraw:
        seed = dcf.random_seeds(stream.ring((params["n"], 2)).view(np.uint64))
        return FssDraw(seed, draw_injection(rank, stream, params, overflow_rank=self.overflow_rank), None)

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        n, domain = params["n"], compared_bits(params["bits"], params.get("slack", 0))
        key = [
            ((dcf.tree_levels(domain), n, 2), np.uint64),
            ((n,), dcf.vcw_dtype(domain)),
            ((n, 2), np.uint64),
        ]
        return key + injection_delivery(rank, params, overflow_rank=self.overflow_rank)

    def combine(self, draws: list[FssDraw], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        if len(draws) != 2:
            raise ValueError(f"FSS comparison keys are for 2 parties, not {len(draws)}")
        bits, slack = params["bits"], params.get("slack", 0)
        r = (draws[0].masks.r + draws[1].masks.r).view(np.uint64)
        alpha = (r & np.uint64((1 << (bits - 1)) - 1)) >> np.uint64(slack)
        m = ((r >> np.uint64(bits - 1)) & np.uint64(1)).astype(np.uint8)
        key = dcf.gen(alpha, compared_bits(bits, slack), draws[0].seed, draws[1].seed)
        words = [key.cw, key.vcw, key.leaf]
        out = {0: list(words), 1: list(words)}
        for rank, corrections in injection_corrections([d.masks for d in draws], m, params,
                                                        overflow_rank=self.overflow_rank).items():
            out[rank].append(corrections)
        return out

    def assemble(self, rank: int, drawn: FssDraw, received: list[np.ndarray], params: dict[str, Any]) -> FssDraw:
        key = dcf.DcfKey(received[0], received[1], received[2])
        masks = assemble_injection(rank, drawn.masks, received, params, overflow_rank=self.overflow_rank)
        return FssDraw(drawn.seed, masks, key)


register_material(FssCompare())
