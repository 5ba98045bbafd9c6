"""Print the secure-aggregation table: one FedAvg round of a ResNet-18-sized update, secure against plain.

    python benchmarks/secagg_table.py [--nodes 3,10] [--repeat 3] [--rounds 3] [--neighbours 4]

For each node count, the same node processes serve alternating plain and secure
hub runs (``--repeat`` of each; secure with every pair of nodes masking, with
each sparse ``aggregation.neighbours`` in ``--neighbours`` below nodes - 1, and
with ``aggregation.masking = 'dealer'`` and a ``primia dealer`` process), so that
load from other processes hits all alike.  A round (hub view, over authenticated websockets on 127.0.0.1): send the
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
    parser.add_argument("--neighbours", default="4",
                        help="sparse mask graphs to measure too, as aggregation.neighbours values, comma-separated; "
                             "only those below nodes - 1 (default 4; '' for none)")
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
        "| nodes | aggregation | round time, median (s) | time vs plain | upload per node (B) | upload vs plain "
        "| download per node (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for nodes in counts:
        times: dict[str, list[float]] = {label: [] for label, *_ in modes(nodes)}
        bytes_up: dict[str, float] = {}
        bytes_down: dict[str, float] = {}
        with bench_secagg.BenchFederation(nodes) as fed:
            for _ in range(args.repeat):
                for label, secure, k, masking in modes(nodes):
                    result = fed.run(secure=secure, rounds=args.rounds, neighbours=k, masking=masking)
                    times[label] += result["seconds"][1:]
                    bytes_up[label] = result["upload_bytes"][-1]
                    bytes_down[label] = result["download_bytes"][-1]
        plain_t = statistics.median(times["plain"])
        for label, *_ in modes(nodes):
            t = statistics.median(times[label])
            rows.append(
                f"| {nodes} | {label} | {t:.2f} | {t / plain_t:.2f}x "
                f"| {bytes_up[label]:,.0f} | {bytes_up[label] / bytes_up['plain']:.5f}x | {bytes_down[label]:,.0f} |"
            )
        print("\n".join(rows[-len(modes(nodes)):]), file=sys.stderr, flush=True)  # progress
    rows += ["", "| nodes | pair masks per node | node: expand masks, while training (s) "
             "| node: encode + mask, after training (s) | hub: unmask the sum (s) | hub: plain weighted sum (s) |",
             "|---|---|---|---|---|---|"]
    dealer_rows: list[str] = []
    for nodes in counts:
        plain = statistics.median(bench_secagg.plain_sum(nodes) for _ in range(3))
        for _, secure, k, masking in modes(nodes)[1:]:
            pieces = [bench_secagg.secure_pieces(nodes, neighbours=k, masking=masking) for _ in range(3)]
            median = {key: statistics.median(p[key] for p in pieces) for key in pieces[0]}
            masks = "dealer: 0 (1 mask)" if masking == "dealer" else str(k or nodes - 1)
            rows.append(
                f"| {nodes} | {masks} | {median['node_expand_s']:.3f} | {median['node_mask_s']:.3f} "
                f"| {median['hub_unmask_s']:.3f} | {plain:.3f} |"
            )
            if masking == "dealer":
                dealer_rows.append(f"| {nodes} | {median['dealer_expand_s']:.3f} | {median['dealer_answer_s']:.3f} |")
    rows += ["", "| nodes | dealer: expand the mask sum, while the nodes train (s) | dealer: answer the unmask (s) |",
             "|---|---|---|", *dealer_rows]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
