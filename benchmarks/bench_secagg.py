"""Secure aggregation against plain FedAvg on a ResNet-18-sized update (11.7 M values).

    python -m pytest benchmarks/bench_secagg.py --benchmark-only     # in-process costs
    python benchmarks/secagg_table.py                                  # real federations, the table

Two kinds of measurement:

- :class:`BenchFederation` runs real federations: ``n`` node processes on 127.0.0.1
  (the real ``fl.node`` server and protocol; only training is replaced by a
  fixed random update, see :class:`UpdateOnlyRuntime`) and the real hub, over
  authenticated websockets, with ResNet-18's layout (11,699,112 floating-point
  values with BatchNorm statistics).  A round is: the hub sends the global
  weights, every node returns its update (plain: float32; secure: the masked
  uint32 vector after the key exchange), the hub aggregates.  With
  ``masking="dealer"`` a ``primia dealer`` process (started with the nodes)
  sends the hub the sum of the masks.  Round time and bytes on the wire per
  node come from the hub's own accounting.
- The pytest-benchmark cases time the pieces in one process: a node's
  encode-and-mask, the hub's unmask, the plain weighted sum.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fl.aggregation import WeightedSum  # noqa: E402
from fl.secagg import DEALER, DealerSecAgg, HubSecAgg, NodeSecAgg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET18_CLASSES = 1000  # torchvision's ResNet-18 head: 11,689,512 parameters
RESNET18_VALUES = 11_699_112  # parameters plus BatchNorm running statistics


# -- real federations with a fixed update in place of training -------------------------------


def _update_only_runtime(name: str, classes: int) -> Any:
    """A node runtime whose 'training' returns a fixed random update at once (everything else is real)."""
    import torch

    from fl.data import FolderScan
    from fl.metrics import summarize_predictions
    from fl.models import Layout, build_model
    from fl.node_protocol import NodeRuntime
    from fl.training import TrainResult

    class UpdateOnlyTrainer:
        def __init__(self, layout: Layout):
            self.layout = layout
            self.train_samples, self.val_samples = 1000, 0
            rng = np.random.default_rng(abs(hash(name)) % 2**32)  # benchmark data, not secret material
            self.update = rng.normal(scale=1e-3, size=layout.size).astype(np.float32)

        def train_round(self, round_index: int, weights: np.ndarray, lr: float) -> tuple[np.ndarray, TrainResult]:
            return self.update, TrainResult(0.0, 0.0, 1000, 1)

        def evaluate(self, weights: np.ndarray) -> Any:
            return summarize_predictions(np.zeros(0, np.int64), np.zeros((0, classes)), classes)

    class UpdateOnlyRuntime(NodeRuntime):
        def prepare(self, node: str, run_id: str, cfg: Any, class_names: list[str], channels: int) -> Any:
            model = build_model(cfg.model.name, num_classes=len(class_names), in_channels=channels,
                                input_size=cfg.data.input_size)
            return UpdateOnlyTrainer(Layout.of(model))

    torch.set_num_threads(1)
    scan = FolderScan(root=Path("."), classes=[f"c{i:04d}" for i in range(classes)])
    scan.labels = list(range(classes))
    scan.sizes = [(32, 32)] * classes
    scan.channels = [3] * classes
    return UpdateOnlyRuntime(scan, name=name)


def serve_node(name: str, port_file: str, token_file: str, classes: int) -> None:
    """Entry point of one benchmark node process (serves hub runs until terminated)."""
    from fl.node import NodeServer, share_the_gil
    from fl.transport import port_file_writer

    import logging

    logging.basicConfig(level=logging.DEBUG if os.environ.get("PRIMIA_BENCH_DEBUG") else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    share_the_gil()  # as run_node does
    token = Path(token_file).read_text().strip()
    server = NodeServer(_update_only_runtime(name, classes), name=name, token=token, max_message_mib=4096)

    asyncio.run(server.serve("127.0.0.1", 0, port_file_writer(port_file)))


class BenchFederation:
    """``nodes`` benchmark node processes on 127.0.0.1, serving one hub run after another.

    Use as a context manager; :meth:`run` runs a federation with plain or secure
    aggregation on the same processes, so runs can alternate under the same load.
    """

    def __init__(self, nodes: int, *, classes: int = RESNET18_CLASSES):
        self.names = [f"n{i:02d}" for i in range(nodes)]
        self.classes = classes
        self.token = secrets.token_hex(24)
        self._tmp = tempfile.TemporaryDirectory(prefix="primia-bench-")
        self.work = Path(self._tmp.name)
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        self.dealer_port = 0

    def __enter__(self) -> "BenchFederation":
        (self.work / "key").write_text(self.token)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        dealer = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dealer", "--port", "0", "--port-file", str(self.work / "dealer.port"),
             "--token-file", str(self.work / "key"), "--max-message-mib", "4096"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / "dealer.log", "w"),
        )
        for name in self.names:
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve-node", name, str(self.work / f"{name}.port"),
                 str(self.work / "key"), str(self.classes)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / f"{name}.log", "w"),
            ))
        deadline = time.monotonic() + 600
        for name, proc in zip(self.names, self.procs):
            port_file = self.work / f"{name}.port"
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"benchmark node {name} failed: {(self.work / f'{name}.log').read_text()[-2000:]}")
                time.sleep(0.05)
            self.ports[name] = json.loads(port_file.read_text())["port"]
        self.procs.append(dealer)
        while not (self.work / "dealer.port").exists():
            if dealer.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the benchmark dealer failed to start")
            time.sleep(0.05)
        self.dealer_port = json.loads((self.work / "dealer.port").read_text())["port"]
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._tmp.cleanup()

    def run(self, *, secure: bool, rounds: int = 3, ring_bits: int = 32, neighbours: int = 0,
            masking: str = "pairwise") -> dict[str, Any]:
        """One hub run; returns per-round seconds and mean bytes per node (upload and download).

        ``neighbours``: ``aggregation.neighbours`` (0: every node masks with every other);
        ``masking``: ``aggregation.masking`` ('pairwise' or 'dealer').
        """
        from fl.config import parse_config
        from fl.hub import run_hub

        out = self.work / f"run-{time.monotonic_ns()}"
        raw = {
            "run": {"name": "bench", "rounds": rounds, "evaluate_every": 0, "output_dir": str(out)},
            "federation": {
                "nodes": [{"name": n, "address": f"ws://127.0.0.1:{self.ports[n]}", "token": self.token}
                          for n in self.names],
                "max_message_mib": 4096,
            },
            "model": {"name": "resnet18"},
            "data": {"input_size": 32},
            "aggregation": {"secure": secure, "ring_bits": ring_bits, "neighbours": neighbours},
        }
        if secure and masking == "dealer":
            raw["aggregation"]["masking"] = "dealer"
            raw["federation"].update(dealer_address=f"ws://127.0.0.1:{self.dealer_port}", dealer_token=self.token)
        report = run_hub(parse_config(raw), progress=False)
        per_round = report["rounds"]
        return {
            "nodes": len(self.names),
            "secure": secure,
            "seconds": [r["seconds"]["train_and_aggregate"] for r in per_round],
            "upload_bytes": [statistics.mean(b["from_node"] for b in r["bytes"].values()) for r in per_round],
            "download_bytes": [statistics.mean(b["to_node"] for b in r["bytes"].values()) for r in per_round],
            "dealer_bytes": [r.get("dealer_bytes", {}).get("from_dealer", 0) for r in per_round],
        }


# -- in-process pieces ---------------------------------------------------------------------------


def _updates(nodes: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"n{i}": rng.normal(scale=1e-3, size=size).astype(np.float32) for i in range(nodes)}


def secure_pieces(nodes: int, size: int = RESNET18_VALUES, neighbours: int = 0,
                  masking: str = "pairwise") -> dict[str, float]:
    """Seconds for a node's mask expansion (done while it trains), its encode-and-mask after
    training, the hub's unmask, and with dealer masking the dealer's expansion of the mask sum
    (done while the nodes train) and its answer (one process, no network)."""
    updates = _updates(nodes, size)
    weights = {n: 1.0 / nodes for n in updates}
    hub = HubSecAgg(1, weights, size, 16, 32, 2, neighbours=neighbours, masking=masking)
    parties = {n: NodeSecAgg(n, b"bench", 16, 32, neighbours, masking=masking) for n in updates}
    dealer = DealerSecAgg(1, b"bench", size, 32) if masking == DEALER else None
    for n, p in parties.items():
        hub.add_public_key(n, p.public_key())
    roster = hub.close_keys()
    out: dict[str, float] = {}
    if dealer is not None:
        dealer.set_roster(roster)
        t0 = time.perf_counter()
        dealer.expand()
        out["dealer_expand_s"] = time.perf_counter() - t0
    expand_seconds, mask_seconds = [], []
    for n, p in parties.items():
        p.set_roster(roster, dealer.public_key() if dealer is not None else None)
        t0 = time.perf_counter()
        p.expand_masks(size)
        expand_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        masked = p.mask(updates[n], weights[n])
        mask_seconds.append(time.perf_counter() - t0)
        hub.add_masked(n, masked)
    included, dropped = hub.close_uploads()
    if dealer is not None:
        t0 = time.perf_counter()
        hub.add_mask_sum("dealer", dealer.mask_sum(included, dropped))
        out["dealer_answer_s"] = time.perf_counter() - t0
    else:
        for n in included:
            hub.add_reveal(n, *parties[n].reveal(included, dropped))
    t0 = time.perf_counter()
    hub.result()
    return {"node_expand_s": statistics.median(expand_seconds), "node_mask_s": statistics.median(mask_seconds),
            "hub_unmask_s": time.perf_counter() - t0, **out}


def plain_sum(nodes: int, size: int = RESNET18_VALUES) -> float:
    """Seconds for the hub's weighted sum of ``nodes`` float32 updates."""
    updates = _updates(nodes, size)
    t0 = time.perf_counter()
    acc = WeightedSum()
    for u in updates.values():
        acc.add(u, 1.0 / nodes)
    acc.mean()
    return time.perf_counter() - t0


def test_node_encode_and_mask_3_nodes(benchmark):
    updates = _updates(3, RESNET18_VALUES)
    parties = {n: NodeSecAgg(n, b"bench", 16, 32) for n in updates}
    roster = {n: p.public_key() for n, p in parties.items()}
    for p in parties.values():
        p.set_roster(roster)
    benchmark.pedantic(lambda: parties["n0"].mask(updates["n0"], 1 / 3), rounds=3, iterations=1)


def test_hub_unmask_3_nodes(benchmark):
    benchmark.pedantic(lambda: secure_pieces(3), rounds=2, iterations=1)


def test_dealer_masked_pieces_10_nodes(benchmark):
    benchmark.pedantic(lambda: secure_pieces(10, masking=DEALER), rounds=2, iterations=1)


def test_plain_weighted_sum_3_nodes(benchmark):
    benchmark.pedantic(lambda: plain_sum(3), rounds=3, iterations=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-node", nargs=4, metavar=("NAME", "PORT_FILE", "TOKEN_FILE", "CLASSES"))
    args = parser.parse_args()
    if args.serve_node:
        name, port_file, token_file, classes = args.serve_node
        serve_node(name, port_file, token_file, int(classes))
