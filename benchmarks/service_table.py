"""Print the long-lived inference service's table: sessions one after another and at once.

    python benchmarks/service_table.py [--size 64] [--sessions 4] [--concurrent 2]

Starts a dealer and a model server as ``primia infer --role ...`` processes on
127.0.0.1 (torchvision's ResNet-18, 2 classes, random weights with non-trivial
BatchNorm statistics, calibrated on 8 generated images), then runs data-owner
sessions from this process (``bridge.service.query_model_server``, one image
each): ``--sessions`` one after another, then ``--concurrent`` at once.
Timing starts once both servers are up (weights loaded, model converted and
calibrated).  Reported: per session, the wall time from asking for a session to holding the
result (session set-up, fresh masked weights, the image), its time in the
parties, rounds and bytes at the data owner (exact); for the concurrent ones,
the wall time until all are done.  Every result is checked against plaintext
torch (same argmax, error within 1e-2 of the largest logit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from bridge.images import load_batch  # noqa: E402
from bridge.models import card_from_state  # noqa: E402
from bridge.service import query_model_server  # noqa: E402
from mpc.net.config import load_config  # noqa: E402


def resnet18() -> torch.nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def images(folder: Path, seed: int, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="primia-service-"))
    model = resnet18()
    torch.save(model.state_dict(), tmp / "model.pt")
    images(tmp / "validation", 1, 8, args.size)
    (tmp / "federation.key").write_text(os.urandom(32).hex())
    os.chmod(tmp / "federation.key", 0o600)
    lines = ['session = "bench"', 'secret_file = "federation.key"', "[timeouts]", "recv_s = 600"]
    for i, port in enumerate(free_ports(3)):
        lines += ["[[party]]", f"id = {i}", 'host = "127.0.0.1"', f"port = {port}"] + (
            ['role = "dealer"'] if i == 2 else [])
    (tmp / "parties.toml").write_text("\n".join(lines) + "\n")
    model_args = ["--weights", str(tmp / "model.pt"), "--model", "resnet18", "--input-size", str(args.size),
                  "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--calibrate", str(tmp / "validation"),
                  "--max-sessions", str(max(args.concurrent, 1))]
    logs = {role: open(tmp / f"{role}.log", "w") for role in ("dealer", "model-server")}
    servers = {
        role: subprocess.Popen([sys.executable, "-m", "cli.main", "infer", "--role", role, "--network",
                                str(tmp / "parties.toml"), *(model_args if role == "model-server" else [])],
                               cwd=ROOT, stdout=logs[role], stderr=subprocess.STDOUT)
        for role in logs
    }
    config = load_config(tmp / "parties.toml")
    state = model.state_dict()
    card = card_from_state("resnet18", state, None, input_size=args.size, mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225))

    def session(k: int) -> dict:
        files = images(tmp / f"owner{k}", 100 + k, 1, args.size)
        settings = {"images": [[str(files[0]), files[0].name]], "out": str(tmp / f"out{k}"), "batch_size": 1,
                    "progress": False}
        start = time.perf_counter()
        summary = query_model_server(config, settings, port=0)
        wall = time.perf_counter() - start
        record = json.loads((tmp / f"out{k}" / f"{files[0].name}.json").read_text())
        with torch.no_grad():
            ref = model(torch.from_numpy(load_batch(files, card))).double().numpy()[0]
        error = float(np.abs(np.array(record["logits"]) - ref).max() / np.abs(ref).max())
        assert record["class_index"] == int(ref.argmax()) and error <= 1e-2, (record, ref)
        total = summary["total"]
        return {"wall": wall, "seconds": summary["seconds"], "rounds": total["rounds"], "error": error,
                "bytes": total["bytes_sent"] + total["bytes_received"] + total["dealer_bytes"]
                + total["dealer_bytes_sent"]}

    try:
        deadline = time.monotonic() + 300
        while not all("serving on" in (tmp / f"{role}.log").read_text() for role in servers):
            assert time.monotonic() < deadline and all(p.poll() is None for p in servers.values()), "a server failed"
            time.sleep(0.2)
        sequential = [session(k) for k in range(args.sessions)]
        results: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, session(k)))
                   for k in range(args.sessions, args.sessions + args.concurrent)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_wall = time.perf_counter() - start
        assert len(results) == args.concurrent, "a concurrent session failed (see the server logs)"
    finally:
        for proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        codes = {role: proc.wait(60) for role, proc in servers.items()}
    print(f"ResNet-18, 3x{args.size}x{args.size}, one image per session, model server + dealer long-lived "
          f"(exit codes {codes})")
    print("| sessions | wall per session (s) | in the parties (s) | rounds | bytes at the data owner | max error |")
    print("|---|---|---|---|---|---|")
    for name, rows in (("one after another", sequential), ("at once", list(results.values()))):
        print(f"| {len(rows)} {name} | {spread([r['wall'] for r in rows])} | {spread([r['seconds'] for r in rows])} "
              f"| {rows[0]['rounds']} | {rows[0]['bytes'] / 1e6:.1f} MB | {max(r['error'] for r in rows):.1e} |")
    print(f"{args.concurrent} sessions at once: all done in {concurrent_wall:.2f} s "
          f"(one after another: {sum(r['wall'] for r in sequential[:args.concurrent]):.2f} s)")


if __name__ == "__main__":
    main()
