"""Input sharing, reveal, and the privacy of one party's shares."""

import numpy as np
import pytest

import mpc
from mpc.errors import PeerFailure, ProtocolError
from tests.conftest import PARTY_COUNTS


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_share_and_reveal_round_trip(rng, parties):
    values = {owner: rng.normal(size=(3, 4)) * 100 for owner in range(parties)}

    def program(ctx):
        out = []
        for owner in range(ctx.parties):
            x = ctx.share(values[owner] if ctx.rank == owner else None, owner=owner)
            out.append(x.reveal())
        return out

    results = mpc.run_local(program, parties=parties)
    for party_out in results:
        for owner, revealed in enumerate(party_out):
            np.testing.assert_allclose(revealed, values[owner], atol=2**-17)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_reveal_to_one_party_only(rng, parties):
    value = rng.normal(size=(5,))

    def program(ctx):
        return ctx.share(value if ctx.rank == 0 else None, owner=0).reveal(to=parties - 1)

    results = mpc.run_local(program, parties=parties)
    assert all(r is None for r in results[:-1])
    np.testing.assert_allclose(results[-1], value, atol=2**-17)


def test_scalar_and_empty_inputs():
    def program(ctx):
        s = ctx.share(2.5 if ctx.rank == 1 else None, owner=1)
        e = ctx.share(np.zeros((0, 3)) if ctx.rank == 0 else None, owner=0)
        return s.reveal(), e.reveal().shape

    (s, shape), _ = mpc.run_local(program, parties=2)
    assert s == 2.5 and shape == (0, 3)


def test_owner_must_supply_a_value():
    def program(ctx):
        return ctx.share(None, owner=0)

    with pytest.raises(ValueError, match="owns this input but passed None"):
        mpc.run_local(program, parties=2)


def test_failure_in_one_party_fails_all_without_hanging():
    def program(ctx):
        if ctx.rank == 1:
            raise RuntimeError("party 1 broke")
        return ctx.share(np.ones(3) if ctx.rank == 0 else None, owner=0).reveal()

    with pytest.raises(RuntimeError, match="party 1 broke"):
        mpc.run_local(program, parties=3, timeout_s=20)


def test_peer_sending_a_hostile_shape_is_rejected():
    # Party 0 claims an input with 2^40 elements; the others must refuse, not allocate.
    def program(ctx):
        if ctx.rank == 0:
            header = np.zeros(9, dtype=np.int64)
            header[0], header[1] = 1, 1 << 40
            ctx.comm.exchange({p: header for p in ctx.comm.peers}, {})
            return None
        return ctx.share(None, owner=0)

    with pytest.raises((ProtocolError, PeerFailure), match="larger than"):
        mpc.run_local(program, parties=2, timeout_s=20)


def test_one_partys_shares_of_a_fixed_input_look_uniform():
    """Shares held by a non-owner are AES-CTR output: uniform, and fresh per sharing."""
    fixed = np.full(4096, 1.0)

    def program(ctx):
        return [ctx.share(fixed if ctx.rank == 0 else None, owner=0).share.copy() for _ in range(4)]

    for holder in (0, 1):  # the owner's share is x minus uniform: uniform too
        shares = np.concatenate(mpc.run_local(program, parties=2)[holder])
        raw = shares.view(np.uint8)
        counts = np.bincount(raw, minlength=256)
        expected = raw.size / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 370, f"party {holder}'s share bytes are not uniform (chi2={chi2:.0f})"
        bits = np.unpackbits(raw)
        assert abs(bits.mean() - 0.5) < 0.005
        # every bit position of the 64-bit words is balanced, including the sign bit
        per_bit = ((shares.view(np.uint64)[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
        assert np.all(np.abs(per_bit - 0.5) < 0.04)
        assert len(np.unique(shares)) == shares.size
