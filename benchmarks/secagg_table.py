"""Print the secure-aggregation tables: one FedAvg round of a ResNet-18-sized update, secure against plain.

    python benchmarks/secagg_table.py [--nodes 3,10] [--repeat 3] [--rounds 3] [--neighbours 2,4]

Table 1, real federations: for each node count, the same node processes (and a
``primia dealer`` process) dial the hub on 127.0.0.1 and serve alternating
hub runs — plain, secure with every pair masking, with each sparse
``aggregation.neighbours`` in ``--neighbours`` below nodes - 1, and with
dealer masking — ``--repeat`` of each, so that load from other processes hits
all alike.  A round (hub view): send the global weights, collect every node's
update (the signed key exchange, Shamir shares, consistency round and
unmasking included), aggregate.  Training is replaced by a fixed update (see
bench_secagg.py); round 1 of each run is a warm-up and left out.  Bytes are
exact, from the hub's wire accounting, per node and round; CPU seconds are
each process's own counters per round (median node; all parties share the
machine's 2 cores).  One more run per node count kills a node right after its
round-2 upload: that round completes with its update, from its partners'
shares.

Table 2, the security work alone (one process, no network, CPU seconds per
round): what a node spends on keys, signatures, Shamir shares, masks and the
consistency round; what the hub spends checking signatures, opening seeds and
removing masks; what the dealer spends; and the same with a node lost after
uploading.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_secagg  # noqa: E402


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10", help="node counts, comma-separated (default 3,10)")
    parser.add_argument("--repeat", type=int, default=3, help="hub runs per mode and node count (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per hub run, the first a warm-up (default 3)")
    parser.add_argument("--neighbours", default="2,4",
                        help="sparse mask graphs to measure too, as aggregation.neighbours values, comma-separated; "
                             "only those below nodes - 1 (default 2,4; '' for none)")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",") if n]
    sparse = [int(k) for k in args.neighbours.split(",") if k]

    def modes(nodes: int) -> list[tuple[str, bool, int, str]]:
        out = [("plain", False, 0, ""), ("secure, every pair", True, 0, "pairwise")]
        out += [(f"secure, {k} neighbours", True, k, "pairwise") for k in sparse if 2 <= k < nodes - 1]
        return out + [("secure, dealer", True, 0, "dealer")]

    rows = [
        f"ResNet-18 layout: {bench_secagg.RESNET18_VALUES:,} values (parameters and BatchNorm statistics), "
        "ring 2^32, 16 fractional bits.",
        "",
        "| nodes | aggregation | round time s, median (range) | time vs plain | upload per node B | upload vs plain "
        "| download per node B | CPU s per node and round | CPU s, dealer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for nodes in counts:
        times: dict[str, list[float]] = {label: [] for label, *_ in modes(nodes)}
        cpu: dict[str, list[float]] = {label: [] for label, *_ in modes(nodes)}
        dealer_cpu: dict[str, list[float]] = {label: [] for label, *_ in modes(nodes)}
        up: dict[str, float] = {}
        down: dict[str, float] = {}
        with bench_secagg.BenchFederation(nodes) as fed:
            for _ in range(args.repeat):
                for label, secure, k, masking in modes(nodes):
                    result = fed.run(secure=secure, rounds=args.rounds, neighbours=k, masking=masking)
                    times[label] += result["seconds"][1:]
                    cpu[label] += result["node_cpu_s"][1:]
                    dealer_cpu[label] += result["dealer_cpu_s"][1:]
                    up[label] = result["upload_bytes"][-1]
                    down[label] = result["download_bytes"][-1]
            lost = fed.run(secure=True, rounds=3, neighbours=2 if nodes > 3 else 0,
                           lose_after_upload=(2, fed.names[-1]))
        plain_t = statistics.median(times["plain"])
        for label, *_ in modes(nodes):
            t = statistics.median(times[label])
            rows.append(
                f"| {nodes} | {label} | {_spread(times[label])} | {t / plain_t:.2f}x | {up[label]:,.0f} "
                f"| {up[label] / up['plain']:.5f}x | {down[label]:,.0f} | {_spread(cpu[label])} "
                f"| {statistics.median(dealer_cpu[label]):.2f} |"
            )
        graph = "2 neighbours" if nodes > 3 else "every pair"
        rows.append(
            f"| {nodes} | secure, {graph}, a node killed after its upload | {lost['seconds'][1]:.2f} (1 round) "
            f"| {lost['seconds'][1] / plain_t:.2f}x | | | | | |"
        )
        assert lost["included"][1] == fed.names, f"the lost node's update was not counted: {lost['included'][1]}"
        print("\n".join(rows[-len(modes(nodes)) - 1:]), file=sys.stderr, flush=True)  # progress
    rows += ["", "| nodes | aggregation | node: security work (CPU s) | hub: security work and unmasking (CPU s) "
             "| dealer (CPU s) | hub: plain weighted sum (CPU s) |",
             "|---|---|---|---|---|---|"]
    for nodes in counts:
        plain = statistics.median(bench_secagg.plain_sum(nodes) for _ in range(3))
        cases = [(label, dict(neighbours=k, masking=masking)) for label, secure, k, masking in modes(nodes)[1:]]
        cases.append(("secure, every pair, a node lost after upload", dict(lose_after_upload=f"n{nodes - 1:02d}")))
        for label, kwargs in cases:
            pieces = [bench_secagg.secure_pieces(nodes, **kwargs) for _ in range(3)]
            median = {key: statistics.median(p[key] for p in pieces) for key in pieces[0]}
            rows.append(f"| {nodes} | {label} | {median['node_cpu_s']:.3f} | {median['hub_cpu_s']:.3f} "
                        f"| {median['dealer_cpu_s']:.3f} | {plain:.3f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
