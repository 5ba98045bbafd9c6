"""Bytes and rounds of every operation, asserted against the formulas in docs/protocols.md."""

import numpy as np
import pytest

import mpc
from tests.conftest import PARTY_COUNTS

HEADER_BYTES = 72  # an input's shape header: 9 int64


def measure(parties, build, **options):
    """Run ``build(ctx)`` -> {name: thunk} (in order); return per-party {name: stats delta}."""

    def program(ctx):
        deltas = {}
        for name, thunk in build(ctx).items():
            before = ctx.stats()
            thunk()
            after = ctx.stats()
            deltas[name] = {k: after[k] - before[k] for k in after}
        return deltas

    return mpc.run_local(program, parties=parties, **options)


def inputs(ctx, shape_x=(4, 6), shape_y=(4, 6)):
    x = ctx.share(np.ones(shape_x) if ctx.rank == 0 else None, owner=0)
    y = ctx.share(np.ones(shape_y) if ctx.rank == 1 else None, owner=1)
    return x, y


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_input_sharing_costs_one_header_per_peer(parties):
    out = measure(parties, lambda ctx: {"share": lambda: ctx.share(np.ones((100, 100)) if ctx.rank == 0 else None, owner=0)})
    owner = out[0]["share"]
    assert owner["bytes_sent"] == HEADER_BYTES * (parties - 1) and owner["rounds"] == 1
    for other in out[1:]:
        assert other["share"]["bytes_received"] == HEADER_BYTES and other["share"]["bytes_sent"] == 0
        assert other["share"]["rounds"] == 1 and other["share"]["dealer_bytes"] == 0


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_elementwise_ops(parties):
    n = 24

    def build(ctx):
        x, y = inputs(ctx)
        return {
            "add": lambda: x + y - 2.5,
            "mul_public_int": lambda: x * 3,
            "mul_public_real": lambda: x * 0.5,
            "mul": lambda: x * y,
            "reveal": lambda: x.reveal(),
            "reveal_to_0": lambda: x.reveal(to=0),
        }

    out = measure(parties, build)
    peers = parties - 1
    for rank, d in enumerate(out):
        assert d["add"]["bytes_sent"] == 0 and d["add"]["rounds"] == 0
        assert d["mul_public_int"]["bytes_sent"] == 0 and d["mul_public_int"]["rounds"] == 0
        # public real: one exact truncation
        assert d["mul_public_real"]["rounds"] == 1
        assert d["mul_public_real"]["bytes_sent"] == 8 * n * peers == d["mul_public_real"]["bytes_received"]
        # shared * shared: Beaver (open eps and delta) + truncation, 2 rounds
        assert d["mul"]["rounds"] == 2
        assert d["mul"]["bytes_sent"] == 8 * (2 * n + n) * peers == d["mul"]["bytes_received"]
        dealer = (8 * n + 8 * n + 2 * n) if rank == 0 else 0  # c; r >> 16 and its top bit mod 2^16
        assert d["mul"]["dealer_bytes"] == dealer
        assert d["reveal"]["rounds"] == 1 and d["reveal"]["bytes_sent"] == 8 * n * peers
        expected_sent = 0 if rank == 0 else 8 * n
        expected_received = 8 * n * peers if rank == 0 else 0
        assert d["reveal_to_0"]["bytes_sent"] == expected_sent
        assert d["reveal_to_0"]["bytes_received"] == expected_received
        assert d["reveal_to_0"]["rounds"] == 1


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_matmul_and_conv2d(parties):
    def build(ctx):
        x, y = inputs(ctx, (5, 7), (7, 3))
        img, w = inputs(ctx, (1, 3, 8, 8), (4, 3, 3, 3))
        return {"matmul": lambda: x @ y, "conv": lambda: mpc.conv2d(img, w, stride=2, padding=1)}

    out = measure(parties, build)
    peers = parties - 1
    conv_out = 1 * 4 * 4 * 4
    for rank, d in enumerate(out):
        assert d["matmul"]["rounds"] == 2
        assert d["matmul"]["bytes_sent"] == 8 * (35 + 21 + 15) * peers
        assert d["matmul"]["dealer_bytes"] == (18 * 15 if rank == 0 else 0)
        assert d["conv"]["rounds"] == 2
        assert d["conv"]["bytes_sent"] == 8 * (3 * 64 + 4 * 27 + conv_out) * peers
        assert d["conv"]["dealer_bytes"] == (18 * conv_out if rank == 0 else 0)
        assert d["conv"]["dealer_requests"] == (2 if rank == 0 else 0)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_comparisons_below_64_bits_and_the_check_at_reveal(parties):
    """ReLU in a 32-bit domain: the DReLU's figures, +16 B dealer per element for the domain
    check's terms (to party 0 with FSS, to party 1 with the generic protocol); the reveal first runs the check: 2 rounds, 16 B per lane per peer."""
    from mpc.fss import dcf
    from mpc.protocols.compare import bitwise_costs, tree_plan
    from mpc.protocols.zerocheck import strong_lanes

    n, bits = 24, 32

    def build(ctx):
        x, _ = inputs(ctx)
        y = {}
        return {"relu": lambda: y.setdefault("v", x.relu()), "reveal": lambda: y["v"].reveal()}

    out = measure(parties, build, comparison_bits=bits)
    peers = parties - 1
    lanes = strong_lanes(64 - bits)  # one group (no scope, one domain): 2 lanes
    assert lanes == 2
    for rank, d in enumerate(out):
        if parties == 2:  # FSS
            key = dcf.key_bytes(bits - 1)
            assert d["relu"]["rounds"] == 2
            assert d["relu"]["bytes_sent"] == 8 * n + -(-n // 8)
            assert d["relu"]["dealer_bytes"] == n * (key + (8 * 2 if rank == 1 else 16))
        else:  # generic
            plan = tree_plan(-(-(bits - 1) // 4))
            cost = bitwise_costs(bits, parties)
            per_level = sum((2 * p + q) * -(-n // 8) for p, q in (plan.level_counts(t) for t in range(len(plan.levels))))
            assert d["relu"]["rounds"] == cost["rounds"] == 5
            assert d["relu"]["bytes_sent"] == peers * (8 * n + per_level + -(-n // 8))
            want = {0: 2 * plan.chunks * n + plan.and_gates * -(-n // 8), 1: (8 * 2 + 16) * n}.get(rank, 0)
            assert d["relu"]["dealer_bytes"] == want
        # reveal = the check (open S - a, open (2b + 1) S) + the opening itself
        assert d["reveal"]["rounds"] == 2 + 1
        assert d["reveal"]["bytes_sent"] == 16 * lanes * peers + 8 * n * peers
        assert d["reveal"]["dealer_bytes"] == (8 * lanes if rank == 0 else 0)

