"""``primia demo``: a whole federation on this machine, from real files, in one command.

1. Writes scikit-learn's bundled digits (1,797 grayscale 8x8 images, nothing
   downloaded) as PNG files: 20 % held out for testing, the rest split
   unevenly (50 / 30 / 20 %) across three nodes' class folders.
2. Writes a secret per node and a ``federation.toml`` (secure aggregation on).
3. Starts three ``primia node`` processes on 127.0.0.1 (free ports).
4. Runs the hub here: federated training with secure aggregation, metrics per
   round, checkpoints, the report and plots.
5. Tests the final model on the held-out images, then classifies a few of
   them by encrypted inference (:func:`bridge.infer_local`) and compares with
   the plaintext predictions.

Everything lands in one folder (default ``./primia-demo``), which the demo
replaces on every run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["NODE_NAMES", "NODE_FRACTIONS", "load_digits", "write_digits", "start_nodes", "start_dealer", "stop_nodes", "write_config", "run_demo"]

log = logging.getLogger("primia.demo")

NODE_NAMES = ("alpha", "beta", "gamma")
NODE_FRACTIONS = (0.5, 0.3, 0.2)
HOLDOUT_FRACTION = 0.2
ENCRYPTED_IMAGES = 8
# Digits are 0..16 gray levels; PNGs store 0..255.
_LEVELS = 16


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as uint8 images (N, 8, 8) in 0..255 and labels (N,).

    Read straight from the CSV file scikit-learn ships (what ``sklearn.datasets.load_digits``
    reads), without importing scikit-learn, which costs seconds.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-learn is not installed; install primia's dependencies (pip install -e .)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / _LEVELS)).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def write_digits(root: Path, *, names: tuple[str, ...] = NODE_NAMES, fractions: tuple[float, ...] = NODE_FRACTIONS,
                 holdout: float = HOLDOUT_FRACTION, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """Write the digits as PNG class folders: ``root/<node>/<digit>/*.png`` and ``root/holdout/<digit>/*.png``.

    Returns:
        counts per node and the held-out images as arrays (uint8 (N, 8, 8), labels (N,)).
    """
    images, labels = load_digits()
    order = np.random.default_rng(seed).permutation(len(labels))[:limit]
    n_hold = int(round(len(order) * holdout))
    hold, rest = order[:n_hold], order[n_hold:]
    cuts = np.cumsum([int(round(f * len(rest))) for f in fractions[:-1]])
    parts = dict(zip(names, np.split(rest, cuts)))
    parts["holdout"] = hold
    for part, idx in parts.items():
        for i in idx:
            folder = root / part / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"digit-{i:04d}.png")
    return {
        "counts": {name: int(len(parts[name])) for name in names},
        "holdout_images": images[hold],
        "holdout_labels": labels[hold],
    }


def start_nodes(out: Path, data: Path, names: tuple[str, ...], *, threads: int = 1,
                once: bool = True) -> dict[str, dict[str, Any]]:
    """Start one ``primia node`` process per name on a free port; returns name -> process, port, token file.

    With ``once`` each node exits when its first hub connection ends.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    nodes = {
        name: _spawn(out, name, ["node", "--data", str(data / name), "--name", name, "--threads", str(threads),
                                 *(["--once"] if once else [])], env)
        for name in names
    }
    deadline = time.monotonic() + 180
    for name, node in nodes.items():
        _wait_for_port(f"node {name}", node, deadline)
    return nodes


def start_dealer(out: Path) -> dict[str, Any]:
    """Start a ``primia dealer`` process on a free port that exits after one hub connection."""
    dealer = _spawn(out, "dealer", ["dealer", "--once"], dict(os.environ))
    _wait_for_port("the dealer", dealer, time.monotonic() + 120)
    return dealer


def _spawn(out: Path, name: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``primia <args>`` with a fresh secret in secrets/<name>.key, a port file and a log under logs/."""
    (out / "secrets").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    token_file = out / "secrets" / f"{name}.key"
    token_file.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    port_file = out / "logs" / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = out / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "cli.main", *args, "--port", "0", "--port-file", str(port_file),
           "--token-file", str(token_file)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=_project_root())
    return {"process": proc, "port_file": port_file, "token_file": token_file, "log": log}


def _wait_for_port(what: str, started: dict[str, Any], deadline: float) -> None:
    while not started["port_file"].exists():
        if started["process"].poll() is not None:
            raise RuntimeError(f"{what} exited (code {started['process'].returncode}); see {started['log']}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in time; see {started['log']}")
        time.sleep(0.1)
    started["port"] = json.loads(started["port_file"].read_text())["port"]


def stop_nodes(nodes: dict[str, dict[str, Any]], *, timeout_s: float = 20.0) -> None:
    """Wait for node (and dealer) processes to exit (they stop after the run with ``--once``); terminate stragglers."""
    deadline = time.monotonic() + timeout_s
    for node in nodes.values():
        proc = node["process"]
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_config(path: Path, nodes: dict[str, dict[str, Any]], *, output_dir: Path, rounds: int = 10,
                 secure: bool = True, seed: int = 0, extra: str = "", dealer: dict[str, Any] | None = None) -> Path:
    """The demo's federation.toml (also a starting point for real federations); with ``dealer`` (from
    :func:`start_dealer`) secure aggregation uses dealer masking."""
    node_tables = "\n".join(
        f'[[federation.nodes]]\nname = "{name}"\naddress = "ws://127.0.0.1:{node["port"]}"\n'
        f'token_file = "{node["token_file"].resolve()}"\n'
        for name, node in nodes.items()
    )
    dealer_keys = "" if dealer is None else (
        f'dealer_address = "ws://127.0.0.1:{dealer["port"]}"\ndealer_token_file = "{dealer["token_file"].resolve()}"\n'
    )
    text = f"""# primia federation: the digits demo (see docs/federation.md for every key)
[run]
name = "digits-demo"
rounds = {rounds}
seed = {seed}
output_dir = "{output_dir.resolve()}"

[federation]
min_nodes = 2
on_dropout = "continue"
connect_timeout_s = 60
{dealer_keys}
[model]
name = "simple_cnn"
width = 16

[data]
input_size = 8
val_fraction = 0.2
mean = 0.3
std = 0.4

[training]
local_epochs = 1
batch_size = 32
optimizer = "sgd"
lr = 0.05
momentum = 0.9
lr_schedule = "cosine"
end_lr = 0.005

[aggregation]
weighting = "samples"
secure = {str(secure).lower()}
frac_bits = 16
ring_bits = 32
masking = "{"dealer" if dealer else "pairwise"}"
{extra}
{node_tables}"""
    path.write_text(text, encoding="utf-8")
    return path


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def run_demo(out: str | Path = "primia-demo", *, rounds: int = 10, masking: str = "pairwise") -> int:
    """The whole demo (see the module docstring); returns an exit code.  ``masking = "dealer"`` adds a
    ``primia dealer`` process and aggregates with dealer masking."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    print(f"primia demo: writing the digits as PNG files under {data}")
    split = write_digits(data)
    print("  " + ", ".join(f"{n}: {c} images" for n, c in split["counts"].items())
          + f", held out: {len(split['holdout_labels'])}")
    print("primia demo: starting 3 node processes on 127.0.0.1 ...")
    nodes = start_nodes(out, data, NODE_NAMES)
    dealer = None
    try:
        if masking == "dealer":
            print("primia demo: starting the dealer (crypto provider) for dealer-masked aggregation ...")
            dealer = start_dealer(out)
        config = write_config(out / "federation.toml", nodes, output_dir=out / "run", rounds=rounds, dealer=dealer)
        print(f"primia demo: training with secure aggregation ({masking} masks, {rounds} rounds), config {config}")
        from .config import load_config
        from .hub import run_hub

        report = run_hub(load_config(config), progress=None)
    finally:
        stop_nodes({**nodes, **({"dealer": dealer} if dealer else {})})
    final = report["final"]
    print("\nfinal validation metrics (pooled over the nodes' local validation splits):")
    _print_metrics("pooled", final["pooled"])
    for name, metrics in final["nodes"].items():
        _print_metrics(name, metrics)

    model = _load_final_model(report)
    x = _normalise(split["holdout_images"], report["config"]["data"])
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    accuracy = float((logits.argmax(1) == split["holdout_labels"]).mean())
    print(f"\nheld-out test ({len(x)} images never seen by any node): accuracy {accuracy:.4f}")

    # --- encrypted inference hook -------------------------------------------------------------
    # The model owner (this process) and the data owner keep their inputs private; the bridge runs
    # the trained model on secret-shared images and only the data owner sees the logits.
    encrypted = _encrypted_inference(model, x[:ENCRYPTED_IMAGES], logits[:ENCRYPTED_IMAGES])
    # -------------------------------------------------------------------------------------------

    summary = {"holdout_accuracy": accuracy, "final": final, "encrypted_inference": encrypted,
               "seconds": time.perf_counter() - t0}
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(f"\nprimia demo: done in {time.perf_counter() - t0:.0f} s.  Outputs in {out}:")
    for what, path in report["outputs"].items():
        print(f"  {what}: {path}")
    print(f"  config: {out / 'federation.toml'}\n  node logs: {out / 'logs'}\n  summary: {out / 'demo-summary.json'}")
    return 0


def _load_final_model(report: dict[str, Any]) -> Any:
    import torch

    from .models import build_model

    cfg = report["config"]
    model = build_model(cfg["model"]["name"], num_classes=len(report["classes"]), in_channels=1,
                        input_size=cfg["data"]["input_size"], width=cfg["model"]["width"],
                        pooling=cfg["model"]["pooling"])
    model.load_state_dict(torch.load(report["outputs"]["model"], map_location="cpu", weights_only=True))
    return model.eval()


def _normalise(images: np.ndarray, data_cfg: dict[str, Any]) -> np.ndarray:
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - data_cfg["mean"][0]) / data_cfg["std"][0]).astype(np.float32)


def _encrypted_inference(model: Any, x: np.ndarray, plain_logits: np.ndarray) -> dict[str, Any] | None:
    try:
        from bridge import infer_local
    except ImportError:
        print("\nencrypted inference: not available in this build (bridge.infer_local missing)")
        return None
    print(f"\nencrypted inference of {len(x)} held-out images (3 processes: data owner, model owner, dealer) ...")
    result = infer_local(model, x)
    agree = float((result.logits.argmax(1) == plain_logits.argmax(1)).mean())
    max_err = float(np.abs(result.logits - plain_logits).max())
    stats = {k: result.stats.get(k) for k in ("seconds", "rounds", "bytes")}
    print(f"  predictions agree with plaintext on {agree * 100:.0f}% of images; max |logit error| {max_err:.4f}")
    print(f"  cost: {stats['seconds']:.2f} s, {stats['rounds']} rounds, {stats['bytes'] / 1e6:.2f} MB at the busiest party")
    return {"images": len(x), "agreement": agree, "max_logit_error": max_err, **stats}


def _print_metrics(name: str, m: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    sens = [v["sensitivity"] for v in m["per_class"].values() if v["sensitivity"] is not None]
    spec = [v["specificity"] for v in m["per_class"].values() if v["specificity"] is not None]
    print(f"  {name:>7}: accuracy {f(m['accuracy'])}  loss {f(m['loss'])}  MCC {f(m['mcc'])}  "
          f"ROC-AUC {f(m['roc_auc_macro'])}  mean sensitivity {f(float(np.mean(sens)) if sens else None)}  "
          f"mean specificity {f(float(np.mean(spec)) if spec else None)}  (n={m['samples']})")
