"""``primia demo``: a whole federation on this machine, from real files, in one command.

1. Writes scikit-learn's bundled digits (1,797 grayscale 8x8 images, nothing
   downloaded) as PNG files: 20 % held out for testing, the rest split
   unevenly (50 / 30 / 20 %) across three nodes' class folders.
2. Makes a key pair for the hub and each node (``primia keygen``) and writes a
   ``federation.toml`` (secure aggregation on).
3. Starts the hub here, listening on 127.0.0.1 (a free port), then three
   ``primia node`` processes that connect out to it, as hospitals would.
4. Federated training with secure aggregation, metrics per round,
   checkpoints, the report and plots.
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
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["NODE_NAMES", "NODE_FRACTIONS", "load_digits", "write_digits", "make_keys", "start_hub", "wait_for_hub",
           "start_nodes", "start_dealer", "stop_nodes", "write_config", "run_demo"]

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


def make_keys(keys: Path, names: tuple[str, ...], *, dealer: bool = False) -> Path:
    """Key pairs for the hub, every node (and the dealer) in ``keys``, as ``primia keygen`` makes them."""
    from .identity import generate_keys

    for name in ("hub", *names, *(["dealer"] if dealer else [])):
        generate_keys(name, keys, force=True)
    return keys


def start_hub(config: Path, *, resume: bool = False, progress: bool | None = False,
              observer: Any = None) -> dict[str, Any]:
    """The hub of ``config`` in a thread of this process; returns once it listens: {"thread", "port", "result"}
    (``result`` gets "report" or "error" when the run ends)."""
    from .config import load_config
    from .hub import run_hub

    cfg = load_config(config)
    listening = threading.Event()
    started: dict[str, Any] = {"result": {}}

    def observe(event: str, info: dict[str, Any]) -> None:
        if event == "listening":
            started["port"] = info["port"]
            listening.set()
        if observer is not None:
            observer(event, info)

    def run() -> None:
        try:
            started["result"]["report"] = run_hub(cfg, resume=resume, progress=progress, observer=observe)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            started["result"]["error"] = exc
        finally:
            listening.set()

    started["thread"] = thread = threading.Thread(target=run, name="primia-hub", daemon=True)
    thread.start()
    listening.wait()
    if "error" in started["result"]:
        raise started["result"]["error"]
    return started


def wait_for_hub(hub: dict[str, Any]) -> dict[str, Any]:
    """The report of a hub started with :func:`start_hub`, once its run ends (its error, re-raised)."""
    while hub["thread"].is_alive():
        hub["thread"].join(0.5)
    if "error" in hub["result"]:
        raise hub["result"]["error"]
    return hub["result"]["report"]


def start_nodes(out: Path, data: Path, names: tuple[str, ...], *, port: int, keys: Path, threads: int = 1,
                once: bool = True) -> dict[str, dict[str, Any]]:
    """One ``primia node`` process per name, dialing the hub on 127.0.0.1:``port``; returns name -> process, log.

    With ``once`` each node exits when the run ends.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    return {
        name: _spawn(out, name, ["node", "--data", str(data / name), "--name", name, "--key", str(keys / f"{name}.key"),
                                 *_hub_args(port, keys), "--threads", str(threads), *(["--once"] if once else [])],
                     env)
        for name in names
    }


def start_dealer(out: Path, *, port: int, keys: Path) -> dict[str, Any]:
    """A ``primia dealer`` process dialing the hub on 127.0.0.1:``port``; it exits when the run ends."""
    return _spawn(out, "dealer", ["dealer", "--key", str(keys / "dealer.key"), *_hub_args(port, keys), "--once"],
                  dict(os.environ))


def _hub_args(port: int, keys: Path) -> list[str]:
    return ["--hub", f"ws://127.0.0.1:{port}", "--hub-key", str(keys / "hub.pub")]


def _spawn(out: Path, name: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``primia <args>`` with its log under logs/."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "cli.main", *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=_project_root())
    return {"process": proc, "log": log}


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


def write_config(path: Path, names: tuple[str, ...], *, keys: Path, output_dir: Path, rounds: int = 10,
                 secure: bool = True, seed: int = 0, extra: str = "", dealer: bool = False,
                 listen: str = "127.0.0.1:0", federation: str = "") -> Path:
    """The demo's federation.toml (also a starting point for real federations); with ``dealer`` secure
    aggregation uses dealer masking.  Key paths are written relative to the config's folder."""
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        p = p.resolve()
        try:
            return str(p.relative_to(base))
        except ValueError:
            return str(p)

    node_tables = "\n".join(
        f'[[federation.nodes]]\nname = "{name}"\npublic_key_file = "{rel(keys / f"{name}.pub")}"\n'
        for name in names
    )
    dealer_key = f'dealer_public_key_file = "{rel(keys / "dealer.pub")}"\n' if dealer else ""
    text = f"""# primia federation: the digits demo (see docs/federation.md for every key)
[run]
name = "digits-demo"
rounds = {rounds}
seed = {seed}
output_dir = "{rel(output_dir)}"

[federation]
listen = "{listen}"           # the nodes connect here; port 0 picks a free one
key_file = "{rel(keys / "hub.key")}"
{dealer_key}min_nodes = 2
on_dropout = "continue"
connect_timeout_s = 120
start_grace_s = 20
{federation}
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
    dealer = masking == "dealer"
    keys = make_keys(out / "keys", NODE_NAMES, dealer=dealer)
    config = write_config(out / "federation.toml", NODE_NAMES, keys=keys, output_dir=out / "run", rounds=rounds,
                          dealer=dealer)
    print(f"primia demo: key pairs in {keys}; config {config}")
    hub = start_hub(config, progress=None)
    print(f"primia demo: the hub listens on 127.0.0.1:{hub['port']}; starting 3 node processes that connect to it")
    nodes = start_nodes(out, data, NODE_NAMES, port=hub["port"], keys=keys)
    try:
        if dealer:
            print("primia demo: starting the dealer (crypto provider) for dealer-masked aggregation ...")
            nodes["dealer"] = start_dealer(out, port=hub["port"], keys=keys)
        print(f"primia demo: training with secure aggregation ({masking} masks, {rounds} rounds)")
        report = wait_for_hub(hub)
    finally:
        stop_nodes(nodes)
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
