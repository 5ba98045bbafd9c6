"""Truncation: error below one unit, for any number of parties, with no rare large errors."""

import numpy as np
import pytest

import mpc
from mpc.protocols.truncation import truncate
from mpc.tensor import SharedTensor
from tests.conftest import PARTY_COUNTS


def _truncate_ring(values: np.ndarray, bits: int, parties: int, method: str = "exact") -> np.ndarray:
    def program(ctx):
        x = ctx.share(values if ctx.rank == 0 else None, owner=0, frac_bits=0)
        t = SharedTensor(ctx, truncate(ctx, x.share, bits), 0)
        (ring,) = ctx.comm.open([t.share])
        return ring

    return mpc.run_local(program, parties=parties, truncation=method)[0]


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_exact_truncation_full_range(rng, parties):
    # 2 * 10^5 elements spread over the whole supported range |x| < 2^62.
    magnitude = rng.integers(0, 62, size=200_000)
    values = rng.integers(0, 1 << 62, size=200_000, dtype=np.int64) >> (62 - magnitude)
    values *= rng.choice([-1, 1], size=values.size)
    values[:5] = [0, 1, -1, (1 << 62) - 1, -(1 << 62) + 1]
    got = _truncate_ring(values, 16, parties)
    floor = values >> 16
    assert np.all((got == floor) | (got == floor + 1)), "an element is off by more than one unit"


@pytest.mark.parametrize("bits", [1, 16, 32, 48])
def test_exact_truncation_shift_amounts(rng, bits):
    values = rng.integers(-(1 << 61), 1 << 61, size=20_000, dtype=np.int64)
    got = _truncate_ring(values, bits, 3)
    floor = values >> bits
    assert np.all((got == floor) | (got == floor + 1))


def test_local_truncation_two_parties_small_values(rng):
    values = rng.integers(-(1 << 40), 1 << 40, size=10_000, dtype=np.int64)
    got = _truncate_ring(values, 16, 2, method="local")
    assert np.abs(got - (values >> 16)).max() <= 1


def test_local_truncation_refuses_more_than_two_parties():
    with pytest.raises(ValueError, match="2 parties"):
        mpc.run_local(lambda ctx: None, parties=3, truncation="local")


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_products_of_a_large_tensor_have_no_wrong_element(rng, parties):
    x = rng.uniform(-300, 300, size=150_000)
    y = rng.uniform(-300, 300, size=150_000)

    def program(ctx):
        a = ctx.share(x if ctx.rank == 0 else None, owner=0)
        b = ctx.share(y if ctx.rank == 1 else None, owner=1)
        return (a * b).reveal()

    got = mpc.run_local(program, parties=parties)[0]
    xe, ye = mpc.decode(mpc.encode(x)), mpc.decode(mpc.encode(y))
    # exact product of the encoded inputs, then at most one unit from truncation
    assert np.abs(got - xe * ye).max() <= 2**-16 + 1e-12
