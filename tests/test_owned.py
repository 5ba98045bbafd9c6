"""Products with a tensor one party knows in the clear (model weights): results and costs."""

import numpy as np
import pytest
import torch

import mpc
from tests.conftest import PARTY_COUNTS

ULP = 2.0**-16


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_conv_linear_mul_matmul_with_private_weights(rng, parties):
    owner = parties - 1
    x = rng.uniform(-2, 2, size=(2, 4, 8, 8))
    w = rng.uniform(-0.5, 0.5, size=(6, 4, 3, 3))
    bias = rng.uniform(-1, 1, size=6)
    lw = rng.uniform(-1, 1, size=(3, 10))
    v = rng.uniform(-2, 2, size=(10,))
    m = rng.uniform(-1, 1, size=(10, 5))

    def program(ctx):
        mine = ctx.rank == owner
        xs = ctx.share(x if ctx.rank == 0 else None, owner=0)
        wp = ctx.private(w if mine else None, owner=owner)
        bp = ctx.private(bias if mine else None, owner=owner)
        lp = ctx.private(lw if mine else None, owner=owner)
        vp = ctx.private(v if mine else None, owner=owner)
        mp = ctx.private(m if mine else None, owner=owner)
        conv = mpc.conv2d(xs, wp, bp, stride=1, padding=1)
        flat = xs[:, 0, 0, :].reshape(2, 8)
        vec = mpc.concatenate([flat, flat[:, :2]], axis=1)  # (2, 10)
        return (
            conv.reveal(),
            mpc.linear(vec, lp).reveal(),
            (vec * vp).reveal(),
            (vec @ mp).reveal(),
            conv.reveal(to=0),  # second use of the same weights: no new opening
        )

    outs = mpc.run_local(program, parties=parties)
    conv, lin, mul, mm, _ = outs[0]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), padding=1).numpy()
    vec = np.concatenate([x[:, 0, 0, :], x[:, 0, 0, :2]], axis=1)
    np.testing.assert_allclose(conv, ref, atol=2 * ULP + 36 * 2.5 * 2**-17)
    np.testing.assert_allclose(lin, vec @ lw.T, atol=2 * ULP + 10 * 3 * 2**-17)
    np.testing.assert_allclose(mul, vec * v, atol=2 * ULP + 4 * 2**-17)
    np.testing.assert_allclose(mm, vec @ m, atol=2 * ULP + 10 * 3 * 2**-17)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_owned_product_costs_one_message_to_the_owner(rng, parties):
    owner = 1
    x = rng.uniform(-1, 1, size=(1, 3, 8, 8))
    w = rng.uniform(-1, 1, size=(4, 3, 3, 3))

    def program(ctx):
        xs = ctx.share(x if ctx.rank == 0 else None, owner=0)
        wp = ctx.private(w if ctx.rank == owner else None, owner=owner)
        s0 = ctx.stats()
        wp.prepare()
        s1 = ctx.stats()
        mpc.conv2d(xs, wp, padding=1)
        s2 = ctx.stats()
        return {k: s1[k] - s0[k] for k in s0}, {k: s2[k] - s1[k] for k in s1}

    outs = mpc.run_local(program, parties=parties)
    out_elems = 4 * 8 * 8
    for rank, (prepare, conv) in enumerate(outs):
        if rank == owner:
            assert prepare["bytes_sent"] == 8 * w.size * (parties - 1)
            # the product itself sends nothing from the owner; truncation sends 8 (n-1) per output
            assert conv["bytes_sent"] == 8 * out_elems * (parties - 1)
            assert conv["bytes_received"] == 8 * x.size * (parties - 1) + 8 * out_elems * (parties - 1)
        else:
            assert prepare["bytes_received"] == 8 * w.size
            assert conv["bytes_sent"] == 8 * x.size + 8 * out_elems * (parties - 1)
        assert prepare["rounds"] == 1 and conv["rounds"] == 2
        # the owner receives c (8 B) per output; party 0 the truncation pair (10 B)
        expected_dealer = (8 * out_elems if rank == owner else 0) + (10 * out_elems if rank == 0 else 0)
        assert conv["dealer_bytes"] == expected_dealer


def test_private_bias_and_addition(rng):
    b = rng.uniform(-3, 3, size=5)
    x = rng.uniform(-3, 3, size=5)

    def program(ctx):
        xs = ctx.share(x if ctx.rank == 0 else None, owner=0)
        bp = ctx.private(b if ctx.rank == 1 else None, owner=1)
        return (xs + bp).reveal(), (xs - bp).reveal(), bp.as_shared().reveal()

    add, sub, same = mpc.run_local(program, parties=3)[0]
    np.testing.assert_allclose(add, x + b, atol=2**-16)
    np.testing.assert_allclose(sub, x - b, atol=2**-16)
    np.testing.assert_allclose(same, b, atol=2**-17)
