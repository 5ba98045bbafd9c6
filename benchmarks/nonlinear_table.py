"""Print the non-linear benchmark table: ReLU, 3x3/2 max pooling and argmax over 10 classes.

    python benchmarks/nonlinear_table.py [--repeat 3] [--quick]

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
comparison.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="inputs 4x smaller per side (a smoke run)")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; CrypTen 2-party ReLU: {CRYPTEN_ROUNDS} rounds, ~{CRYPTEN_BYTES} B sent per party per element\n")
    print("\n".join(rows(args.repeat, args.quick)))


if __name__ == "__main__":
    main()
