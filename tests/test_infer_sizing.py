"""Fixed point sized from measured bounds in every entry point: right results, or a clear refusal.

Regression tests for issue 13 item 1: ``primia infer --local ... --std 0.0005``
exited 0 with wrong classes because the command line never sized its fixed
point.  Now ``bridge.infer_local``, ``primia infer --local`` and the networked
roles all size from bounds someone measured (:mod:`bridge.sizing`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bridge
from bridge.card import Bounds, ModelCard
from bridge.images import load_batch
from bridge.models import card_from_state, load_model, load_state_dict
from bridge.sizing import (
    WIDEN_BITS,
    InferenceOverflow,
    check_inputs,
    run_with_retry,
    size_fixed_point,
)
from cli.main import main
from fl.models import build_model
from mpc.errors import ConfigError, EncodingRangeError, PeerFailure

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-2  # of the largest logit, as documented


def test_infer_local_refuses_a_model_beyond_the_ring_naming_the_op():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 1e12
    with pytest.raises(ConfigError, match=r"met at \S+ \(conv2d\)\) do not fit the 64-bit ring"):
        bridge.infer_local(model, torch.ones(1, 1, 6, 6))


# -- the one sizing function -----------------------------------------------------------------------
def _bounds(**over) -> Bounds:
    values = dict(input=2.0, compared=100.0, values=100.0, logit=5.0, images=10, margin=4.0, values_at="conv1")
    values.update(over)
    return Bounds(**values)


def test_sizing_holds_the_margin_times_every_measured_magnitude():
    for compared in (1.0, 100.0, 3000.0, 1e6):
        fixed = size_fixed_point(_bounds(compared=compared, values=compared))
        # the domain holds every compared difference up to margin x the measured one
        assert 4.0 * compared < 2.0 ** (fixed.comparison_bits - 1 - fixed.act_bits)
        # and products of values up to margin x the measured ones fit the ring
        assert 4.0 * compared * 2.0 ** (fixed.act_bits + fixed.weight_bits) < 2.0**62
    small = size_fixed_point(_bounds(logit=0.01, compared=0.5, values=0.5))
    assert small.act_bits > 12 and 2.0**-small.act_bits <= 1e-3 * 0.01 * 2  # a unit well below the logits
    assert size_fixed_point(_bounds(), act_bits=14, comparison_bits=40).options() == {
        "act_bits": 14, "weight_bits": 20, "comparison_bits": 40}
    assert size_fixed_point(_bounds(), widen_bits=WIDEN_BITS).comparison_bits == (
        size_fixed_point(_bounds()).comparison_bits + WIDEN_BITS)
    assert size_fixed_point(None, act_bits=12, comparison_bits=30).comparison_bits == 30
    with pytest.raises(ConfigError, match="--calibrate DIR"):
        size_fixed_point(None)
    with pytest.raises(ConfigError, match="64-bit ring"):
        size_fixed_point(_bounds(values=1e13))
    with pytest.raises(ConfigError, match="use at least"):
        size_fixed_point(_bounds(compared=3000.0), comparison_bits=22)


def test_bounds_travel_in_the_card_and_are_checked():
    card = ModelCard(name="simple_cnn", num_classes=2, bounds=_bounds())
    assert ModelCard.from_bytes(card.to_bytes()) == card
    for bad in ({"margin": 0.5}, {"compared": float("nan")}, {"images": 0}, {"input": -1.0}):
        with pytest.raises(ConfigError, match="bounds"):
            _bounds(**bad)
    raw = dict(name="simple_cnn", num_classes=2, bounds={"input": 1.0, "compared": 1.0, "values": 1.0, "logit": 1.0,
                                                          "images": 1, "margin": 2.0, "evil": 1})
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelCard.from_dict(raw)


def test_inputs_beyond_the_calibrated_range_are_refused_by_name():
    bounds = _bounds(input=2.0, margin=4.0)
    check_inputs(np.full((2, 1, 4, 4), 7.9), bounds, ["a.png", "b.png"])
    x = np.zeros((3, 1, 4, 4))
    x[1, 0, 0, 0] = -8.5
    x[2, 0, 1, 1] = np.nan
    with pytest.raises(ConfigError, match=r"2 input\(s\).*b\.png \(up to 8\.5\), c\.png \(up to nan\)"):
        check_inputs(x, bounds, ["a.png", "b.png", "c.png"])
    check_inputs(x, None, ["a.png", "b.png", "c.png"])  # no bounds (explicit settings): nothing to check against


def test_an_overflow_is_retried_once_wider_then_refused():
    calls = []

    def overflowing_once(widen_bits):
        calls.append(widen_bits)
        if len(calls) == 1:
            raise EncodingRangeError(1e20, 2.0**50, 12)
        return "logits"

    assert run_with_retry(overflowing_once) == "logits" and calls == [0, WIDEN_BITS]

    def always(widen_bits):
        raise EncodingRangeError(1e20, 2.0**50, 12)

    with pytest.raises(InferenceOverflow, match="calibrate on images like these"):
        run_with_retry(always)
    calls.clear()

    def other(widen_bits):
        calls.append(widen_bits)
        raise PeerFailure("party 1", "gone")

    with pytest.raises(PeerFailure):
        run_with_retry(other)
    assert calls == [0]  # only overflows are retried
