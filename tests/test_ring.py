import numpy as np
import pytest

from mpc.errors import EncodingRangeError
from mpc.ring import decode, encode, max_abs


@pytest.mark.parametrize("frac_bits", [0, 8, 16, 24])
def test_round_trip_within_half_unit(rng, frac_bits):
    values = rng.uniform(-1000, 1000, size=1000)
    back = decode(encode(values, frac_bits), frac_bits)
    assert np.abs(back - values).max() <= 2.0 ** -(frac_bits + 1)


def test_integers_encode_exactly():
    values = np.array([-5, 0, 7, 2**40], dtype=np.int64)
    assert np.array_equal(decode(encode(values, 16), 16), values.astype(np.float64))


def test_limits_encode_and_beyond_raise():
    limit = max_abs(16)
    near = np.array([limit - 1, -(limit - 1)])
    assert np.array_equal(decode(encode(near, 16), 16), near)
    for bad in (limit, -limit, 1e30, np.inf, -np.inf, np.nan):
        with pytest.raises(EncodingRangeError, match="fixed-point range"):
            encode(np.array([0.0, bad]), 16)
    with pytest.raises(EncodingRangeError):
        encode(np.array([2**46], dtype=np.int64), 16)


def test_error_names_value_and_fix():
    with pytest.raises(EncodingRangeError) as info:
        encode(1e20)
    assert "1e+20" in str(info.value) and "scale the input down" in str(info.value)


def test_ring_arithmetic_wraps():
    big = np.array([np.iinfo(np.int64).max], dtype=np.int64)
    assert (big + np.int64(1))[0] == np.iinfo(np.int64).min
