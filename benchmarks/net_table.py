"""Print the network table: loopback throughput against raw TCP, round latency, ReLU over the network.

    python benchmarks/net_table.py [--repeat 5] [--sizes 100,1000] [--relu-n 1000000]

Every ratio is measured in this one run; the raw socket and the websocket transport
are measured alternately so that load from other processes hits them alike (see
bench_net.py for the method).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_net  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="transfers per size and transport (default 5)")
    parser.add_argument("--sizes", default="100,1000", help="array sizes in MB (10^6 B), comma-separated")
    parser.add_argument("--latency-rounds", type=int, default=2000)
    parser.add_argument("--relu-n", type=int, default=10**6, help="ReLU elements (0: skip)")
    args = parser.parse_args()

    rows = ["| measurement | websockets (primia) | raw TCP socket | primia / raw |", "|---|---|---|---|"]
    for mb in (int(s) for s in args.sizes.split(",") if s):
        r = bench_net.throughput(mb * 10**6, repeat=args.repeat)
        rows.append(
            f"| {mb} MB array, one way, best of {args.repeat} | {r['ws_best']:.0f} MB/s | {r['raw_best']:.0f} MB/s "
            f"| {100 * r['ws_best'] / r['raw_best']:.0f} % |"
        )
        rows.append(
            f"| {mb} MB array, one way, median of {args.repeat} | {r['ws_median']:.0f} MB/s "
            f"| {r['raw_median']:.0f} MB/s | {100 * r['ws_median'] / r['raw_median']:.0f} % |"
        )
    lat = bench_net.latency(args.latency_rounds)
    rows.append(
        f"| 8-byte message round trip, median of {args.latency_rounds} | {lat['ws_us']:.0f} µs "
        f"| {lat['raw_us']:.0f} µs "
        f"| {lat['ws_us'] / lat['raw_us']:.1f}x the time |"
    )
    print("\n".join(rows))

    if args.relu_n:
        relu = bench_net.relu(args.relu_n)
        print()
        if relu is None:
            print("ReLU: SharedTensor.relu is not available in this build.")
        else:
            net, local = relu["network"], relu["local"]
            print(f"| 2-party ReLU, {args.relu_n:,} elements | over websockets (run_processes) "
                  "| in-process (run_local) |")
            print("|---|---|---|")
            print(f"| time (party 0, between barriers) | {net['seconds']:.2f} s | {local['seconds']:.2f} s |")
            print(f"| rounds | {net['rounds']} | {local['rounds']} |")
            print(f"| bytes sent by party 0 | {net['bytes_sent'] / 1e6:.1f} MB | {local['bytes_sent'] / 1e6:.1f} MB |")
            print(f"| dealer bytes received by party 0 | {net['dealer_bytes'] / 1e6:.0f} MB "
                  f"| {local['dealer_bytes'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
