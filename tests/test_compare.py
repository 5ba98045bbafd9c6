"""The generic (any n) comparison: its tree plan, its dealer material, exactness over the whole
domain for 2, 3 and 5 parties, and its exact round and byte counts."""

import numpy as np
import pytest

import mpc
from mpc import prg
from mpc.dealer import MATERIALS
from mpc.protocols.compare import CHUNK_BITS, bitwise_costs, drelu_bitwise, tree_plan
from tests.conftest import PARTY_COUNTS

LIMIT = (1 << 62) - 1


@pytest.mark.parametrize("chunks,levels,gates,opened", [(16, 4, 26, 41), (8, 3, 11, 18), (4, 2, 4, 7), (1, 0, 0, 0), (3, 2, 3, 5)])
def test_tree_plan_counts(chunks, levels, gates, opened):
    plan = tree_plan(chunks)
    assert len(plan.levels) == levels
    assert plan.and_gates == gates
    assert plan.opened_bits == opened
    # the root needs no EQ, and every hi child needs one
    for level in plan.levels:
        for hi, _, _ in level:
            assert plan.need_eq[hi]
    if plan.levels:
        assert not plan.need_eq[plan.levels[-1][0][2]]


def _material(params, parties):
    seeds = [prg.new_seed() for _ in range(parties)]
    material = MATERIALS["cmp_bitwise"]
    material.validate(params)
    corrections = material.combine([material.draw(r, prg.Stream(s, 3), params) for r, s in enumerate(seeds)], params)
    finals = [
        material.assemble(r, material.draw(r, prg.Stream(s, 3), params), corrections.get(r, []), params)
        for r, s in enumerate(seeds)
    ]
    return finals, corrections


@pytest.mark.parametrize("parties", PARTY_COUNTS)
@pytest.mark.parametrize("bits", [64, 32])
def test_material_tables_and_triples(parties, bits):
    n = 3000
    params = {"n": n, "bits": bits, "with_x": True, "payloads": 1}
    finals, corrections = _material(params, parties)
    plan = tree_plan(-(-(bits - 1) // CHUNK_BITS))
    # seed compression: party 0 gets the tables and AND corrections, party 1 the delta shares
    # (and, below 64 bits, shares of R = r >> (l - 1) and eps for the overflow terms)
    sent = {r: sum(a.nbytes for a in arrs) for r, arrs in corrections.items()}
    checked = bits < 64
    assert sent == {0: 2 * plan.chunks * n + plan.and_gates * -(-n // 8), 1: 8 * (3 + 2 * checked) * n}
    r = sum(f.masks.r for f in finals).view(np.uint64)
    low = r & np.uint64((1 << (bits - 1)) - 1)
    tables = np.bitwise_xor.reduce([f.tables for f in finals])
    for node in range(plan.chunks):
        shift = np.uint64(CHUNK_BITS * (plan.chunks - 1 - node))
        chunk = (low >> shift) & np.uint64(15)
        assert np.array_equal(tables[node], (np.uint16(1) << chunk.astype(np.uint16)))
    for t in range(len(plan.levels)):
        a = np.bitwise_xor.reduce([f.triples[t].a for f in finals])
        b1 = np.bitwise_xor.reduce([f.triples[t].b1 for f in finals])
        c1 = np.bitwise_xor.reduce([f.triples[t].c1 for f in finals])
        assert np.array_equal(c1, a & b1)
    m = ((r >> np.uint64(bits - 1)) & np.uint64(1)).astype(np.uint8)
    e = np.bitwise_xor.reduce([f.masks.e for f in finals])
    delta = sum(f.masks.delta for f in finals)
    assert np.array_equal(delta, (m ^ e).astype(np.int64))
    assert np.array_equal(sum(f.masks.delta_r for f in finals), delta * r.view(np.int64))
    if checked:
        assert np.array_equal(sum(f.masks.high for f in finals), (r >> np.uint64(bits - 1)).view(np.int64))
        assert np.array_equal(sum(f.masks.eps for f in finals), e.astype(np.int64))
    else:
        assert all(f.masks.high is None and f.masks.eps is None for f in finals)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"n": -1, "bits": 64, "with_x": False, "payloads": 0}, "'n'"),
        ({"n": 4, "bits": 15, "with_x": False, "payloads": 0}, "'bits'"),
        ({"n": 4, "bits": 64, "with_x": None, "payloads": 0}, "'with_x'"),
        ({"n": 4, "bits": 64, "with_x": False, "payloads": 1 << 20}, "'payloads'"),
        ({"n": 1 << 22, "bits": 64, "with_x": False, "payloads": 4000}, "masked elements"),
        ({"bits": 64, "with_x": False, "payloads": 0}, "'n'"),
    ],
)
def test_material_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        MATERIALS["cmp_bitwise"].validate(params)


def _values(rng, n):
    mags = rng.integers(0, 62, n)
    a = (rng.integers(0, 1 << 62, n, dtype=np.int64) >> (62 - mags)) * rng.choice([-1, 1], n)
    b = (rng.integers(0, 1 << 62, n, dtype=np.int64) >> (62 - rng.integers(0, 62, n))) * rng.choice([-1, 1], n)
    a[:10] = [0, 1, -1, 0, 0, LIMIT, -LIMIT, LIMIT, 7, -LIMIT]
    b[:10] = [0, 0, 0, 1, -1, -LIMIT, LIMIT, LIMIT, 7, -LIMIT + 1]
    return a, b


def _run(a, b, z, parties, bits=64):
    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0, frac_bits=0)
        y = ctx.share(b if ctx.rank == parties - 1 else None, owner=parties - 1, frac_bits=0)
        zz = ctx.share(z if ctx.rank == 0 else None, owner=0, frac_bits=0)
        before = ctx.stats()
        res = drelu_bitwise(ctx, (x - y).share, bits=bits, with_x=True, payloads=[zz.share])
        after = ctx.stats()
        opened = ctx.comm.open([res.bit, res.relu, res.products[0]])
        return opened, {k: after[k] - before[k] for k in after}

    return mpc.run_local(program, parties=parties)


@pytest.mark.parametrize("parties", PARTY_COUNTS)
def test_generic_drelu_is_exact_and_costs_what_it_says(rng, parties):
    n = 40_000
    a, b = _values(rng, n)
    z = rng.integers(-(1 << 50), 1 << 50, n)
    outs = _run(a, b, z, parties)
    (bit, relu, prod), stats = outs[0]
    d = a - b
    assert np.array_equal(bit, (d >= 0).astype(np.int64))
    assert np.array_equal(relu, np.maximum(d, 0))
    assert np.array_equal(prod, np.where(d >= 0, z, 0))
    cost = bitwise_costs(64, parties, with_x=True, payloads=1)
    plan = tree_plan(16)
    assert stats["rounds"] == cost["rounds"] == 6
    per_level = sum((2 * p + q) * -(-n // 8) for p, q in (plan.level_counts(t) for t in range(4)))
    assert stats["bytes_sent"] == (parties - 1) * (16 * n + per_level + -(-n // 8))
    assert stats["dealer_bytes"] == 32 * n + 26 * -(-n // 8)
    assert outs[1][1]["dealer_bytes"] == 24 * n
    assert all(o[1]["dealer_bytes"] == 0 for o in outs[2:])


@pytest.mark.parametrize("bits", [16, 17, 32, 33])
def test_generic_small_domains_at_their_edges(rng, bits):
    lim = (1 << (bits - 1)) - 1
    n = 10_000
    a = rng.integers(-lim, lim + 1, n)
    a[:7] = [0, 1, -1, lim, -lim, lim - 1, -lim + 1]
    (bit, relu, _), stats = _run(a, np.zeros(n, np.int64), np.ones(n, np.int64), 3, bits=bits)[0]
    assert np.array_equal(bit, (a >= 0).astype(np.int64))
    assert np.array_equal(relu, np.maximum(a, 0))
    assert stats["rounds"] == bitwise_costs(bits, 3)["rounds"]


def test_generic_large_tensor_has_no_wrong_element(rng):
    n = 150_000
    a = rng.integers(-(1 << 40), 1 << 40, n)
    (bit, relu, _), _ = _run(a, np.zeros(n, np.int64), np.zeros(n, np.int64), 3)[0]
    assert np.array_equal(bit, (a >= 0).astype(np.int64))
    assert np.array_equal(relu, np.maximum(a, 0))
