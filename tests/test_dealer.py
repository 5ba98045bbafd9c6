"""The dealer's material is correct, seed-compressed, and its requests are validated."""

import numpy as np
import pytest

from mpc import bilinear, prg
from mpc.comm import Communicator, InProcessNetwork
from mpc.dealer import MATERIALS, _encode_request, serve_dealer
from mpc.errors import ProtocolError


def material_for_all(kind, params, parties):
    """Run the dealer side and every party side of one material by hand."""
    seeds = [prg.new_seed() for _ in range(parties)]
    material = MATERIALS[kind]
    material.validate(params)
    draws = [material.draw(r, prg.Stream(s, 0), params) for r, s in enumerate(seeds)]
    corrections = material.combine(draws, params)
    sent = {r: sum(a.nbytes for a in arrs) for r, arrs in corrections.items()}
    finals = []
    for r, s in enumerate(seeds):
        drawn = material.draw(r, prg.Stream(s, 0), params)
        finals.append(material.assemble(r, drawn, corrections.get(r, []), params))
    return finals, sent


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize(
    "op,a,b,extra",
    [
        ("mul", (4, 5), (5,), {}),
        ("matmul", (3, 4), (4, 6), {}),
        ("conv2d", (1, 2, 6, 6), (3, 2, 3, 3), bilinear.conv_params(1, 1, 1, 1)),
    ],
)
def test_triples_satisfy_c_equals_f_of_a_b(parties, op, a, b, extra):
    params = {"op": op, "a": list(a), "b": list(b), **extra}
    finals, sent = material_for_all("triple", params, parties)
    total = [sum(f[i] for f in finals) for i in range(3)]
    assert np.array_equal(total[2], bilinear.evaluate(op, total[0], total[1], extra))
    # seed compression: one correction tensor, to party 0 only
    assert list(sent) == [0] and sent[0] == total[2].nbytes


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize("bits", [8, 16, 40])
def test_truncation_pairs(parties, bits):
    finals, sent = material_for_all("trunc", {"shape": [1000], "bits": bits}, parties)
    r = sum(f[0] for f in finals).view(np.uint64)
    hi = sum(f[1] for f in finals).view(np.uint64)
    top = sum(f[2].astype(np.uint64) for f in finals) & np.uint64((1 << bits) - 1)
    assert np.array_equal(hi, r >> np.uint64(bits))
    assert np.array_equal(top, r >> np.uint64(63))
    assert list(sent) == [0]


def _dealer_reply_to(request_bytes: np.ndarray):
    network = InProcessNetwork(3)
    dealer = Communicator(2, 2, network.endpoint(2), timeout_s=5)
    party0 = Communicator(0, 2, network.endpoint(0), timeout_s=5)
    party0.send_raw(2, request_bytes)
    serve_dealer(dealer, [prg.new_seed(), prg.new_seed()])


@pytest.mark.parametrize(
    "request_bytes,match",
    [
        (np.frombuffer(b"\xc1garbage", dtype=np.uint8), "undecodable"),
        (_encode_request(0, "triple", {"op": "pow", "a": [2], "b": [2]}), "unknown bilinear op"),
        (_encode_request(0, "triple", {"op": "mul", "a": [1 << 20, 1 << 20], "b": [1]}), "exceeds"),
        (_encode_request(0, "trunc", {"shape": [-1], "bits": 16}), "non-negative"),
        (_encode_request(0, "trunc", {"shape": [4], "bits": 80}), "bits"),
        (_encode_request(5, "trunc", {"shape": [4], "bits": 16}), "expected 0"),
        (_encode_request(0, "nonsense", {}), "unknown material"),
    ],
)
def test_dealer_rejects_bad_requests(request_bytes, match):
    with pytest.raises(ProtocolError, match=match):
        _dealer_reply_to(request_bytes)


def test_prefetched_material_equals_on_demand_results(rng):
    import mpc

    a = rng.uniform(-5, 5, size=(6, 7))
    b = rng.uniform(-5, 5, size=(7, 3))

    def program(ctx, prefetch):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        y = ctx.share(b if ctx.rank == 1 else None, owner=1)
        if prefetch:
            ctx.dealer.prefetch(
                [("triple", {"op": "matmul", "a": [6, 7], "b": [7, 3]}), ("trunc", {"shape": [18], "bits": 16})]
            )
        return (x @ y).reveal(), ctx.stats()["dealer_requests"]

    (plain, n1), *_ = mpc.run_local(program, parties=3, args=(False,))
    (pre, n2), *_ = mpc.run_local(program, parties=3, args=(True,))
    np.testing.assert_allclose(pre, a @ b, atol=1e-3)
    np.testing.assert_allclose(plain, a @ b, atol=1e-3)
    assert n1 == n2 == 2


def test_prefetch_out_of_order_is_a_clear_error():
    import mpc

    def program(ctx):
        x = ctx.share(np.ones(3) if ctx.rank == 0 else None, owner=0)
        ctx.dealer.prefetch([("trunc", {"shape": [99], "bits": 16})])
        return (x * 0.5).reveal()

    with pytest.raises(RuntimeError, match="prefetched"):
        mpc.run_local(program, parties=2, timeout_s=20)
