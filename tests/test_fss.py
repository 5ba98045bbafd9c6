"""The 2-party FSS comparison: DCF keys evaluate exactly, the material is seed-compressed and
validated, and DReLU/ReLU over the full ring domain costs 2 rounds and 8 B + 1 bit per element."""

import numpy as np
import pytest

import mpc
from mpc import prg
from mpc.comm import Communicator, InProcessNetwork
from mpc.dealer import MATERIALS, _encode_request, serve_dealer
from mpc.errors import ConfigError, ProtocolError
from mpc.fss import dcf, drelu_fss, fss_costs
from mpc.protocols.compare import drelu_bitwise

LIMIT = (1 << 62) - 1  # largest representable ring value


def _seeds(n: int) -> tuple[np.ndarray, np.ndarray]:
    key = prg.new_seed()
    raw = prg.Stream(key, 0).ring((2, n, 2)).view(np.uint64)
    return dcf.random_seeds(raw[0]), dcf.random_seeds(raw[1])


@pytest.mark.parametrize("domain", [1, 7, 8, 15, 31, 63])
def test_dcf_shares_xor_to_the_comparison(rng, domain):
    n = 30_000
    top = np.uint64((1 << domain) - 1)
    alpha = rng.integers(0, 1 << domain, n, dtype=np.uint64) if domain < 63 else rng.integers(0, 1 << 63, n, dtype=np.uint64)
    x = rng.integers(0, 1 << domain, n, dtype=np.uint64) if domain < 63 else rng.integers(0, 1 << 63, n, dtype=np.uint64)
    quarter = n // 4
    x[:quarter] = alpha[:quarter]  # x = alpha: not less
    x[quarter : 2 * quarter] = (alpha[quarter : 2 * quarter] - np.uint64(1)) & top  # one below
    x[2 * quarter : 2 * quarter + 100] = 0
    x[2 * quarter + 100 : 2 * quarter + 200] = top
    alpha[-100:] = 0  # nothing is below 0
    s0, s1 = _seeds(n)
    key = dcf.gen(alpha, domain, s0, s1)
    y0 = dcf.evaluate(0, s0, key, x, domain)
    y1 = dcf.evaluate(1, s1, key, x, domain)
    assert np.array_equal(y0 ^ y1, (x < alpha).astype(np.uint8))
    # each share alone is balanced, whatever the answer
    assert 0.45 < y0.mean() < 0.55 and 0.45 < y1[x < alpha].mean() < 0.55


@pytest.mark.parametrize("domain,expected", [(63, 920), (31, 404), (15, 148)])
def test_dcf_key_size(domain, expected):
    n = 10
    s0, s1 = _seeds(n)
    key = dcf.gen(np.zeros(n, np.uint64), domain, s0, s1)
    assert dcf.key_bytes(domain) == expected
    assert (key.cw.nbytes + key.vcw.nbytes + key.leaf.nbytes) == n * expected
    assert key.cw.shape == (domain - dcf.LEAF_BITS, n, 2)


def test_dcf_keys_differ_with_the_seeds(rng):
    # Without the other party's root seed, a key's words are independent of alpha.
    n = 2000
    s0, s1 = _seeds(n)
    k_a = dcf.gen(np.zeros(n, np.uint64), 31, s0, s1)
    k_b = dcf.gen(np.full(n, 12345, np.uint64), 31, s0, s1)
    assert not np.array_equal(k_a.cw, k_b.cw)
    bits = np.unpackbits(k_a.cw.view(np.uint8))
    assert 0.48 < bits.mean() < 0.52


def _material(params, parties=2):
    seeds = [prg.new_seed() for _ in range(parties)]
    material = MATERIALS["cmp_fss"]
    material.validate(params)
    draws = [material.draw(r, prg.Stream(s, 7), params) for r, s in enumerate(seeds)]
    corrections = material.combine(draws, params)
    finals = [
        material.assemble(r, material.draw(r, prg.Stream(s, 7), params), corrections[r], params)
        for r, s in enumerate(seeds)
    ]
    return finals, corrections


@pytest.mark.parametrize("bits", [64, 32])
def test_material_is_seed_compressed_and_consistent(bits):
    n, w = 5000, 2
    params = {"n": n, "bits": bits, "with_x": True, "payloads": w}
    finals, corrections = _material(params)
    key = dcf.key_bytes(bits - 1)
    checked = bits < 64  # shares of R = r >> (l - 1) and eps for the overflow terms, to party 0
    sent = {r: sum(a.nbytes for a in arrs) for r, arrs in corrections.items()}
    assert sent == {0: n * key + 8 * n * 2 * checked, 1: n * key + 8 * n * (2 + w)}
    r = (finals[0].masks.r + finals[1].masks.r).view(np.uint64)
    delta = finals[0].masks.delta + finals[1].masks.delta
    e = finals[0].masks.e ^ finals[1].masks.e
    m = (r >> np.uint64(bits - 1)) & np.uint64(1)
    assert np.array_equal(delta, (m.astype(np.uint8) ^ e).astype(np.int64))
    assert np.array_equal(finals[0].masks.delta_r + finals[1].masks.delta_r, delta * r.view(np.int64))
    rz = finals[0].masks.rz + finals[1].masks.rz
    assert np.array_equal(finals[0].masks.delta_rz + finals[1].masks.delta_rz, delta * rz)
    if checked:
        assert np.array_equal(finals[0].masks.high + finals[1].masks.high, (r >> np.uint64(bits - 1)).view(np.int64))
        assert np.array_equal(finals[0].masks.eps + finals[1].masks.eps, e.astype(np.int64))
    # the keys compare against r's low bits
    point = np.zeros(n, np.uint64)
    alpha_low = r & np.uint64((1 << (bits - 1)) - 1)
    u = dcf.evaluate(0, finals[0].seed, finals[0].key, point, bits - 1) ^ dcf.evaluate(
        1, finals[1].seed, finals[1].key, point, bits - 1
    )
    assert np.array_equal(u, (point < alpha_low).astype(np.uint8))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"n": 0, "bits": 64, "with_x": False, "payloads": 0}, "'n'"),
        ({"n": 10, "bits": 8, "with_x": False, "payloads": 0}, "'bits'"),
        ({"n": 10, "bits": 65, "with_x": False, "payloads": 0}, "'bits'"),
        ({"n": 10, "bits": 64, "with_x": 1, "payloads": 0}, "'with_x'"),
        ({"n": 10, "bits": 64, "with_x": False, "payloads": -1}, "'payloads'"),
        ({"n": "10", "bits": 64, "with_x": False, "payloads": 0}, "'n'"),
        ({"n": 1 << 30, "bits": 64, "with_x": False, "payloads": 0}, "'n'"),
        ({"n": 1 << 21, "bits": 64, "with_x": False, "payloads": 0}, "DCF keys"),
    ],
)
def test_material_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        MATERIALS["cmp_fss"].validate(params)


def test_dealer_turns_a_bad_fss_request_into_a_protocol_error():
    network = InProcessNetwork(3)
    dealer = Communicator(2, 2, network.endpoint(2), timeout_s=5)
    party0 = Communicator(0, 2, network.endpoint(0), timeout_s=5)
    party0.send_raw(2, _encode_request(0, "cmp_fss", {"n": 10, "bits": 200, "with_x": False, "payloads": 0}))
    with pytest.raises(ProtocolError, match="bits"):
        serve_dealer(dealer, [prg.new_seed(), prg.new_seed()])


def _edge_pairs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of representable ring values whose differences cover the whole 64-bit domain."""
    mags = rng.integers(0, 62, n)
    a = (rng.integers(0, 1 << 62, n, dtype=np.int64) >> (62 - mags)) * rng.choice([-1, 1], n)
    b = (rng.integers(0, 1 << 62, n, dtype=np.int64) >> (62 - rng.integers(0, 62, n))) * rng.choice([-1, 1], n)
    edges_a = [0, 1, -1, 0, 0, LIMIT, -LIMIT, LIMIT, -LIMIT, LIMIT, 5, -5]
    edges_b = [0, 0, 0, 1, -1, -LIMIT, LIMIT, LIMIT, -LIMIT, LIMIT - 1, 5, -5]
    a[: len(edges_a)] = edges_a
    b[: len(edges_b)] = edges_b
    return a, b


def _run_drelu(protocol, a, b, z, parties=2, **options):
    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0, frac_bits=0)
        y = ctx.share(b if ctx.rank == 1 else None, owner=1, frac_bits=0)
        zz = ctx.share(z if ctx.rank == 0 else None, owner=0, frac_bits=0)
        d = (x - y).share
        before = ctx.stats()
        res = protocol(ctx, d, bits=ctx.comparison_bits, with_x=True, payloads=[zz.share])
        after = ctx.stats()
        bit, relu, prod = ctx.comm.open([res.bit, res.relu, res.products[0]])
        return bit, relu, prod, {k: after[k] - before[k] for k in after}

    return mpc.run_local(program, parties=parties, **options)


def test_fss_drelu_is_exact_over_the_whole_domain(rng):
    n = 120_000
    a, b = _edge_pairs(rng, n)
    z = rng.integers(-(1 << 40), 1 << 40, n)
    outs = _run_drelu(drelu_fss, a, b, z)
    bit, relu, prod, stats = outs[0]
    d = a - b  # |d| < 2^63: no wrap
    assert np.array_equal(bit, (d >= 0).astype(np.int64))
    assert np.array_equal(relu, np.maximum(d, 0))
    assert np.array_equal(prod, np.where(d >= 0, z, 0))
    cost = fss_costs(64, with_x=True, payloads=1)
    assert stats["rounds"] == cost["rounds"] == 2
    assert stats["bytes_sent"] == 16 * n + -(-n // 8)
    assert stats["dealer_bytes"] == n * cost["dealer_bytes_party0"]
    assert outs[1][3]["dealer_bytes"] == n * cost["dealer_bytes_party1"]


@pytest.mark.parametrize("bits", [32, 16])
def test_fss_small_domain_is_exact_at_its_edges(rng, bits):
    lim = (1 << (bits - 1)) - 1
    n = 20_000
    a = rng.integers(-lim, lim + 1, n)
    a[:7] = [0, 1, -1, lim, -lim, lim - 1, -lim + 1]
    b = np.zeros(n, np.int64)
    z = np.ones(n, np.int64)
    bit, relu, _, _ = _run_drelu(drelu_fss, a, b, z, comparison_bits=bits)[0]
    assert np.array_equal(bit, (a >= 0).astype(np.int64))
    assert np.array_equal(relu, np.maximum(a, 0))


def test_fss_comparison_in_a_32_bit_domain_opens_all_64_bits(rng):
    # The overflow terms need y^'s high part, so a plain comparison opens 8 B, not 4.
    n = 4096
    values = rng.integers(-(1 << 30), 1 << 30, n)

    def program(ctx):
        x = ctx.share(values if ctx.rank == 0 else None, owner=0, frac_bits=0)
        before = ctx.stats()
        res = drelu_fss(ctx, x.share, bits=32)
        after = ctx.stats()
        return ctx.comm.open([res.bit])[0], after["bytes_sent"] - before["bytes_sent"]

    bit, sent = mpc.run_local(program, parties=2, comparison_bits=32)[0]
    assert np.array_equal(bit, (values >= 0).astype(np.int64))
    assert sent == 8 * n + n // 8


def test_fss_and_generic_agree(rng):
    n = 50_000
    a, b = _edge_pairs(rng, n)
    z = rng.integers(-1000, 1000, n)
    fss = _run_drelu(drelu_fss, a, b, z)[0]
    generic = _run_drelu(drelu_bitwise, a, b, z)[0]
    for got_fss, got_generic in zip(fss[:3], generic[:3]):
        assert np.array_equal(got_fss, got_generic)


def test_fss_refuses_other_party_counts():
    with pytest.raises(ConfigError, match="2 parties"):
        mpc.run_local(lambda ctx: None, parties=3, comparison="fss")

    def program(ctx):
        return drelu_fss(ctx, np.zeros(3, np.int64))

    with pytest.raises(ValueError, match="2 parties"):
        mpc.run_local(program, parties=3)


@pytest.mark.parametrize("bad", [{"comparison": "yao"}, {"comparison_bits": 8}, {"comparison_bits": 65}, {"comparison_bits": 32.0}])
def test_bad_comparison_options_are_named(bad):
    with pytest.raises(ConfigError, match="comparison"):
        mpc.run_local(lambda ctx: None, parties=2, **bad)


@pytest.mark.parametrize("protocol", [drelu_fss, drelu_bitwise])
def test_slack_bits_only_blur_differences_below_two_to_the_slack(rng, protocol):
    bits, slack = 32, 8
    lim = (1 << (bits - 1)) - (1 << slack)
    n = 40_000
    a = rng.integers(-lim, lim, n)
    a[: n // 4] = rng.integers(-(1 << slack), 1 << slack, n // 4)  # inside the blur
    a[:6] = [0, 1, -1, (1 << slack), -(1 << slack), lim - 1]

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0, frac_bits=0)
        before = ctx.stats()
        res = protocol(ctx, x.share, bits=bits, with_x=True, slack=slack)
        after = ctx.stats()
        return ctx.comm.open([res.bit, res.relu]), {k: after[k] - before[k] for k in after}

    outs = mpc.run_local(program, parties=2, comparison_bits=bits, comparison_slack_bits=slack)
    (bit, relu), stats = outs[0]
    outside = np.abs(a) >= (1 << slack)
    assert np.array_equal(bit[outside], (a[outside] >= 0).astype(np.int64))
    assert np.all((relu == np.maximum(a, 0)) | (relu == a))  # b * x exactly, whatever b is
    assert np.abs(relu - np.maximum(a, 0)).max() < (1 << slack)
    if protocol is drelu_fss:
        # party 0: the DCF keys, and shares of R and eps for the domain check
        assert stats["dealer_bytes"] == n * (dcf.key_bytes(bits - 1 - slack) + 16) == n * 292
        assert stats["rounds"] == 2
    else:
        assert stats["rounds"] == 5  # ceil(23 / 4) = 6 chunks: 3 tree levels


def test_slack_bits_are_validated():
    with pytest.raises(ConfigError, match="comparison_slack_bits"):
        mpc.run_local(lambda ctx: None, parties=2, comparison_bits=32, comparison_slack_bits=24)
    with pytest.raises(ValueError, match="'slack'"):
        MATERIALS["cmp_fss"].validate({"n": 4, "bits": 32, "with_x": False, "payloads": 0, "slack": 30})
