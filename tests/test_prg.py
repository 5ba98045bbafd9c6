import numpy as np
import pytest

from mpc import prg


def test_same_key_and_stream_agree_and_streams_differ():
    key = prg.new_seed()
    a = prg.Stream(key, 7).ring((100,))
    b = prg.Stream(key, 7).ring((100,))
    c = prg.Stream(key, 8).ring((100,))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, prg.Stream(prg.new_seed(), 7).ring((100,)))


def test_draws_continue_the_stream():
    key = prg.new_seed()
    whole = prg.Stream(key, 1).ring(64)
    s = prg.Stream(key, 1)
    parts = np.concatenate([s.ring(16), s.ring(48)])
    assert np.array_equal(whole, parts)


def test_parallel_generation_equals_serial():
    # Large draws are split over two threads; the keystream must not depend on the split.
    key = prg.new_seed()
    big = prg.random_bytes(key, 5 << 64, 3 << 21)
    small = np.concatenate(
        [prg.random_bytes(key, (5 << 64) + off // 16, 1 << 20) for off in range(0, 3 << 21, 1 << 20)]
    )
    assert np.array_equal(big, small)


def test_matches_aes_ctr_definition():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16))
    expected = Cipher(algorithms.AES(key), modes.CTR((3 << 64).to_bytes(16, "big"))).encryptor().update(bytes(80))
    assert prg.Stream(key, 3).ring(10).tobytes() == expected


def test_bytes_look_uniform():
    data = prg.random_bytes(prg.new_seed(), 0, 1 << 20)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: the 99.9999 % quantile is about 370.
    assert chi2 < 370


def test_bits_are_zero_one_and_balanced():
    bits = prg.Stream(prg.new_seed(), 0).bits((1000, 100))
    assert bits.shape == (1000, 100) and set(np.unique(bits)) <= {0, 1}
    assert abs(bits.mean() - 0.5) < 0.01


def test_bad_key_rejected():
    with pytest.raises(ValueError, match="16 bytes"):
        prg.Stream(b"short", 0)
