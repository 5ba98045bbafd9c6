"""Local optimizers, schedules, FedAvg and the server step, checkpoints."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from fl.aggregation import ServerOptimizer, round_weights, weighted_mean
from fl.checkpoint import load_checkpoint, save_checkpoint, write_json
from fl.config import TrainingConfig
from fl.errors import ResumeError
from fl.models import Layout, build_model
from fl.optim import LocalOptimizer
from fl.training import round_lr
from mpc.errors import ConfigError

TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@pytest.mark.parametrize("kind, options", [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}),
    ("sgd", {"momentum": 0.8, "nesterov": True}),
    ("adam", {"weight_decay": 1e-2, "betas": (0.8, 0.99)}),
    ("adamw", {"weight_decay": 1e-2}),
])
def test_local_optimizers_follow_torch_optim_step_by_step(kind, options):
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    theirs = copy.deepcopy(ours)
    opt = LocalOptimizer(ours.parameters(), kind, lr=0.05, **options)
    ref = TORCH_OPTIMIZERS[kind](theirs.parameters(), lr=0.05, **options)
    for step in range(12):
        if step == 6:  # the state survives a save and load, as between rounds
            state = opt.state_dict()
            opt = LocalOptimizer(ours.parameters(), kind, lr=0.05, **options)
            opt.load_state_dict(state)
        x = torch.randn(8, 5)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedules():
    cosine = TrainingConfig(lr=0.1, end_lr=0.01, lr_schedule="cosine")
    assert round_lr(cosine, 0, 5) == pytest.approx(0.1) and round_lr(cosine, 4, 5) == pytest.approx(0.01)
    assert round_lr(cosine, 2, 5) == pytest.approx(0.055)
    step = TrainingConfig(lr=0.1, lr_schedule="step", step_rounds=2, gamma=0.5)
    assert [round_lr(step, r, 6) for r in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert round_lr(TrainingConfig(lr=0.2, lr_schedule="exponential", gamma=0.5), 3, 9) == pytest.approx(0.025)


def test_fedavg_weights_and_mean(rng):
    assert round_weights({"a": 30, "b": 10}, "samples") == {"a": 0.75, "b": 0.25}
    assert round_weights({"a": 30, "b": 10}, "equal") == {"a": 0.5, "b": 0.5}
    arrays = [rng.normal(size=6) for _ in range(3)]
    assert np.allclose(weighted_mean(arrays, [1, 2, 3]), (arrays[0] + 2 * arrays[1] + 3 * arrays[2]) / 6)


def test_server_step_is_fedavg_by_default_and_momentum_spares_statistics():
    model = build_model("simple_cnn", num_classes=3, in_channels=1, input_size=8, width=2)
    layout = Layout.of(model)
    mask = layout.param_mask()
    assert mask.any() and not mask.all()  # BatchNorm running statistics are in the vector too
    weights = layout.flatten(model)
    update = np.full(layout.size, 0.5)
    plain = ServerOptimizer(param_mask=mask).step(weights, update)
    assert np.allclose(plain, weights + 0.5)
    momentum = ServerOptimizer(lr=1.0, momentum=0.9, param_mask=mask)
    once = momentum.step(weights, update)
    twice = momentum.step(once, update)
    assert np.allclose(twice[mask], once[mask] + 0.5 * 1.9)
    assert np.allclose(twice[~mask], once[~mask] + 0.5)
    restored = ServerOptimizer(lr=1.0, momentum=0.9, param_mask=mask)
    restored.load_state(momentum.state())
    assert np.array_equal(restored.step(twice, update), momentum.step(twice, update))


def test_layout_round_trip_and_model_checks():
    model = build_model("simple_cnn", num_classes=4, in_channels=3, input_size=12, width=3)
    layout = Layout.of(model)
    flat = np.arange(layout.size, dtype=np.float32)
    layout.load(model, flat)
    assert np.array_equal(layout.flatten(model), flat)
    assert Layout.from_plain(layout.as_plain()).first_difference(layout) is None
    other = Layout.of(build_model("simple_cnn", num_classes=5, in_channels=3, input_size=12, width=3))
    assert "fc.weight" in layout.first_difference(other)
    with pytest.raises(ConfigError, match="data.input_size"):
        build_model("simple_cnn", num_classes=2, in_channels=1, input_size=2)


def test_checkpoints_are_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"round": 3, "model": {"w": torch.ones(2)}, "extra": np.arange(3), "history": [{"a": None}]})
    state = load_checkpoint(path)
    assert state["round"] == 3 and torch.equal(state["extra"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(ResumeError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": 1, "x": Evil()}, protocol=2))
    with pytest.raises(ResumeError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt")
    write_json(tmp_path / "r.json", {"x": float("nan"), "y": np.float32(1.5)})
    assert (tmp_path / "r.json").read_text() == '{\n  "x": null,\n  "y": 1.5\n}'
