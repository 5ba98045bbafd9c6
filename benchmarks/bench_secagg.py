"""Secure aggregation against plain FedAvg on a ResNet-18-sized update (11.7 M values).

    python -m pytest benchmarks/bench_secagg.py --benchmark-only     # in-process costs
    python benchmarks/secagg_table.py                                  # real federations, the table

Two kinds of measurement:

- :class:`BenchFederation` runs real federations: ``n`` node processes that
  dial the hub on 127.0.0.1 (the real ``fl.node`` client and protocol; only
  training is replaced by a fixed random update, see :class:`UpdateOnlyRuntime`)
  and the real hub, over authenticated websockets, with ResNet-18's layout
  (11,699,112 floating-point values with BatchNorm statistics).  A round is:
  the hub sends the global weights, every node returns its update (plain:
  float32; secure: the masked uint32 vector after the signed key exchange and
  the Shamir shares, then the consistency round and the unmasking), the hub
  aggregates.  With ``masking="dealer"`` a ``primia dealer`` process sends the
  hub the sum of the masks.  Round time and bytes on the wire per node come
  from the hub's own accounting, CPU seconds from each process's counters.
- :func:`secure_pieces` and the pytest-benchmark cases time each party's
  security work in one process (thread CPU time): keys, signatures, shares,
  masks, recovery.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


def serve_node(name: str, hub: str, keys: str, classes: int) -> None:
    """Entry point of one benchmark node process: dials the hub on ``hub`` run after run until terminated."""
    import logging

    from fl.identity import Directory, load_private_key, load_public_key, sign_statement
    from fl.node import NodeClient, share_the_gil
    from fl.transport import member_identity

    logging.basicConfig(level=logging.DEBUG if os.environ.get("PRIMIA_BENCH_DEBUG") else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    share_the_gil()  # as run_node does
    folder = Path(keys)
    key = load_private_key(folder / f"{name}.key", what="key")
    runtime = _update_only_runtime(name, classes)
    hub_key, dealer_key = (load_public_key(folder / f"{n}.pub", what=n) for n in ("hub", "dealer"))
    runtime.sign = lambda *fields: sign_statement(key, *fields)
    runtime.directory = Directory.from_folder(folder, what="keys").nodes(not_keys=[hub_key, dealer_key])
    runtime.dealer_key = dealer_key
    runtime.allow_plain = True  # the benchmark compares with plain rounds on the same processes
    identity = member_identity(name, key, hub_key)
    client = NodeClient(runtime, identity=identity, hub=hub, max_message_mib=4096, reconnect_max_s=0.2)
    asyncio.run(client.run())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BenchFederation:
    """``nodes`` benchmark node processes and a ``primia dealer`` process that dial one port of 127.0.0.1 run
    after run; :meth:`run` runs a hub there with plain or secure aggregation, so modes alternate under the same
    load.  Use as a context manager.
    """

    def __init__(self, nodes: int, *, classes: int = RESNET18_CLASSES):
        from fl.demo import make_keys

        self.names = [f"n{i:02d}" for i in range(nodes)]
        self.classes = classes
        self._tmp = tempfile.TemporaryDirectory(prefix="primia-bench-")
        self.work = Path(self._tmp.name)
        self.keys = make_keys(self.work / "keys", tuple(self.names), dealer=True)
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def hub(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start_node(self, name: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--serve-node", name, self.hub, str(self.keys), str(self.classes)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / f"{name}.log", "a"),
        )

    def __enter__(self) -> "BenchFederation":
        for name in self.names:
            self.start_node(name)
        return self

    def start_dealer(self) -> None:
        """A ``primia dealer`` for one run (a hub that masks without a dealer would refuse it)."""
        self.procs["dealer"] = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dealer", "--key", str(self.keys / "dealer.key"), "--hub", self.hub,
             "--hub-key", str(self.keys / "hub.pub"), "--max-message-mib", "4096", "--reconnect-max-s", "0.2",
             "--once"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
            stderr=open(self.work / "dealer.log", "a"),
        )

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._tmp.cleanup()

    def run(self, *, secure: bool, rounds: int = 3, ring_bits: int = 32, neighbours: int = 0,
            masking: str = "pairwise", lose_after_upload: tuple[int, str] | None = None) -> dict[str, Any]:
        """One hub run; returns per-round seconds, mean bytes per node (upload and download) and CPU seconds per
        round of each node process and of the dealer.

        ``neighbours``: ``aggregation.neighbours`` (0: every node masks with every other); ``masking``:
        ``aggregation.masking`` ('pairwise' or 'dealer'); ``lose_after_upload`` = (round, node): that node is
        killed once its upload of that round is in (when the hub asks the survivors to sign), then restarted.
        """
        from fl.config import parse_config
        from fl.hub import run_hub

        out = self.work / f"run-{time.monotonic_ns()}"
        raw = {
            "run": {"name": "bench", "rounds": rounds, "evaluate_every": 0, "output_dir": str(out)},
            "federation": {
                "listen": f"127.0.0.1:{self.port}",
                "key_file": str(self.keys / "hub.key"),
                "nodes": [{"name": n, "public_key_file": str(self.keys / f"{n}.pub")} for n in self.names],
                "max_message_mib": 4096,
                "start_grace_s": 60,
                "connect_timeout_s": 600,
            },
            "model": {"name": "resnet18"},
            "data": {"input_size": 32},
            "aggregation": {"secure": secure, "ring_bits": ring_bits, "neighbours": neighbours},
        }
        if secure and masking == "dealer":
            raw["aggregation"]["masking"] = "dealer"
            raw["federation"]["dealer_public_key_file"] = str(self.keys / "dealer.pub")
            self.start_dealer()
        cpu: list[dict[str, float]] = []
        killed: list[str] = []

        def observe(event: str, info: dict[str, Any]) -> None:
            if event == "send" and info["kind"] == "train" and info["node"] == self.names[0]:
                cpu.append({n: _cpu_seconds(p.pid) for n, p in self.procs.items() if p.poll() is None})
            if (lose_after_upload and event == "send" and info["kind"] == "sa_survivors" and not killed
                    and (info["round"], info["node"]) == lose_after_upload):
                killed.append(info["node"])
                self.procs[info["node"]].kill()

        report = run_hub(parse_config(raw), progress=False, observer=observe)
        cpu.append({n: _cpu_seconds(p.pid) for n, p in self.procs.items() if p.poll() is None})
        dealer = self.procs.pop("dealer", None)
        if dealer is not None:
            dealer.wait(60)
        for name in killed:
            self.procs[name].wait()
            self.start_node(name)
        per_round = report["rounds"]
        cpu_rounds = [{n: after[n] - before[n] for n in before if n in after} for before, after in zip(cpu, cpu[1:])]
        return {
            "nodes": len(self.names),
            "secure": secure,
            "seconds": [r["seconds"]["train_and_aggregate"] for r in per_round],
            "included": [r["included"] for r in per_round],
            "upload_bytes": [statistics.mean(b["from_node"] for b in r["bytes"].values()) for r in per_round],
            "download_bytes": [statistics.mean(b["to_node"] for b in r["bytes"].values()) for r in per_round],
            "dealer_bytes": [r.get("dealer_bytes", {}).get("from_dealer", 0) for r in per_round],
            "node_cpu_s": [statistics.median(v for n, v in c.items() if n != "dealer") for c in cpu_rounds],
            "dealer_cpu_s": [c.get("dealer", 0.0) for c in cpu_rounds],
        }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- in-process pieces ---------------------------------------------------------------------------


def _updates(nodes: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"n{i:02d}": rng.normal(scale=1e-3, size=size).astype(np.float32) for i in range(nodes)}


class _TimedRound:
    """One round of secure aggregation in this process, with the CPU time of each party's security work.

    Every step of a node (keys and signatures, Shamir shares, mask expansion, encode-and-mask, the survivor
    signature, checking the others' and revealing) and of the hub (checking signatures, relaying, opening
    seeds from shares, removing the masks) is timed with ``time.process_time`` (the steps run one after another, so each delta is that step's CPU, worker threads included).
    """

    def __init__(self, nodes: int, size: int, *, neighbours: int = 0, masking: str = "pairwise",
                 lose_after_upload: str | None = None):
        from fl.demo import make_keys
        from fl.identity import Directory, load_private_key, load_public_key, sign_statement
        from fl.strategy import NodeContext, RoundStart, Weighted

        self.tmp = tempfile.TemporaryDirectory(prefix="primia-bench-")
        names = [f"n{i:02d}" for i in range(nodes)]
        keys = make_keys(Path(self.tmp.name), tuple(names), dealer=True)
        directory = Directory({n: load_public_key(keys / f"{n}.pub", what=n) for n in names})
        dealer_pub = load_public_key(keys / "dealer.pub", what="dealer")
        self.updates = _updates(nodes, size)
        self.lose = lose_after_upload
        self.node_cpu = {n: 0.0 for n in names}
        self.hub_cpu = 0.0
        self.dealer_cpu = 0.0
        if masking == "dealer":
            from fl.dealer import DealerSession
            from fl.transport import run_token
            from fl.dealer_masking import DealerAggregator, DealerMasker

            base: Any = DealerAggregator(frac_bits=16, ring_bits=32, directory=directory, dealer_key=dealer_pub)
            self.dealer = DealerSession(run_token=run_token("bench"), key=load_private_key(keys / "dealer.key", what="d"),
                                        directory=directory)
        else:
            from fl.pairwise import PairwiseAggregator, PairwiseMasker

            base = PairwiseAggregator(frac_bits=16, ring_bits=32, neighbours=neighbours, directory=directory)
            self.dealer = None
        self.agg = Weighted(base, "samples")
        self.maskers = {}
        for n in names:
            private = load_private_key(keys / f"{n}.key", what=n)
            ctx = NodeContext(n, "bench", lambda *f, k=private: sign_statement(k, *f), directory, dealer_pub)
            if masking == "dealer":
                self.maskers[n] = DealerMasker(ctx, size=size, frac_bits=16, ring_bits=32)
            else:
                self.maskers[n] = PairwiseMasker(ctx, size=size, frac_bits=16, ring_bits=32, neighbours=neighbours)
            self.maskers[n].start_round(1)
        self.start = RoundStart(1, tuple(names), {n: 100 for n in names}, size, b"bench-round-context-0001", "bench",
                                2)
        self.uploaded: set[str] = set()
        self.lost: set[str] = set()

    def _hub(self, call: Any) -> list[Any]:
        t0 = time.process_time()
        try:
            return list(call())
        finally:
            self.hub_cpu += time.process_time() - t0

    def run(self) -> None:
        from collections import deque

        from fl.strategy import DEALER_LINK

        queue = deque(self._hub(lambda: self.agg.open_round(self.start)))
        while queue:
            send = queue.popleft()
            peer = send.peer
            if peer in self.lost:
                continue
            if peer == DEALER_LINK:
                t0 = time.process_time()
                replies = []
                for action in self.dealer.receive(send.message):
                    replies += [action.message] if hasattr(action, "message") else action.then(action.call())
                self.dealer_cpu += time.process_time() - t0
                for reply in replies:
                    queue.extend(self._hub(lambda r=reply: self.agg.receive(DEALER_LINK, r)))
                continue
            masker = self.maskers[peer]
            t0 = time.process_time()
            replies, slow = masker.receive(send.message)
            if slow is not None:
                slow()
            upload = None
            if masker.ready() and peer not in self.uploaded:
                upload = masker.mask(self.updates[peer], self.agg.train_fields(peer))
                self.uploaded.add(peer)
            self.node_cpu[peer] += time.process_time() - t0
            for reply in replies:
                queue.extend(self._hub(lambda r=reply: self.agg.receive(peer, r)))
            if upload is not None:
                queue.extend(self._hub(lambda: self.agg.add_update(peer, upload)))
                if peer == self.lose:
                    self.lost.add(peer)
                    queue.extend(self._hub(lambda: self.agg.lost(peer, "killed after its upload")))
        t0 = time.process_time()
        self.result = self.agg.result()
        self.hub_cpu += time.process_time() - t0
        self.tmp.cleanup()


def secure_pieces(nodes: int, size: int = RESNET18_VALUES, neighbours: int = 0, masking: str = "pairwise",
                  lose_after_upload: str | None = None) -> dict[str, float]:
    """CPU seconds of one secure round's security work, in one process with no network: per node (median),
    at the hub and at the dealer.  With ``lose_after_upload``, that node leaves right after uploading and the
    hub recovers its mask from its partners' shares."""
    timed = _TimedRound(nodes, size, neighbours=neighbours, masking=masking, lose_after_upload=lose_after_upload)
    timed.run()
    return {"node_cpu_s": statistics.median(timed.node_cpu.values()), "hub_cpu_s": timed.hub_cpu,
            "dealer_cpu_s": timed.dealer_cpu, "included": len(timed.result.included)}


def plain_sum(nodes: int, size: int = RESNET18_VALUES) -> float:
    """Seconds for the hub's weighted sum of ``nodes`` float32 updates."""
    updates = _updates(nodes, size)
    t0 = time.perf_counter()
    acc = WeightedSum()
    for u in updates.values():
        acc.add(u, 1.0 / nodes)
    acc.mean()
    return time.perf_counter() - t0


def test_pairwise_round_security_work_3_nodes(benchmark):
    benchmark.pedantic(lambda: secure_pieces(3), rounds=2, iterations=1)


def test_pairwise_round_with_a_node_lost_after_upload_4_nodes(benchmark):
    benchmark.pedantic(lambda: secure_pieces(4, neighbours=2, lose_after_upload="n02"), rounds=2, iterations=1)


def test_dealer_masked_round_security_work_10_nodes(benchmark):
    benchmark.pedantic(lambda: secure_pieces(10, masking="dealer"), rounds=2, iterations=1)


def test_plain_weighted_sum_3_nodes(benchmark):
    benchmark.pedantic(lambda: plain_sum(3), rounds=3, iterations=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-node", nargs=4, metavar=("NAME", "HUB", "KEYS", "CLASSES"))
    args = parser.parse_args()
    if args.serve_node:
        name, hub, keys, classes = args.serve_node
        serve_node(name, hub, keys, int(classes))
