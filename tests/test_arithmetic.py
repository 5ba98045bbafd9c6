"""Every arithmetic operation against a float64 numpy/torch reference, for 2, 3 and 5 parties.

Tolerances: an input encodes with error <= 2^-17; a product truncates with an
error below 2^-16; so |mpc - exact| <= 2^-16 + (|x| + |y|) 2^-17 per product term.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import mpc
from tests.conftest import PARTY_COUNTS

ULP = 2.0**-16
HALF = 2.0**-17
parties_st = st.sampled_from(PARTY_COUNTS)
finite = st.floats(-1000, 1000, allow_nan=False, width=64)


def two_inputs(a, b, parties, fn, **kw):
    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(b if ctx.rank == ctx.parties - 1 else None, owner=ctx.parties - 1)
        return fn(x, y).reveal()

    outs = mpc.run_local(program, parties=parties, **kw)
    for other in outs[1:]:
        assert np.array_equal(other, outs[0]), "parties revealed different values"
    return outs[0]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), parties=parties_st)
def test_add_sub_shared_and_public(data, parties):
    shape = data.draw(array_shapes(max_dims=3, max_side=6))
    a = data.draw(arrays(np.float64, shape, elements=finite))
    b = data.draw(arrays(np.float64, shape, elements=finite))
    c = data.draw(arrays(np.float64, shape[-1:], elements=finite))
    got = two_inputs(a, b, parties, lambda x, y: (x + y) - (y - c) + 3 - x + x)
    np.testing.assert_allclose(got, a + c + 3, atol=6 * HALF)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), parties=parties_st)
def test_mul_shared_shared_with_broadcasting(data, parties):
    shape = data.draw(array_shapes(min_dims=1, max_dims=3, max_side=6))
    a = data.draw(arrays(np.float64, shape, elements=finite))
    b = data.draw(arrays(np.float64, shape[-1:], elements=finite))
    got = two_inputs(a, b, parties, lambda x, y: x * y)
    bound = ULP + (np.abs(a) + np.abs(b)) * HALF + HALF**2
    assert np.all(np.abs(got - a * b) <= bound)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), parties=parties_st)
def test_mul_by_public_real_and_integer(data, parties):
    shape = data.draw(array_shapes(max_dims=2, max_side=8))
    a = data.draw(arrays(np.float64, shape, elements=finite))
    k = data.draw(st.integers(-1000, 1000))
    r = data.draw(st.floats(-50, 50, allow_nan=False))

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        return (x * k).reveal(), (x * r).reveal()

    got_int, got_real = mpc.run_local(program, parties=parties)[0]
    # integers join at scale 0, so only the input's encoding error remains
    assert np.all(np.abs(got_int - a * k) <= abs(k) * HALF + 1e-12)
    assert np.all(np.abs(got_real - a * r) <= ULP + abs(r) * HALF + np.abs(a) * HALF + 1e-9)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_mul_by_public_values(rng, parties):
    a = rng.uniform(-100, 100, size=(4, 5))
    k = rng.integers(-50, 50, size=(5,))
    r = rng.uniform(-3, 3, size=(4, 1))

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        return (x * k).reveal(), (x * r).reveal(), (r * x).reveal(), (x / 4.0).reveal()

    xi, xr, rx, xd = mpc.run_local(program, parties=parties)[0]
    np.testing.assert_allclose(xi, a * k, atol=50 * HALF)
    np.testing.assert_allclose(xr, a * r, atol=ULP + 3 * HALF + 100 * HALF)
    np.testing.assert_allclose(xr, rx, atol=ULP)  # each truncation rounds either way
    np.testing.assert_allclose(xd, a / 4, atol=ULP + HALF)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), parties=parties_st)
def test_matmul_shared_shared(data, parties):
    m, k, n = (data.draw(st.integers(1, 12)) for _ in range(3))
    a = data.draw(arrays(np.float64, (m, k), elements=st.floats(-20, 20, width=64)))
    b = data.draw(arrays(np.float64, (k, n), elements=st.floats(-20, 20, width=64)))
    got = two_inputs(a, b, parties, lambda x, y: x @ y)
    bound = ULP + k * (40 * HALF + HALF**2)
    assert np.all(np.abs(got - a @ b) <= bound)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_matmul_batched_vector_and_public(rng, parties):
    a = rng.normal(size=(2, 3, 4))
    b = rng.normal(size=(4, 5))
    v = rng.normal(size=(4,))

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(b if ctx.rank == 1 else None, owner=1)
        return (x @ y).reveal(), (x @ v).reveal(), (b.T @ x[0].T).reveal(), mpc.matmul(x, b).reveal()

    xy, xv, bx, xb = mpc.run_local(program, parties=parties)[0]
    np.testing.assert_allclose(xy, a @ b, atol=1e-3)
    np.testing.assert_allclose(xv, a @ v, atol=1e-3)
    np.testing.assert_allclose(bx, b.T @ a[0].T, atol=1e-3)
    np.testing.assert_allclose(xb, a @ b, atol=1e-3)


conv_cases = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(0, 2), dilation=(2, 1), groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
    dict(stride=1, padding=1, dilation=1, groups=4),  # depthwise
]


@pytest.mark.parametrize("parties", PARTY_COUNTS)
@pytest.mark.parametrize("case", conv_cases)
def test_conv2d_shared_shared_against_torch(rng, parties, case):
    x = rng.uniform(-2, 2, size=(2, 4, 9, 8))
    w = rng.uniform(-1, 1, size=(8, 4 // case["groups"], 3, 2))
    bias = rng.uniform(-1, 1, size=8)

    def program(ctx):
        xs = ctx.share(x if ctx.rank == 0 else None, owner=0)
        ws = ctx.share(w if ctx.rank == 1 else None, owner=1)
        bs = ctx.share(bias if ctx.rank == 1 else None, owner=1)
        return mpc.conv2d(xs, ws, bs, **case).reveal(), mpc.conv2d(xs, w, bias, **case).reveal()

    shared, public_w = mpc.run_local(program, parties=parties)[0]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), **case).numpy()
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    bound = 2 * ULP + fan_in * 3 * HALF
    assert shared.shape == ref.shape
    assert np.abs(shared - ref).max() <= bound
    assert np.abs(public_w - ref).max() <= bound


def test_conv2d_resnet_stem_shape(rng):
    x = rng.uniform(-2, 2, size=(1, 3, 32, 32))
    w = rng.uniform(-0.2, 0.2, size=(16, 3, 7, 7))

    def program(ctx):
        xs = ctx.share(x if ctx.rank == 0 else None, owner=0)
        ws = ctx.share(w if ctx.rank == 1 else None, owner=1)
        return mpc.conv2d(xs, ws, stride=2, padding=3).reveal()

    got = mpc.run_local(program, parties=2)[0]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=3).numpy()
    assert np.abs(got - ref).max() <= 2 * ULP + 147 * 2.2 * HALF


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_reductions_and_shape_ops(rng, parties):
    a = rng.uniform(-10, 10, size=(3, 4, 5))
    b = rng.uniform(-10, 10, size=(3, 2, 5))

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(b if ctx.rank == 1 else None, owner=1)
        return {
            "sum": x.sum().reveal(),
            "sum1": x.sum(axis=1).reveal(),
            "sumk": x.sum(axis=(0, 2), keepdims=True).reveal(),
            "mean2": x.mean(axis=2).reveal(),
            "mean": x.mean().reveal(),
            "reshape": x.reshape(12, 5).reveal(),
            "transpose": x.transpose(2, 0, 1).reveal(),
            "T": x[0].T.reveal(),
            "index": x[1:, ::2, [0, 3]].reveal(),
            "concat": mpc.concatenate([x, y], axis=1).reveal(),
            "stack": mpc.stack([x[:, :2], y], axis=0).reveal(),
            "pad": mpc.pad(x, ((0, 0), (1, 2), (2, 0))).reveal(),
            "pad_value": mpc.pad(x, ((0, 0), (0, 0), (1, 1)), value=-7.5).reveal(),
        }

    got = mpc.run_local(program, parties=parties)[0]
    tol = 60 * HALF
    np.testing.assert_allclose(got["sum"], a.sum(), atol=tol)
    np.testing.assert_allclose(got["sum1"], a.sum(axis=1), atol=tol)
    np.testing.assert_allclose(got["sumk"], a.sum(axis=(0, 2), keepdims=True), atol=tol)
    np.testing.assert_allclose(got["mean2"], a.mean(axis=2), atol=ULP + tol)
    np.testing.assert_allclose(got["mean"], a.mean(), atol=ULP + tol)
    np.testing.assert_allclose(got["reshape"], a.reshape(12, 5), atol=HALF)
    np.testing.assert_allclose(got["transpose"], a.transpose(2, 0, 1), atol=HALF)
    np.testing.assert_allclose(got["T"], a[0].T, atol=HALF)
    np.testing.assert_allclose(got["index"], a[1:, ::2, [0, 3]], atol=HALF)
    np.testing.assert_allclose(got["concat"], np.concatenate([a, b], axis=1), atol=HALF)
    np.testing.assert_allclose(got["stack"], np.stack([a[:, :2], b]), atol=HALF)
    np.testing.assert_allclose(got["pad"], np.pad(a, ((0, 0), (1, 2), (2, 0))), atol=HALF)
    np.testing.assert_allclose(got["pad_value"], np.pad(a, ((0, 0), (0, 0), (1, 1)), constant_values=-7.5), atol=HALF)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_values_near_the_encoding_limits(parties):
    limit = mpc.ring.max_abs(16)
    a = np.array([limit - 1, -(limit - 1), limit / 3, 0.0])
    # products must stay below 2^(62 - 2f) = 2^30 before truncation
    p = np.array([2**15 - 1, -(2**15 - 1), 2**15 - 1, 2**-16])

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(p if ctx.rank == 0 else None, owner=0)
        z = ctx.share(p[::-1].copy() if ctx.rank == 1 else None, owner=1)
        return x.reveal(), (x - x).reveal(), (x * 1).reveal(), (x + (-1.0)).reveal(), (y * z).reveal(), (y * y).reveal()

    same, zero, one, minus, yz, yy = mpc.run_local(program, parties=parties)[0]
    np.testing.assert_array_equal(same, a)
    np.testing.assert_array_equal(zero, np.zeros(4))
    np.testing.assert_array_equal(one, a)
    np.testing.assert_array_equal(minus, a - 1)
    np.testing.assert_allclose(yz, p * p[::-1], atol=ULP)
    np.testing.assert_allclose(yy, p * p, atol=ULP)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_large_tensor_chain_of_operations(rng, parties):
    n = 120_000
    a = rng.uniform(-30, 30, size=n)
    b = rng.uniform(-30, 30, size=n)

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(b if ctx.rank == 1 else None, owner=1)
        return ((x * y) * 0.25 + x * x - y).reveal()

    got = mpc.run_local(program, parties=parties)[0]
    ref = a * b * 0.25 + a * a - b
    # every element, not just most: 3 truncations and input encodings
    assert np.abs(got - ref).max() <= 4 * ULP + 30 * 4 * HALF


def test_secret_index_is_refused():
    def program(ctx):
        x = ctx.share(np.ones(3) if ctx.rank == 0 else None, owner=0)
        return x[x]

    with pytest.raises(TypeError, match="secret index"):
        mpc.run_local(program, parties=2)
