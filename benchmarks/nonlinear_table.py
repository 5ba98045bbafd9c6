"""Print the non-linear benchmark tables: comparisons (ReLU, 3x3/2 max pooling, argmax over 10
classes, and ReLU followed by the comparison check), then the approximations.

    python benchmarks/nonlinear_table.py [--repeat 3] [--quick] [--only comparisons|approximations]

For 2 parties (FSS over a 64- and a 32-bit domain, the latter also with 8
slack bits, and the generic protocol) and 3 parties (generic), beside CrypTen's measured 2-party ReLU (9 rounds,
~232 B sent per party per element).  Per operation: the median wall time of
the operation alone in ``mpc.run_local`` (inputs shared beforehand; every party
and the dealer share this machine's 2 cores, so the dealer's key generation is
inside the time), the same without the time party 0 waited for the dealer
(what remains when material is made ahead), the dealer's own time for the
operation's material, online rounds, online bytes sent per party and dealer
bytes received per party (the larger of party 0 and party 1), both per element
of the input (ReLU), per output window (pooling) or per row (argmax), and per
comparison.  "ReLU + check" adds ``ctx.check_comparisons()`` (2 rounds, a few
lanes) after the ReLU; in a 64-bit domain there is nothing to check.

The approximations table: every function on 65536 inputs spread over its
stated range (docs/nonlinear.md), per protocol: median time, rounds, bytes per
element, and the largest error against numpy on those inputs in that run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

import mpc  # noqa: E402
from mpc import prg  # noqa: E402
from mpc.dealer import MATERIALS  # noqa: E402

CRYPTEN_ROUNDS = 9
CRYPTEN_BYTES = 232

CONFIGS = [
    # label, parties, comparison, bits (l), slack bits (k)
    ("2P FSS l=64", 2, "fss", 64, 0),
    ("2P FSS l=32", 2, "fss", 32, 0),
    ("2P FSS l=32 k=8", 2, "fss", 32, 8),
    ("2P generic l=64", 2, "generic", 64, 0),
    ("2P generic l=32", 2, "generic", 32, 0),
    ("3P generic l=64", 3, "generic", 64, 0),
    ("3P generic l=32", 3, "generic", 32, 0),
]


def _relu_checked(x):
    y = x.relu()
    x.ctx.check_comparisons()
    return y


def _cases(quick: bool) -> list[tuple[str, np.ndarray, object, int, int]]:
    """(name, input, op, elements the figures are divided by, comparisons)."""
    rng = np.random.default_rng(0)
    scale = 4 if quick else 1
    relu_in = rng.normal(0, 2, (1, 64, 56 // scale, 56 // scale))
    pool_in = rng.normal(0, 2, (1, 64, 112 // scale, 112 // scale))
    logits = rng.normal(0, 3, (4096 // scale**2, 10))
    pool_out = 64 * (56 // scale) ** 2
    h = 112 // scale
    pool_cmp = 64 * (2 * h * (h // 2) + 2 * (h // 2) ** 2)  # separable: rows then columns, 2 per window each
    return [
        (f"ReLU {relu_in.size} el.", relu_in, lambda x: x.relu(), relu_in.size, relu_in.size),
        (f"ReLU + check {relu_in.size} el.", relu_in, _relu_checked, relu_in.size, relu_in.size),
        (f"max_pool2d 3x3/2 {pool_out} win.", pool_in, lambda x: mpc.max_pool2d(x, 3, 2, 1), pool_out, pool_cmp),
        (f"argmax 10 cls, {logits.shape[0]} rows", logits, lambda x: x.argmax(axis=1), logits.shape[0], 9 * logits.shape[0]),
    ]


def _program(ctx, data, op, repeat):
    x = ctx.share(data if ctx.rank == 0 else None, owner=0)
    requests: list[tuple[str, dict]] = []
    waited = [0.0]
    get, recv_dealer = ctx.dealer.get, ctx.comm.recv_dealer

    def recording_get(kind, params):
        requests.append((kind, dict(params)))
        return get(kind, params)

    def timed_recv_dealer(shape, dtype):
        start = time.perf_counter()
        try:
            return recv_dealer(shape, dtype)
        finally:
            waited[0] += time.perf_counter() - start

    ctx.dealer.get, ctx.comm.recv_dealer = recording_get, timed_recv_dealer
    op(x)  # warm-up: kernels compiled and loaded; records the dealer requests of one run
    one_run = list(requests)
    times, online, deltas = [], [], {}
    for _ in range(repeat):
        before = ctx.stats()
        waited[0] = 0.0
        start = time.perf_counter()
        op(x)
        times.append(time.perf_counter() - start)
        online.append(times[-1] - waited[0])
        after = ctx.stats()
        deltas = {k: after[k] - before[k] for k in after}
    return statistics.median(times), statistics.median(online), deltas, one_run


def _dealer_seconds(requests: list[tuple[str, dict]], parties: int) -> float:
    """The dealer's time for one run's material, each request alone (draws excluded)."""
    total = 0.0
    for kind, params in requests:
        material = MATERIALS[kind]
        seeds = [prg.new_seed() for _ in range(parties)]
        draws = [material.draw(r, prg.Stream(s, 0), params) for r, s in enumerate(seeds)]
        start = time.perf_counter()
        material.combine(draws, params)
        total += time.perf_counter() - start
    return total


def rows(repeat: int, quick: bool) -> list[str]:
    out = [
        "| operation | protocol | time s | without dealer wait s | dealer s | rounds | sent B/el. | dealer B/el. | sent B/cmp | dealer B/cmp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data, op, elements, comparisons in _cases(quick):
        for label, parties, comparison, bits, slack in CONFIGS:
            outs = mpc.run_local(
                _program, parties=parties, args=(data, op, repeat),
                comparison=comparison, comparison_bits=bits, comparison_slack_bits=slack,
            )
            seconds, online, d, requests = outs[0]
            dealer = max(o[2]["dealer_bytes"] for o in outs)
            keygen = _dealer_seconds(requests, parties)
            out.append(
                f"| {name} | {label} | {seconds:.3f} | {online:.3f} | {keygen:.3f} | {d['rounds']} | "
                f"{d['bytes_sent'] / elements:.1f} | {dealer / elements:.0f} | "
                f"{d['bytes_sent'] / comparisons:.2f} | {dealer / comparisons:.0f} |"
            )
        if name.startswith("ReLU"):
            out.append(f"| {name} | CrypTen 2P (measured here) | | | | {CRYPTEN_ROUNDS} | {CRYPTEN_BYTES} | | {CRYPTEN_BYTES} | |")
    return out


# -- approximations ---------------------------------------------------------------------------
APPROX_CONFIGS = [
    # label, parties, comparison, bits (l)
    ("2P FSS l=32", 2, "fss", 32),
    ("2P generic l=32", 2, "generic", 32),
    ("3P generic l=32", 3, "generic", 32),
]


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return x * 0.5 * (1 + erf(x / np.sqrt(2)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _layer_norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)


def _approx_cases(n: int) -> list[tuple[str, str, np.ndarray, object, object]]:
    """(name, range, input, op, numpy reference): inputs spread over the stated range."""
    rng = np.random.default_rng(0)
    wide = np.linspace(-20, 20, n)
    mags = 2.0 ** rng.uniform(-8, 15, n)
    rows = (n // 64, 64)
    return [
        ("sigmoid", "all x", wide, lambda x: x.sigmoid(), _sigmoid),
        ("tanh", "all x", wide, lambda x: x.tanh(), np.tanh),
        ("silu", "all x", wide, lambda x: x.silu(), lambda x: x * _sigmoid(x)),
        ("gelu", "all x", wide, lambda x: x.gelu(), _gelu),
        ("hardsigmoid", "all x", wide, lambda x: x.hardsigmoid(), lambda x: np.clip(x / 6 + 0.5, 0, 1)),
        ("hardswish", "all x", wide, lambda x: x.hardswish(), lambda x: x * np.clip(x + 3, 0, 6) / 6),
        ("exp", "[-32, 0]", np.linspace(-32, 0, n), lambda x: x.exp(), np.exp),
        ("reciprocal", "|x| in [2^-8, 2^15)", mags * rng.choice([-1, 1], n), lambda x: x.reciprocal(), lambda x: 1 / x),
        ("inv_sqrt", "[2^-8, 2^15)", mags, lambda x: x.inv_sqrt(), lambda x: 1 / np.sqrt(x)),
        ("softmax (10 per row)", "all x", rng.normal(0, 8, (n // 10, 10)), lambda x: x.softmax(axis=1), _softmax),
        ("layer_norm (64 per row)", "var in [2^-8, 2^15)", rng.normal(0, 2, rows), lambda x: x.layer_norm(), _layer_norm),
    ]


def _approx_program(ctx, data, op, repeat):
    x = ctx.share(data if ctx.rank == 0 else None, owner=0)
    out = op(x)  # warm-up
    times, deltas = [], {}
    for _ in range(repeat):
        before = ctx.stats()
        start = time.perf_counter()
        out = op(x)
        times.append(time.perf_counter() - start)
        after = ctx.stats()
        deltas = {k: after[k] - before[k] for k in after}
    return statistics.median(times), deltas, out.reveal()


def approximation_rows(repeat: int, quick: bool) -> list[str]:
    n = 1 << (12 if quick else 16)
    out = [
        "| function | range | protocol | time s | rounds | sent B/el. | dealer B/el. | max abs error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, domain, data, op, ref in _approx_cases(n):
        data = mpc.decode(mpc.encode(data))  # the values the engine holds
        for label, parties, comparison, bits in APPROX_CONFIGS:
            outs = mpc.run_local(_approx_program, parties=parties, args=(data, op, repeat),
                                 comparison=comparison, comparison_bits=bits)
            seconds, d, got = outs[0]
            dealer = max(o[1]["dealer_bytes"] for o in outs)
            err = float(np.abs(got - ref(data)).max())
            out.append(
                f"| {name} | {domain} | {label} | {seconds:.3f} | {d['rounds']} | {d['bytes_sent'] / data.size:.1f} | "
                f"{dealer / data.size:.0f} | {err:.2g} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="inputs 4x smaller per side (a smoke run)")
    parser.add_argument("--only", choices=("comparisons", "approximations"))
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; CrypTen 2-party ReLU: {CRYPTEN_ROUNDS} rounds, ~{CRYPTEN_BYTES} B sent per party per element\n")
    if args.only != "approximations":
        print("\n".join(rows(args.repeat, args.quick)))
        print()
    if args.only != "comparisons":
        print("\n".join(approximation_rows(args.repeat, args.quick)))


if __name__ == "__main__":
    main()
