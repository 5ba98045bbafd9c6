"""Print the engine's benchmark table: generator throughput and Beaver matmul/conv2d against plaintext.

    python benchmarks/mpc_table.py [--repeat 5]

Every ratio is measured in this one run (medians after a warm-up).  MPC times
are the wall time of ``mpc.run_local`` for the operation alone (inputs shared
beforehand), all parties and the dealer sharing this machine's cores; bytes and
rounds are exact, per party.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mpc  # noqa: E402
from mpc import kernels, prg  # noqa: E402


def median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generator_rows(repeat: int) -> list[str]:
    count = 10_000_000
    key = prg.new_seed()
    aes = median_time(lambda: prg.Stream(key, 0).ring(count), repeat)
    pcg_rng = np.random.default_rng()
    pcg = median_time(lambda: pcg_rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64), repeat)
    urandom = median_time(lambda: os.urandom(8 * count), max(1, repeat // 2))
    gb = 8 * count / 1e9
    return [
        "| generator (10^7 ring elements, 80 MB) | GB/s | secure |",
        "|---|---|---|",
        f"| AES-128-CTR `mpc.prg.Stream.ring` | {gb / aes:.2f} | yes |",
        f"| `os.urandom` | {gb / urandom:.2f} | yes (seeds only) |",
        f"| numpy PCG64 (reference, never for secrets) | {gb / pcg:.2f} | no |",
    ]


def _beaver_program(ctx, op, a, b, params, repeat):
    x = ctx.share(a if ctx.rank == 0 else None, owner=0)
    y = ctx.share(b if ctx.rank == 1 else None, owner=1)

    def once():
        return x @ y if op == "matmul" else mpc.conv2d(x, y, **params)

    once()  # warm-up: kernels compiled, caches hot
    times, deltas = [], None
    for _ in range(repeat):
        before = ctx.stats()
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
        after = ctx.stats()
        deltas = {k: after[k] - before[k] for k in after}
    return statistics.median(times), deltas


def beaver_rows(repeat: int) -> list[str]:
    rng = np.random.default_rng(0)
    cases = [
        ("matmul 256x2304 @ 2304x196", "matmul", rng.uniform(-1, 1, (256, 2304)), rng.uniform(-1, 1, (2304, 196)), {}),
        ("matmul 64x576 @ 576x3136", "matmul", rng.uniform(-1, 1, (64, 576)), rng.uniform(-1, 1, (576, 3136)), {}),
        ("conv 3x3 64->64 @56", "conv2d", rng.uniform(-1, 1, (1, 64, 56, 56)), rng.uniform(-0.1, 0.1, (64, 64, 3, 3)), {"padding": 1}),
        ("conv 7x7/2 3->64 @224", "conv2d", rng.uniform(-1, 1, (1, 3, 224, 224)), rng.uniform(-0.1, 0.1, (64, 3, 7, 7)), {"stride": 2, "padding": 3}),
    ]
    rows = [
        "| operation | parties | plaintext float64 ms | MPC ms | MPC / plaintext | rounds | sent per party MB | dealer MB (party 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, op, a, b, params in cases:
        if op == "matmul":
            plain = median_time(lambda: a @ b, repeat)
        else:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            plain = median_time(lambda: torch.nn.functional.conv2d(ta, tb, **params), repeat)
        for parties in (2, 3):
            seconds, d = mpc.run_local(_beaver_program, parties=parties, args=(op, a, b, params, repeat))[0]
            rows.append(
                f"| {name} | {parties} | {plain * 1e3:.1f} | {seconds * 1e3:.1f} | {seconds / plain:.1f}x | "
                f"{d['rounds']} | {d['bytes_sent'] / 1e6:.2f} | {d['dealer_bytes'] / 1e6:.2f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernels_warm = getattr(kernels, "warmup", None)
    if kernels_warm:
        kernels_warm()
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}\n")
    print("\n".join(generator_rows(args.repeat)))
    print()
    print("\n".join(beaver_rows(args.repeat)))


if __name__ == "__main__":
    main()
