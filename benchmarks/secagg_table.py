"""Print the secure-aggregation table: one FedAvg round of a ResNet-18-sized update, secure against plain.

    python benchmarks/secagg_table.py [--nodes 3,10] [--repeat 3] [--rounds 3]

For each node count, the same node processes serve alternating plain and secure
hub runs (``--repeat`` of each), so that load from other processes hits both
alike.  A round (hub view, over authenticated websockets on 127.0.0.1): send the
global weights, collect every node's update, aggregate.  Training is replaced
by a fixed update (see bench_secagg.py); round 1 of each run is a warm-up and
left out.  Bytes are exact, from the hub's wire accounting, per node and round.
The second table times the pieces alone, one process, no network: on a node the
mask expansion runs on its own thread while the model trains, so only the
encoding and one addition wait for training to end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_secagg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10", help="node counts, comma-separated (default 3,10)")
    parser.add_argument("--repeat", type=int, default=3, help="hub runs per mode and node count (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per hub run, the first a warm-up (default 3)")
    args = parser.parse_args()

    rows = [
        f"ResNet-18 layout: {bench_secagg.RESNET18_VALUES:,} values (parameters and BatchNorm statistics), "
        "ring 2^32, 16 fractional bits.",
        "",
        "| nodes | aggregation | round time, median (s) | time vs plain | upload per node (B) | upload vs plain "
        "| download per node (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for nodes in (int(n) for n in args.nodes.split(",") if n):
        times: dict[bool, list[float]] = {False: [], True: []}
        bytes_up: dict[bool, float] = {}
        bytes_down: dict[bool, float] = {}
        with bench_secagg.BenchFederation(nodes) as fed:
            for _ in range(args.repeat):
                for secure in (False, True):
                    result = fed.run(secure=secure, rounds=args.rounds)
                    times[secure] += result["seconds"][1:]
                    bytes_up[secure] = result["upload_bytes"][-1]
                    bytes_down[secure] = result["download_bytes"][-1]
        plain_t = statistics.median(times[False])
        for secure in (False, True):
            t = statistics.median(times[secure])
            rows.append(
                f"| {nodes} | {'secure' if secure else 'plain'} | {t:.2f} | {t / plain_t:.2f}x "
                f"| {bytes_up[secure]:,.0f} | {bytes_up[secure] / bytes_up[False]:.5f}x | {bytes_down[secure]:,.0f} |"
            )
    rows += ["", "| nodes | node: expand masks, while training (s) | node: encode + mask, after training (s) "
             "| hub: unmask the sum (s) | hub: plain weighted sum (s) |", "|---|---|---|---|---|"]
    for nodes in (int(n) for n in args.nodes.split(",") if n):
        pieces = [bench_secagg.secure_pieces(nodes) for _ in range(3)]
        plain = statistics.median(bench_secagg.plain_sum(nodes) for _ in range(3))
        median = {key: statistics.median(p[key] for p in pieces) for key in pieces[0]}
        rows.append(
            f"| {nodes} | {median['node_expand_s']:.3f} | {median['node_mask_s']:.3f} "
            f"| {median['hub_unmask_s']:.3f} | {plain:.3f} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
