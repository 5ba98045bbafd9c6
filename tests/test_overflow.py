"""Comparisons that leave their domain are detected, never answered wrongly.

- the overflow terms' algebra (mpc.protocols.drelu) on plaintext "one party holds every
  share" values: 0 exactly in the domain, for exact and slack comparisons, including the
  rare wrap ("weak") case forced by choosing the mask;
- the deferred zero check (mpc.protocols.zerocheck): terms built to cancel under equal
  coefficients are caught, zero terms pass, exact rounds and bytes;
- every comparison-based operation with values just inside and just outside the domain,
  for FSS (2 parties) and the generic protocol (2 and 3 parties): exact inside, a named
  ComparisonOverflow outside, and nothing revealed before the check.
"""

import numpy as np
import pytest

import mpc
from mpc.errors import ComparisonOverflow
from mpc.protocols.drelu import InjectionMasks, overflow_terms
from mpc.protocols.zerocheck import WEAK_LANES, CheckLabel, check_costs, strong_lanes

F = 16
M64 = (1 << 64) - 1
PROTOCOLS = [("fss", 2), ("generic", 2), ("generic", 3)]


# -- the algebra of the terms ---------------------------------------------------------------
def _terms(xs, rs, epss, bits, slack):
    """The protocol's b and overflow term for each (x, r, eps), all shares held by party 0."""
    dom = bits - 1
    y = (xs.view(np.uint64) + np.uint64(1 << dom))
    y_hat = y + rs
    low_mask = np.uint64((1 << dom) - 1)
    u = ((y_hat & low_mask) >> np.uint64(slack)) < ((rs & low_mask) >> np.uint64(slack))
    p = ((y_hat >> np.uint64(dom)) & np.uint64(1)).astype(np.uint8)
    m = ((rs >> np.uint64(dom)) & np.uint64(1)).astype(np.uint8)
    b = p ^ m ^ u.astype(np.uint8)
    d = p ^ u.astype(np.uint8) ^ epss
    masks = InjectionMasks(rs.view(np.int64), None, None, None, None, None,
                           (rs >> np.uint64(dom)).view(np.int64), epss.astype(np.int64))
    terms = overflow_terms(0, y_hat, d, p, masks, b.astype(np.int64), bits)
    return b, terms


@pytest.mark.parametrize("bits,slack", [(16, 0), (22, 0), (32, 0), (32, 6), (48, 0), (63, 0), (40, 12)])
def test_terms_vanish_exactly_inside_the_domain(rng, bits, slack):
    lim = 1 << (bits - 1)
    edges = [0, 1, -1, lim - 1, -lim, lim, -lim - 1, lim + 1, 3 * lim, -3 * lim, 1 << 62, -(1 << 62),
             (1 << 63) - 1, -(1 << 63), (1 << 63) - lim, -(1 << 63) + lim]
    xs = np.concatenate([
        np.array([(e + (1 << 63)) % (1 << 64) - (1 << 63) for e in edges], dtype=np.int64),
        rng.integers(-2 * lim, 2 * lim, 4000) if bits < 62 else rng.integers(-(1 << 62), 1 << 62, 4000),
        rng.integers(-(1 << 63), (1 << 63) - 1, 4000, dtype=np.int64),
    ])
    xs = np.repeat(xs, 4)
    rs = rng.integers(0, 1 << 63, xs.size, dtype=np.int64).view(np.uint64) * np.uint64(2)
    rs += rng.integers(0, 2, xs.size).astype(np.uint64)
    # force the wrap of y + r past 2^64 for a quarter of the elements: y^ = y + r - 2^64 < 2^l
    forced = np.arange(xs.size) % 4 == 0
    y = xs.view(np.uint64) + np.uint64(lim)
    rs[forced] = (np.uint64(0) - y[forced]) + rng.integers(0, 1 << bits, forced.sum(), dtype=np.uint64)
    epss = rng.integers(0, 2, xs.size).astype(np.uint8)
    b, terms = _terms(xs, rs, epss, bits, slack)
    inside = (xs >= -lim) & (xs < lim)
    passed = terms.z == 0
    assert terms.weak[forced & inside].all()  # wrapped in-domain elements are the weak ones
    strong = ~terms.weak & (terms.z != 0)
    assert (np.abs(terms.z[strong].astype(np.float64)) < 2.0 ** (64 - bits + 2)).all()  # valuation <= 64 - l
    if slack == 0:
        assert np.array_equal(passed, inside)
        assert np.array_equal(b[inside], (xs[inside] >= 0).astype(np.uint8))
    else:
        blur = np.abs(xs.astype(np.float64)) < 2.0**slack
        harmless_low = (xs < -lim) & (xs >= -lim - (1 << slack))
        assert not (passed & ~inside & ~harmless_low).any()  # nothing outside passes, but the bit-0 edge
        assert np.array_equal(b[passed & ~blur], (xs[passed & ~blur] >= 0).astype(np.uint8))
        refused_inside = inside & ~passed
        assert (xs[refused_inside] >= lim - (1 << slack)).all()  # only just below the top edge


# -- the deferred zero check ------------------------------------------------------------------
def _zero_check(parties, groups):
    """Each group: (z values, weak mask or None, max valuation); returns (error or None, stats delta)."""

    def program(ctx):
        shared = []
        for z, weak, v in groups:  # a random sharing of z (any ring value, past what encode takes)
            share = ctx.zero_shares(z.shape) + (z if ctx.rank == 0 else 0)
            shared.append((share, weak, v))
        for i, (share, weak, v) in enumerate(shared):
            ctx.checks.add(CheckLabel("comparison", f"g{i}", (64 - v,)), share, max_valuation=v,
                           coins=b"0123456789abcdef", weak=weak)
        lanes = ctx.checks.lanes()
        before = ctx.stats()
        try:
            ctx.check_comparisons()
            err = None
        except ComparisonOverflow as exc:
            err = exc
        after = ctx.stats()
        return err, lanes, {k: after[k] - before[k] for k in after}

    return mpc.run_local(program, parties=parties)


@pytest.mark.parametrize("parties", [2, 3])
def test_zero_check_catches_terms_that_cancel_under_equal_coefficients(parties):
    k = 32  # valuation bound of a 32-bit domain
    cancelling = np.array([1 << k, -(1 << k), 0, 0], dtype=np.int64)
    top = np.array([1 << 63, 1 << 63, 0], dtype=np.uint64).view(np.int64)  # valuation 63: weak only
    fine = np.zeros(5, np.int64)
    outs = _zero_check(parties, [(fine, None, k), (cancelling, None, k), (top, np.ones(3, bool), k)])
    err, lanes, stats = outs[0]
    assert isinstance(err, ComparisonOverflow)
    assert err.scopes == ("g1", "g2") and err.comparisons == 4 + 3
    assert lanes == 2 * strong_lanes(k) + WEAK_LANES
    cost = check_costs(lanes, parties)
    assert stats["rounds"] == cost["rounds"] == 2
    assert stats["bytes_sent"] == cost["bytes_sent"] == 16 * lanes * (parties - 1)
    assert stats["dealer_bytes"] == cost["dealer_bytes_party0"] == 8 * lanes
    assert all(o[1] == lanes and o[2]["dealer_bytes"] == 0 for o in outs[1:])


def test_zero_check_passes_zero_terms_and_costs_nothing_when_empty():
    outs = _zero_check(2, [(np.zeros(100, np.int64), np.arange(100) % 7 == 0, 40)])
    err, lanes, stats = outs[0]
    assert err is None and lanes == strong_lanes(40) + WEAK_LANES and stats["rounds"] == 2
    err, lanes, stats = _zero_check(2, [])[0]
    assert err is None and lanes == 0 and stats["rounds"] == 0 and stats["bytes_sent"] == 0


def test_lane_counts_follow_the_valuation_bound():
    assert [strong_lanes(64 - bits) for bits in (16, 22, 32, 40, 41, 63)] == [3, 2, 2, 2, 1, 1]
    assert strong_lanes(0) == 1
    with pytest.raises(ValueError):
        strong_lanes(63)


# -- every comparison-based operation at the domain's edges -------------------------------------
def _ops(bits):
    """name -> (build inputs (ring integers at scale F), program, plaintext reference), inside and outside."""
    lim = 1 << (bits - 1)
    q = lim // 2
    unit = 2.0**-F

    def pair(d):  # two operands with difference d
        return np.array([q, -q, 5, -7]), np.array([q - d, -q - d, 5, -7])

    def lead(d):  # a, b with a - b = d and max(a, b) = q, so later comparisons stay small
        a = q if d >= 0 else q + d
        return a, a - d

    def window(d):  # a 2x2 max-pool window whose first comparison sees d
        x = np.full((1, 1, 2, 2), q - 5, dtype=np.int64)
        x[0, 0, 0, 0], x[0, 0, 0, 1] = lead(d)
        return x

    def rows(d):  # argmax rows whose first pair differs by d
        return np.array([[*lead(d), q - 3, q - 2], [0, 3, -2, 3]])

    def clamped(d):  # x - lo = d, or x - hi = d, with the other difference in the domain
        return np.array([-q + d if d >= 0 else q + d, 0, -q, q - 1])

    return {
        "relu": (lambda d: (np.array([d, 1, -1, 0]),), lambda x: x.relu(), lambda a: np.maximum(a, 0)),
        "maximum": (pair, lambda x, y: mpc.maximum(x, y), lambda a, b: np.maximum(a, b)),
        "minimum": (pair, lambda x, y: mpc.minimum(x, y), lambda a, b: np.minimum(a, b)),
        "max": (lambda d: (rows(d),), lambda x: x.max(axis=1), lambda a: a.max(axis=1)),
        "argmax": (lambda d: (rows(d),), lambda x: x.argmax(axis=1), lambda a: a.argmax(axis=1) * 2**F),
        "max_pool2d": (lambda d: (window(d),), lambda x: mpc.max_pool2d(x, 2), lambda a: a.max(axis=(2, 3), keepdims=True)),
        # clamp compares x - lo and x - hi; lo, hi = -q, q units (public reals)
        "clamp": (lambda d: (clamped(d),), lambda x: x.clamp(-q * unit, q * unit),
                  lambda a: np.clip(a, -q, q)),
    }


def _run_edge(name, bits, comparison, parties, d):
    build, op, ref = _ops(bits)[name]
    arrays = [np.asarray(a, dtype=np.int64) for a in build(d)]

    def program(ctx):
        shared = [ctx.share(a if ctx.rank == 0 else None, owner=0, frac_bits=0) for a in arrays]
        shared = [s._like(s.share, F) for s in shared]  # the ring integers read at scale F
        return op(*shared).reveal()

    got = mpc.run_local(program, parties=parties, comparison=comparison, comparison_bits=bits)[0]
    return got * 2**F, ref(*arrays)


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
@pytest.mark.parametrize("name", ["relu", "maximum", "minimum", "max", "argmax", "max_pool2d", "clamp"])
def test_every_comparison_op_is_exact_just_inside_and_refused_just_outside(name, comparison, parties):
    bits = 32
    lim = 1 << (bits - 1)
    for d in (lim - 1, -lim):  # the largest and smallest differences in the domain
        got, want = _run_edge(name, bits, comparison, parties, d)
        assert np.array_equal(got, want), (name, d)
    for d in (lim, -lim - 1):  # one unit outside
        with pytest.raises(ComparisonOverflow) as info:
            _run_edge(name, bits, comparison, parties, d)
        assert info.value.domain_bits == bits and info.value.comparisons >= 1


@pytest.mark.parametrize("comparison,parties", PROTOCOLS)
def test_the_reported_failures_are_refused(comparison, parties):
    # 32-bit comparisons at f = 16 hold values below 2^15 = 32768, but differences must too:
    # maximum(20000, -20000) returned -20000 and argmax picked the wrong class.
    def maximum(ctx):
        x = ctx.share(np.array([20000.0]) if ctx.rank == 0 else None, owner=0)
        y = ctx.share(np.array([-20000.0]) if ctx.rank == 0 else None, owner=0)
        return mpc.maximum(x, y).reveal()

    def argmax(ctx):
        x = ctx.share(np.array([[-20000.0, 15000.0, 3.0]]) if ctx.rank == 0 else None, owner=0)
        return x.argmax(axis=1).reveal()

    for program in (maximum, argmax):
        with pytest.raises(ComparisonOverflow, match="32-bit comparison domain"):
            mpc.run_local(program, parties=parties, comparison=comparison, comparison_bits=32)
        # a domain wide enough for the differences answers exactly
        assert mpc.run_local(program, parties=parties, comparison=comparison, comparison_bits=34)[0].tolist() in (
            [20000.0], [1.0])


def test_nothing_is_revealed_when_the_check_fails_and_scopes_name_the_place():
    def program(ctx):
        x = ctx.share(np.array([1.0, 40000.0]) if ctx.rank == 0 else None, owner=0)
        with ctx.comparison_scope("block1"):
            with ctx.comparison_scope("relu"):
                y = x.relu()
        with ctx.comparison_scope("block2"):
            z = (x * 0.5).relu()  # 20000 < 2^15: in the domain
        assert ctx.pending_checks == 4 and ctx.scope is None
        before = ctx.stats()
        try:
            (y + z).reveal(to=0)
        except ComparisonOverflow as exc:
            after = ctx.stats()
            return exc, after["rounds"] - before["rounds"], ctx.pending_checks
        return None, None, None

    for exc, rounds, pending in mpc.run_local(program, parties=2, comparison_bits=32):
        assert exc.scopes == ("block1/relu",) and exc.comparisons == 2
        assert rounds == 2 and pending == 0  # the check's two rounds; the opening never happened


def test_a_64_bit_domain_leaves_nothing_to_check(rng):
    def program(ctx):
        x = ctx.share(rng.normal(0, 1e6, 50) if ctx.rank == 0 else None, owner=0)
        x.relu(), x.max(), x.argmax()
        return ctx.pending_checks

    assert mpc.run_local(program, parties=2) == [0, 0]


@pytest.mark.parametrize("comparison,parties", [("fss", 2), ("generic", 3)])
def test_the_check_over_real_processes(comparison, parties):
    from tests.net_programs import domain_check_program

    options = dict(parties=parties, comparison=comparison, comparison_bits=32)
    inside = mpc.run_processes(domain_check_program, args=([16000.0, -3.5],), **options)
    assert all(np.array_equal(out["value"], [16000.0, 3.5]) for out in inside)
    outside = mpc.run_processes(domain_check_program, args=([20000.0, -3.5],), **options)  # compares 40000
    assert outside == [{"domain_bits": 32, "scopes": ["head"], "comparisons": 2}] * parties


@pytest.mark.parametrize("comparison", ["fss", "generic"])
def test_one_out_of_domain_value_among_many_is_caught_whatever_its_size(rng, comparison):
    bits = 32
    lim = 1 << (bits - 1)
    n = 300_000
    base = rng.integers(-lim, lim, n)
    needles = [lim, -lim - 1, 1 << 62, (1 << 63) - lim]  # one unit out, huge, and y >> l = 2^(K-1)
    where = rng.integers(0, n, len(needles))

    def program(ctx, needle):
        values = base.copy()
        if needle is not None:
            values[where[0]] = needle
        share = ctx.zero_shares((n,)) + (values if ctx.rank == 0 else 0)  # any ring value, as a sharing
        mpc.nonlinear.drelu(ctx, share)
        try:
            ctx.check_comparisons()
        except ComparisonOverflow as exc:
            return exc.comparisons
        return 0

    assert mpc.run_local(program, parties=2, args=(None,), comparison=comparison, comparison_bits=bits) == [0, 0]
    for needle in needles:
        got = mpc.run_local(program, parties=2, args=(needle,), comparison=comparison, comparison_bits=bits)
        assert got == [n, n], needle
