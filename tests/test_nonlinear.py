"""Non-linear functions on shared tensors against plaintext numpy/torch.

Comparisons, ReLU, clamp, max/argmax and max pooling are exact on the
fixed-point values (compared with numpy on the decoded encodings), including at
0, one unit either side of 0 and the representable limits, for 2, 3 and 5
parties.  Average pooling is compared with explicit tolerances; the
approximations are in tests/test_approximations.py.
"""

import numpy as np
import pytest
import torch

import mpc
from mpc.errors import ConfigError
from mpc.ring import max_abs
from tests.conftest import PARTY_COUNTS, ulp

F = 16
UNIT = ulp(F)
RING_TOP = (1 << 62) - 1  # the largest representable ring value
TOP = max_abs(F) - 2.0**-6  # the largest float64 below the representable limit at f = 16
EDGES = np.array([0.0, UNIT, -UNIT, 2 * UNIT, -2 * UNIT, TOP, -TOP, 1.0, -1.0])
RING_EDGES = np.array([0, 1, -1, 2, -2, RING_TOP, -RING_TOP, RING_TOP - 1, -RING_TOP + 1, 1 << 16, -(1 << 16)])


def fixed(values: np.ndarray) -> np.ndarray:
    """The values the engine actually holds: decode(encode(v))."""
    return mpc.decode(mpc.encode(values, F), F)


def run(program, *arrays, parties=2, **options):
    """Run ``program(ctx, *shared)`` with arrays owned by party 0; return party 0's result."""

    def wrapped(ctx):
        shared = [ctx.share(a if ctx.rank == 0 else None, owner=0) for a in arrays]
        before = ctx.stats()
        out = program(ctx, *shared)
        after = ctx.stats()
        stats = {k: after[k] - before[k] for k in after}
        if isinstance(out, tuple):
            return tuple(o.reveal() for o in out), stats
        return out.reveal(), stats

    return mpc.run_local(wrapped, parties=parties, **options)[0]


def _mixed(rng, n):
    """Values spread over every magnitude up to the representable limit, plus the edges."""
    mags = rng.uniform(-17, 46, n)
    v = rng.choice([-1.0, 1.0], n) * 2.0**mags
    v = np.clip(v, -TOP, TOP)
    v[: EDGES.size] = EDGES
    return fixed(v)


def run_ring(program, *arrays, parties=2, **options):
    """Like :func:`run` but the inputs are ring integers read at scale f and the outputs are
    opened as ring integers: exact down to the last unit, up to the representable limit."""

    def wrapped(ctx):
        shared = [ctx.share(a if ctx.rank == 0 else None, owner=0, frac_bits=0) for a in arrays]
        shared = [s._like(s.share, F) for s in shared]
        outs = program(ctx, *shared)
        return tuple(ctx.comm.open([o.share])[0] for o in outs)

    return mpc.run_local(wrapped, parties=parties, **options)[0]


def _ring_mixed(rng, n):
    mags = rng.integers(0, 62, n)
    v = (rng.integers(0, 1 << 62, n, dtype=np.int64) >> (62 - mags)) * rng.choice([-1, 1], n)
    v[: RING_EDGES.size] = RING_EDGES
    return v


# -- comparisons -------------------------------------------------------------------------
@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_ring_exact_comparisons_up_to_the_representable_limit(rng, parties):
    n = 4000
    a = _ring_mixed(rng, n)
    b = np.where(rng.random(n) < 0.3, a, _ring_mixed(rng, n))
    b[: RING_EDGES.size] = np.roll(RING_EDGES, 4)
    b[RING_EDGES.size : RING_EDGES.size + 6] = a[RING_EDGES.size : RING_EDGES.size + 6] - np.sign(a[RING_EDGES.size : RING_EDGES.size + 6])

    def program(ctx, x, y):
        return (x < y, x >= y, x == y, x.relu(), abs(x), x.sign(), mpc.maximum(x, y), x.clamp(-(2.0**40), 2.0**40))

    got = run_ring(program, a, b, parties=parties)
    lim = 1 << (40 + F)
    want = (a < b, a >= b, a == b, np.maximum(a, 0), np.abs(a), np.sign(a), np.maximum(a, b), np.clip(a, -lim, lim))
    for g, w in zip(got, want):
        assert np.array_equal(g, w.astype(np.int64))


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_comparisons_between_shared_tensors_are_exact(rng, parties):
    n = 3000
    a = _mixed(rng, n)
    b = np.where(rng.random(n) < 0.3, a, _mixed(rng, n))  # many ties
    b[: EDGES.size] = np.roll(EDGES, 3)
    near = a[EDGES.size : EDGES.size + 4]
    b[EDGES.size : EDGES.size + 4] = near - np.sign(near) * UNIT  # one unit apart

    def program(ctx, x, y):
        return (x < y, x <= y, x > y, x >= y, x == y, x != y)

    got, _ = run(program, a, b, parties=parties)
    want = (a < b, a <= b, a > b, a >= b, a == b, a != b)
    for g, w in zip(got, want):
        assert np.array_equal(g, w.astype(np.float64))


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_comparisons_with_public_values(rng, parties):
    a = _mixed(rng, 2000)
    threshold = 0.5
    grid = fixed(rng.normal(0, 1, a.shape))

    def program(ctx, x):
        return (x < threshold, x >= 0, x > grid, x == 0, 1.0 <= x)

    got, _ = run(program, a, parties=parties)
    want = (a < threshold, a >= 0, a > grid, a == 0, a >= 1.0)
    for g, w in zip(got, want):
        assert np.array_equal(g, w.astype(np.float64))


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_relu_sign_abs_clamp_are_exact(rng, parties):
    a = _mixed(rng, 4000)
    lo, hi = fixed(np.array(-2.5)), fixed(np.array(3.25))

    def program(ctx, x):
        return (x.relu(), x.sign(), abs(x), x.clamp(-2.5, 3.25), x.relu6(), x.clamp(hi=3.25), x.clamp(lo=-2.5))

    got, _ = run(program, a, parties=parties)
    want = (
        np.maximum(a, 0), np.sign(a), np.abs(a), np.clip(a, lo, hi), np.clip(a, 0, 6),
        np.minimum(a, hi), np.maximum(a, lo),
    )
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_maximum_minimum_of_shared_tensors(rng):
    a, b = fixed(rng.normal(0, 10, (30, 7))), fixed(rng.normal(0, 10, (30, 7)))
    b[0] = a[0]
    (mx, mn), _ = run(lambda ctx, x, y: (mpc.maximum(x, y), mpc.minimum(x, y)), a, b, parties=3)
    assert np.array_equal(mx, np.maximum(a, b))
    assert np.array_equal(mn, np.minimum(a, b))


@pytest.mark.parametrize("comparison,bits", [("fss", 64), ("generic", 64), ("fss", 32), ("generic", 32)])
def test_relu_on_a_large_tensor_has_no_wrong_element(rng, comparison, bits):
    n = 120_000
    limit = min(2.0 ** (bits - 1 - F) - UNIT, TOP)
    a = fixed(np.clip(rng.normal(0, 50, n) * rng.choice([1e-4, 1.0, 100.0], n), -limit, limit))
    a[:7] = [0, UNIT, -UNIT, limit, -limit, limit - UNIT, -limit + UNIT]
    got, stats = run(lambda ctx, x: x.relu(), a, parties=2, comparison=comparison, comparison_bits=bits)
    assert np.array_equal(got, np.maximum(a, 0))
    assert stats["rounds"] == (2 if comparison == "fss" else 6 if bits == 64 else 5)
    assert stats["bytes_sent"] <= 32 * n


def test_relu_rounds_and_bytes_meet_the_targets(rng):
    n = 10_000
    a = fixed(rng.normal(0, 1, n))
    got, stats = run(lambda ctx, x: x.relu(), a, parties=2)
    assert np.array_equal(got, np.maximum(a, 0))
    assert stats["rounds"] == 2
    assert stats["bytes_sent"] == 8 * n + n // 8  # 8.125 B per element <= 32
    assert stats["dealer_bytes"] == 920 * n


def test_comparison_options_select_the_protocol(rng):
    a = fixed(rng.normal(0, 1, 500))
    fss, s_fss = run(lambda ctx, x: x > 0, a, parties=2, comparison="fss")
    gen, s_gen = run(lambda ctx, x: x > 0, a, parties=2, comparison="generic")
    assert np.array_equal(fss, gen)
    assert (s_fss["rounds"], s_gen["rounds"]) == (2, 6)
    with pytest.raises(ConfigError):
        run(lambda ctx, x: x, a, parties=5, comparison="fss")


# -- max / argmax --------------------------------------------------------------------------
@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_max_and_argmax_along_axes(rng, parties):
    a = fixed(rng.normal(0, 5, (6, 10, 3)))
    a[0, :, 0] = 1.0  # all ties: first index
    a[1, 3, 1] = a[1, 7, 1] = 50.0  # a tie for the maximum

    def program(ctx, x):
        return (x.max(axis=1), x.argmax(axis=1), x.max(), x.argmax(), x.min(axis=(0, 2)), x.argmin(axis=-1),
                x.max(axis=2, keepdims=True), x.argmax(axis=1, one_hot=True))

    got, _ = run(program, a, parties=parties)
    one_hot = np.zeros_like(a)
    idx = a.argmax(axis=1)
    np.put_along_axis(one_hot, idx[:, None, :], 1.0, axis=1)
    want = (a.max(axis=1), idx, a.max(), a.argmax(), a.min(axis=(0, 2)), a.argmin(axis=-1),
            a.max(axis=2, keepdims=True), one_hot)
    for g, w in zip(got, want):
        assert g.shape == np.shape(w)
        assert np.array_equal(g, w)


def test_argmax_over_ten_classes_costs_four_levels(rng):
    logits = fixed(rng.normal(0, 3, (64, 10)))
    got, stats = run(lambda ctx, x: x.argmax(axis=1), logits, parties=2)
    assert np.array_equal(got, logits.argmax(axis=1))
    assert stats["rounds"] == 2 * 4  # 10 -> 5 -> 3 -> 2 -> 1


@pytest.mark.parametrize("shape", [(7,), (3, 1), (1, 9), (2, 3, 5, 4)])
def test_max_of_random_shapes(rng, shape):
    a = fixed(rng.normal(0, 1, shape))
    for axis in [None] + list(range(len(shape))):
        got, _ = run(lambda ctx, x: x.max(axis=axis), a, parties=3)
        assert np.array_equal(got, a.max(axis=axis))


# -- pooling ---------------------------------------------------------------------------------
POOLS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=0, ceil_mode=True),
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=(1, 3), stride=(2, 1)),
]


@pytest.mark.parametrize("options", POOLS)
def test_max_pool2d_matches_torch(rng, options):
    a = fixed(rng.normal(0, 3, (2, 3, 9, 8)))
    a[0, 0, :3, :3] = -TOP  # padding must not win against a very negative value
    got, _ = run(lambda ctx, x: mpc.max_pool2d(x, **options), a, parties=2)
    want = torch.nn.functional.max_pool2d(torch.tensor(a), **options).numpy()
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_max_pool_3x3_stride_2_cost_and_unbatched_input(rng):
    a = fixed(rng.normal(0, 3, (4, 16, 16)))
    got, stats = run(lambda ctx, x: mpc.max_pool2d(x, 3, 2, 1), a, parties=3)
    want = torch.nn.functional.max_pool2d(torch.tensor(a), 3, 2, 1).numpy()
    assert np.array_equal(got, want)
    assert stats["rounds"] == 4 * 6  # 2 + 2 tree levels, 6 rounds per generic comparison


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, ceil_mode=True),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        dict(kernel_size=(2, 3), stride=1, divisor_override=5),
    ],
)
def test_avg_pool2d_matches_torch(rng, options):
    a = fixed(rng.normal(0, 3, (2, 3, 9, 8)))
    got, _ = run(lambda ctx, x: mpc.avg_pool2d(x, **options), a, parties=3)
    want = torch.nn.functional.avg_pool2d(torch.tensor(a), **options).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=3 * UNIT, rtol=2.0**-15)


@pytest.mark.parametrize("output_size", [1, (3, 2), (4, None), 5])
def test_adaptive_pooling_matches_torch(rng, output_size):
    a = fixed(rng.normal(0, 3, (2, 3, 7, 9)))
    (avg, mx), _ = run(
        lambda ctx, x: (mpc.adaptive_avg_pool2d(x, output_size), mpc.adaptive_max_pool2d(x, output_size)), a, parties=2
    )
    t = torch.tensor(a)
    np.testing.assert_allclose(avg, torch.nn.functional.adaptive_avg_pool2d(t, output_size).numpy(), atol=3 * UNIT, rtol=2.0**-15)
    assert np.array_equal(mx, torch.nn.functional.adaptive_max_pool2d(t, output_size).numpy())


def test_pooling_rejects_bad_options(rng):
    a = fixed(rng.normal(0, 1, (1, 1, 4, 4)))
    with pytest.raises(ValueError, match="padding"):
        run(lambda ctx, x: mpc.max_pool2d(x, 2, padding=2), a)
    with pytest.raises(ValueError, match="NCHW"):
        run(lambda ctx, x: mpc.max_pool2d(x.reshape(16), 2), a)


def test_batches_larger_than_one_dealer_request_are_split(rng, monkeypatch):
    import mpc.nonlinear as nl

    monkeypatch.setattr(nl, "fss_max_batch", lambda *args: 1000)
    monkeypatch.setattr(nl, "MAX_COMPARE_ELEMENTS", 1000)
    a = fixed(rng.normal(0, 1, (5, 7, 100)))
    for comparison, rounds in (("fss", 2 * 4), ("generic", 6 * 4)):
        got, stats = run(lambda ctx, x: x.relu(), a, parties=2, comparison=comparison)
        assert np.array_equal(got, np.maximum(a, 0))
        assert stats["rounds"] == rounds  # 3500 elements in requests of 1000


@pytest.mark.parametrize("parties", [2, 3])
def test_pooling_and_max_are_exact_at_the_representable_limit(rng, parties):
    a = _ring_mixed(rng, 2 * 3 * 8 * 8)
    a[:4] = [-RING_TOP, -RING_TOP + 1, RING_TOP, RING_TOP - 1]
    x4 = a.reshape(2, 3, 8, 8)
    got_pool, got_max, got_arg = run_ring(
        lambda ctx, x: (mpc.max_pool2d(x.reshape(2, 3, 8, 8), 3, 2, 1), x.reshape(6, 64).max(axis=1),
                        x.reshape(6, 64).argmax(axis=1)),
        a, parties=parties,
    )
    want = torch.nn.functional.max_pool2d(torch.tensor(x4), 3, 2, 1).numpy()
    assert np.array_equal(got_pool, want)
    assert np.array_equal(got_max, a.reshape(6, 64).max(axis=1))
    assert np.array_equal(got_arg, a.reshape(6, 64).argmax(axis=1))


def test_random_shapes_against_numpy(rng):
    for _ in range(4):
        shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(1, 4))))
        a = fixed(rng.normal(0, 4, shape))
        axis = int(rng.integers(0, len(shape)))
        (relu, lt, mx, am), _ = run(
            lambda ctx, x: (x.relu(), x < 0.25, x.max(axis=axis), x.argmax(axis=axis)), a, parties=3
        )
        assert np.array_equal(relu, np.maximum(a, 0))
        assert np.array_equal(lt, (a < 0.25).astype(np.float64))
        assert np.array_equal(mx, a.max(axis=axis))
        assert np.array_equal(am, a.argmax(axis=axis))


@pytest.mark.slow
@pytest.mark.parametrize("comparison", ["fss", "generic"])
def test_relu_on_a_million_elements(rng, comparison):
    a = fixed(rng.normal(0, 100, 1_000_000))
    got, _ = run(lambda ctx, x: x.relu(), a, parties=2, comparison=comparison)
    assert np.array_equal(got, np.maximum(a, 0))
