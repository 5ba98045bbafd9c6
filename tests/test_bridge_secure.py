"""The encrypted executor (in-process parties): results against torch, costs, and what each party sees."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import mpc
from bridge.plaintext import run_plaintext
from bridge.roles import query_model, serve_model
from bridge.secure import EncryptedModel
from bridge.trace import convert
from mpc.comm import Communicator, InProcessNetwork
from mpc.context import setup_dealer, setup_party
from mpc.dealer import serve_dealer
from mpc.errors import ProtocolError

from .bridge_models import EveryOp, WithSoftmax, narrow_alexnet, narrow_vgg11, realistic, resnet18

#: documented tolerance: |encrypted - plaintext| <= 1e-2 * max |plaintext logit| (docs/inference.md)
REL_TOL = 1e-2


class _Batches:
    def __init__(self, *batches: np.ndarray):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def load(self, index: int, card) -> np.ndarray:
        return self.batches[index]


def _program(ctx, plan, weights, batches, options):
    if ctx.rank == 0:
        out = query_model(ctx, _Batches(*batches), plan=plan, **options)
        return {"logits": [r.logits for r in out["results"]], "probs": [r.probabilities for r in out["results"]],
                "batch_stats": [r.stats for r in out["results"]], "setup": out["setup"]}
    return serve_model(ctx, plan, weights, **options)


def encrypted(model, *batches, **options):
    """Logits per batch from the two roles in-process, plus both parties' outputs."""
    shape = batches[0].shape[1:]
    converted = convert(model, shape)
    arrays = [b.numpy() for b in batches]
    owner, server = mpc.run_local(_program, parties=2, args=(converted.plan, converted.weights, arrays, options))
    return owner, server, converted


def _assert_close(logits: np.ndarray, ref: np.ndarray) -> None:
    err = np.abs(logits - ref).max()
    assert err <= REL_TOL * np.abs(ref).max(), f"max error {err} vs logits up to {np.abs(ref).max()}"
    assert (logits.argmax(1) == ref.argmax(1)).all()


def _batch(shape, n=2, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_every_op_encrypted_matches_torch_and_plaintext_plan():
    model = realistic(EveryOp())
    x = _batch((3, 12, 12), n=3)
    owner, _, converted = encrypted(model, x)
    with torch.no_grad():
        ref = model(x).double().numpy()
    _assert_close(owner["logits"][0], ref)
    plain = run_plaintext(converted.plan, converted.weights, x.numpy())
    np.testing.assert_allclose(owner["logits"][0], plain, atol=2e-3)


def test_resnet18_small_encrypted_within_tolerance_and_costs():
    model = resnet18()
    x1, x2 = _batch((3, 32, 32), n=1, seed=1), _batch((3, 32, 32), n=2, seed=2)
    owner, server, converted = encrypted(model, x1, x2)
    with torch.no_grad():
        _assert_close(owner["logits"][0], model(x1).double().numpy())
        _assert_close(owner["logits"][1], model(x2).double().numpy())
    one, two = owner["batch_stats"]
    # rounds do not grow with the batch; the online figures stay well inside the budget
    assert one["rounds"] == two["rounds"] <= 100
    # the weights are opened once, at set-up: W - B for every multiplied parameter, plus the 32-byte check
    weight_elements = sum(int(np.prod(s)) for k, s in converted.plan.param_shapes().items() if k.endswith(".weight"))
    assert server["setup"]["bytes_sent"] == 8 * weight_elements + 32
    per_batch_sent = server["total"]["bytes_sent"] - server["setup"]["bytes_sent"]
    assert per_batch_sent < 8 * weight_elements / 4  # batches never resend the weights


def test_narrow_vgg11_and_alexnet_encrypted():
    for model, shape in ((narrow_vgg11(), (3, 32, 32)), (narrow_alexnet(), (3, 64, 64))):
        x = _batch(shape)
        owner, _, _ = encrypted(model, x)
        with torch.no_grad():
            _assert_close(owner["logits"][0], model(x).double().numpy())


def test_final_softmax_reveals_centred_logits_and_probabilities():
    torch.manual_seed(3)
    model = WithSoftmax().eval()
    x = _batch((1, 8, 8))
    owner, _, _ = encrypted(model, x)
    with torch.no_grad():
        probs = model(x).double().numpy()
        logits = model.body(x).double().numpy()
    np.testing.assert_allclose(owner["probs"][0], probs, atol=2e-3)
    centred = logits - logits.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(owner["logits"][0], centred, atol=2e-3)


def test_weight_bits_and_comparison_domain_are_options():
    model = resnet18()
    x = _batch((3, 32, 32), n=1)
    owner, _, _ = encrypted(model, x, weight_bits=20, comparison_bits=32)
    with torch.no_grad():
        _assert_close(owner["logits"][0], model(x).double().numpy())


def _mismatch(ctx, plans, weights):
    EncryptedModel(ctx, plans[ctx.rank], weights if ctx.rank == 1 else None)


def test_parties_with_different_architectures_stop_with_a_clear_error():
    a = convert(resnet18(), (3, 32, 32))
    b = convert(resnet18(), (3, 64, 64))
    with pytest.raises(ProtocolError, match="different model"):
        mpc.run_local(_mismatch, parties=2, args=([a.plan, b.plan], a.weights))


# -- what the model server sees ------------------------------------------------------------
class _Recording:
    """A transport that keeps a copy of every array its party receives."""

    def __init__(self, inner):
        self.inner = inner
        self.received: list[np.ndarray] = []

    def send(self, peer, payload):
        self.inner.send(peer, payload)

    def recv(self, peer, timeout_s):
        arr = self.inner.recv(peer, timeout_s)
        self.received.append(np.array(arr, copy=True))
        return arr

    def close(self):
        self.inner.close()


def _run_recorded(plan, weights, x):
    network = InProcessNetwork(3)
    recorder = _Recording(network.endpoint(1))
    results: dict[int, object] = {}

    def party(rank, transport):
        ctx = setup_party(Communicator(rank, 2, transport))
        results[rank] = _program(ctx, plan, weights, [x], {})
        ctx.close()

    def dealer():
        comm = Communicator(2, 2, network.endpoint(2))
        serve_dealer(comm, setup_dealer(comm))

    threads = [threading.Thread(target=party, args=(0, network.endpoint(0))),
               threading.Thread(target=party, args=(1, recorder)), threading.Thread(target=dealer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, recorder.received


def test_model_server_sees_only_masked_values():
    model = resnet18()
    x = _batch((3, 32, 32), n=1)
    converted = convert(model, (3, 32, 32))
    results, received = _run_recorded(converted.plan, converted.weights, x.numpy())
    logits = results[0]["logits"][0]
    image = mpc.encode(x.numpy(), 16).reshape(-1)
    out = mpc.encode(logits, 16).reshape(-1)
    assert received, "the model server received nothing"
    for arr in received:
        flat = arr.reshape(-1)
        if flat.dtype == np.int64 and flat.size >= image.size:
            # a masked image matches the real one in (almost) no position
            assert np.mean(flat[: image.size] == image) < 0.01
        if flat.dtype == np.int64 and flat.size == out.size:
            assert not np.array_equal(flat, out)
    # the model server's program returns statistics only; the reveal went to party 0 alone
    assert set(results[1]) == {"setup", "total", "setup_seconds", "seconds"}


def test_comparison_domain_fits_the_values_it_must_hold():
    from bridge.local import fixed_point_for
    from bridge.secure import comparison_bits_for

    assert comparison_bits_for(12) == 22  # the default: compared values below 2^9 = 512
    assert comparison_bits_for(12, 3000.0) == 25 and comparison_bits_for(4, 1.0) == 16
    with pytest.raises(ValueError):
        comparison_bits_for(20, 2.0**50)
    # a model whose activations reach the thousands gets a wider domain, and stays exact in it
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(18, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(2000.0)
    x = _batch((1, 8, 8), n=1)
    converted = convert(model, (1, 8, 8))
    act_bits, bits = fixed_point_for(converted, x.numpy(), act_bits=12)
    assert act_bits == 12 and bits > 22
    owner, _, _ = encrypted(model, x, comparison_bits=bits)
    with torch.no_grad():
        _assert_close(owner["logits"][0], model(x).double().numpy())


def test_small_outputs_get_finer_activations():
    from bridge.local import fixed_point_for

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = _batch((1, 4, 4), n=2)
    with torch.no_grad():
        model[1].weight.mul_(0.05)
        model[1].bias.zero_()
        ref = model(x).double().numpy()
    converted = convert(model, (1, 4, 4))
    act_bits, bits = fixed_point_for(converted, x.numpy())
    assert act_bits > 12 and 2.0**-act_bits <= 1e-3 * np.abs(ref).max()
    owner, _, _ = encrypted(model, x, act_bits=act_bits, comparison_bits=bits)
    _assert_close(owner["logits"][0], ref)
    assert fixed_point_for(convert(resnet18(), (3, 32, 32)), _batch((3, 32, 32)).numpy())[0] == 12


def _wrong_batch(ctx, plan, weights):
    model = EncryptedModel(ctx, plan, weights if ctx.rank == 1 else None)
    if ctx.rank == 0:
        ctx.share(np.zeros((1, 3, 16, 16)), owner=0, frac_bits=model.act_bits)  # not the plan's 32x32
        ctx.comm.recv_raw(1, None, np.int64)  # wait: the model server hangs up
    else:
        model.share_input(None)


def test_model_server_refuses_a_batch_the_plan_does_not_take():
    converted = convert(resnet18(), (3, 32, 32))
    with pytest.raises(ProtocolError, match=r"batch of shape \(1, 3, 16, 16\)"):
        mpc.run_local(_wrong_batch, parties=2, args=(converted.plan, converted.weights), timeout_s=30)


# -- fresh masks for every weight ---------------------------------------------------------------------
def _two_models(ctx, plan, weights_a, weights_b):
    a = EncryptedModel(ctx, plan, weights_a if ctx.rank == 1 else None)
    b = EncryptedModel(ctx, plan, weights_b if ctx.rank == 1 else None)
    # what the data owner received: W - B for every multiplied parameter of each model, and the mask ids
    return {name: (a.weights[name].ident, b.weights[name].ident, a.weights[name]._delta, b.weights[name]._delta)
            for name in a.weights}


def test_two_models_in_one_context_never_share_a_mask():
    from bridge.fixed import encode_weights

    plan_a = convert(resnet18(seed=0), (3, 16, 16))
    plan_b = convert(resnet18(seed=1), (3, 16, 16))  # same architecture, other weights
    for weights_b in (plan_a.weights, plan_b.weights):  # the same model loaded twice, and two different models
        opened, _ = mpc.run_local(_two_models, parties=2, args=(plan_a.plan, plan_a.weights, weights_b))
        ids = [i for a_id, b_id, _, _ in opened.values() for i in (a_id, b_id)]
        assert len(set(ids)) == len(ids)  # every weight of both models has its own mask id
        ring_a = encode_weights(plan_a.plan, plan_a.weights, act_bits=12, weight_bits=20)
        ring_b = encode_weights(plan_a.plan, weights_b, act_bits=12, weight_bits=20)
        for name, (_, _, delta_a, delta_b) in opened.items():
            # with a shared mask B, (W1 - B) - (W2 - B) would reveal W1 - W2
            leaked = (delta_a - delta_b) == (ring_a[name] - ring_b[name])
            assert leaked.mean() < 0.01, name


# -- never silently wrong: the ring check and errors that name the layer ---------------------------------
def _build(ctx, plan, weights, options):
    EncryptedModel(ctx, plan, weights if ctx.rank == 1 else None, **options)


def test_one_huge_weight_is_refused_naming_the_layer_and_the_fix():
    from bridge.errors import RingOverflowError

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        model[3].weight[1, 5] = 1e12
    converted = convert(model, (1, 8, 8))
    with pytest.raises(RingOverflowError) as err:
        mpc.run_local(_build, parties=2, args=(converted.plan, converted.weights, {}), timeout_s=30)
    assert err.value.source == "3" and err.value.kind == "linear"
    assert "1e+12" in str(err.value) and "rescale" in str(err.value)
    # the same model with sane weights passes, and the check takes measured ranges too
    from bridge.registry import Fixed
    from bridge.sizing import check_ring, check_weights

    sane = convert(resnet18(), (3, 32, 32))
    check_weights(sane.plan, sane.weights, Fixed(12, 20, 22))
    check_ring(sane.plan, sane.weights, Fixed(16, 20, 26), 512.0)
    ranges = {name: 1e9 for name in [converted.plan.input_name, *(op.name for op in converted.plan.ops)]}
    with pytest.raises(RingOverflowError, match="given value ranges"):
        check_ring(converted.plan, {k: v * 0 + 1 for k, v in converted.weights.items()}, Fixed(12, 20, 22), ranges)


class _Offset(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x + 1e30)


def test_an_engine_error_inside_an_op_names_the_layer():
    from bridge.errors import EncryptedOpError

    converted = convert(_Offset().eval(), (4,))
    with pytest.raises(EncryptedOpError) as err:
        mpc.run_local(_forward_once, parties=2, args=(converted.plan, converted.weights), timeout_s=30)
    assert err.value.kind == "add_const" and err.value.op == "add"
    assert isinstance(err.value.cause, mpc.EncodingRangeError) and err.value.__cause__ is err.value.cause
    assert "encrypted layer add (add_const add) failed" in str(err.value)


def _forward_once(ctx, plan, weights):
    model = EncryptedModel(ctx, plan, weights if ctx.rank == 1 else None)
    return model.predict(model.share_input(np.ones((1, 4)) if ctx.rank == 0 else None))


def test_comparison_bound_counts_differences_and_shifts():
    from bridge.plaintext import measure_ranges
    from bridge.sizing import comparison_bound

    class Compares(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.max_pool2d(torch.clamp(x, -1.0, 3.0) + x, 2).sigmoid()

    converted = convert(Compares().eval(), (1, 4, 4))
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 0], x[0, 0, 3, 3] = 50.0, -40.0
    ranges = measure_ranges(converted.plan, converted.weights, x)
    # clamp compares x - low, x - high: up to 50 + 3; the sum reaches 3 + 50 = 53, so the max-pool compares
    # differences up to 2 * 53 (the bound counts both signs); the sigmoid compares its input + 16 <= 53 + 16
    assert ranges["add"] == 53.0
    assert comparison_bound(converted.plan, ranges) == 2 * 53.0
    assert ranges[converted.plan.output] <= 1.0


def _diverged(ctx, plan, weights):
    if ctx.rank == 0:
        ctx.private_ids(1)  # this party drew a mask id the other did not: their masks would not match
    EncryptedModel(ctx, plan, weights if ctx.rank == 1 else None)


def test_parties_whose_mask_ids_diverge_stop_instead_of_combining_wrong_masks():
    converted = convert(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), (4,))
    with pytest.raises(ProtocolError, match="same order"):
        mpc.run_local(_diverged, parties=2, args=(converted.plan, converted.weights), timeout_s=30)
