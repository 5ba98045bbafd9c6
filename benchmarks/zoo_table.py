"""Print the torchvision zoo table: which classifiers convert, and their encrypted error, time, rounds and bytes.

    python benchmarks/zoo_table.py                 # the 22 architectures of issue 13
    python benchmarks/zoo_table.py --all           # every classifier torchvision lists
    python benchmarks/zoo_table.py --models vit_b_16,swin_t --repeat 3

Each model: torchvision's architecture with ``weights=None`` (seeded), 10
classes, BatchNorm statistics as after training and a random head where
torchvision initialises it to zero (tests/bridge_models.py), one image at a
small input (32x32; 64 for AlexNet, 75 for Inception v3, 224 for MaxViT; ViT built
for 32x32 images), run by :func:`bridge.infer_local`: three processes on 127.0.0.1 (data
owner, model server, dealer), fixed point sized from the batch.  Reported:

- converts: yes, or the first thing refused;
- error: max |encrypted - torch| over the logits, divided by the largest |logit|
  (torch in float64; the documented tolerance is 1e-2), and whether the
  argmax agrees;
- seconds: the parties' wall time (median over ``--repeat``; the range when
  repeated), from connection to logits (weight masking included);
- rounds and bytes (busiest computing party, dealer traffic included): exact,
  independent of load; the setup part (weights masked once) in brackets;
- act/cmp: activation fractional bits and comparison-domain bits used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

if __name__ != "__mp_main__":
    # Party processes (spawn) import this file again as __mp_main__: they need neither torch nor torchvision here.
    import torch
    import torchvision

    import bridge
    from mpc.errors import ConfigError, PrimiaError, UnsupportedModelError
    from tests.bridge_models import randomize_zero_heads, realistic

#: the 22 architectures issue 13 counts: 12 that converted before it, 10 that did not
ISSUE_ZOO = (
    "alexnet", "vgg11", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
    "inception_v3", "mobilenet_v2", "mnasnet0_5", "regnet_x_400mf",
    "squeezenet1_0", "squeezenet1_1", "googlenet", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16", "swin_t",
)
_SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}
# Inception v3's legacy initialisation (truncated normal, std 0.1) makes activations reach 1e8 through its 94
# convolutions at random BatchNorm statistics; torch's default initialisation keeps them near 1.
_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
          "inception_v3": {"aux_logits": False, "init_weights": False}}
#: larger than this many parameters: listed, not run (each party holds several copies of the weights)
MAX_PARAMS = 150_000_000


def build(name: str, size: int) -> "torch.nn.Module":
    torch.manual_seed(0)
    extra = dict(_EXTRA.get(name, {}))
    if name.startswith("vit_"):
        extra["image_size"] = size
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
    return randomize_zero_heads(realistic(model.eval()))


def run(name: str, repeat: int) -> dict:
    size = _SIZES.get(name, 32)
    row: dict = {"model": name, "size": size}
    try:
        model = build(name, size)
    except Exception as exc:  # noqa: BLE001 - an architecture that cannot be built at this size
        return {**row, "converts": f"not built at {size}x{size}: {str(exc).splitlines()[0][:80]}"}
    row["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        bridge.convert(model, x.shape[1:])
    except ConfigError as exc:
        return {**row, "converts": f"does not run at {size}x{size}: {str(exc).splitlines()[0][:80]}"}
    except UnsupportedModelError as exc:
        first = exc.blockers[0] if getattr(exc, "blockers", None) else None
        reason = f"{first.what}: {first.why}" if first else str(exc).splitlines()[0]
        return {**row, "converts": f"no ({reason[:90]})"}
    if row["params"] > MAX_PARAMS:
        return {**row, "converts": "yes", "skipped": f"{row['params'] / 1e6:.0f} M parameters"}
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    model.float()
    try:
        runs = [bridge.infer_local(model, x) for _ in range(repeat)]
    except PrimiaError as exc:  # refused (e.g. the ring check): reported, and the table goes on
        return {**row, "converts": "yes", "skipped": f"refused: {str(exc).splitlines()[0][:120]}"}
    result = runs[0]
    seconds = [r.stats["seconds"] for r in runs]
    return {
        **row, "converts": "yes",
        "error": float(np.abs(result.logits - ref).max() / np.abs(ref).max()),
        "argmax": bool((result.logits.argmax(1) == ref.argmax(1)).all()),
        "seconds": statistics.median(seconds), "seconds_range": (min(seconds), max(seconds)),
        "rounds": result.stats["rounds"], "setup_rounds": result.stats["setup_rounds"],
        "bytes": result.stats["bytes"], "setup_bytes": result.stats["setup_bytes"],
        "act_bits": result.stats["act_bits"], "comparison_bits": result.stats["comparison_bits"],
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def row_text(r: dict) -> str:
    head = f"| {r['model']} | {r['size']} | {r.get('params', 0) / 1e6:.1f} | {r['converts']} "
    if "error" not in r:
        return head + f"| {r.get('skipped', '')} | | | | | |"
    lo, hi = r["seconds_range"]
    spread = f" ({lo:.1f}-{hi:.1f})" if hi > lo else ""
    return (head + f"| {r['error']:.1e} | {'yes' if r['argmax'] else 'NO'} | {r['seconds']:.1f}{spread} "
            f"| {r['rounds']} ({r['setup_rounds']}) | {_mb(r['bytes'])} ({_mb(r['setup_bytes'])}) "
            f"| {r['act_bits']}/{r['comparison_bits']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="every classifier torchvision lists")
    parser.add_argument("--models", help="comma-separated names instead")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    elif args.all:
        names = sorted(torchvision.models.list_models(module=torchvision.models))
    else:
        names = list(ISSUE_ZOO)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} cores; "
          f"one image, 10 classes, bridge.infer_local (3 processes on 127.0.0.1)\n", flush=True)
    print("| model | input | M params | converts | error / largest logit | argmax | seconds | rounds (setup) "
          "| MB busiest party (setup) | act/cmp bits |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    start = time.perf_counter()
    rows = []
    for name in names:
        rows.append(run(name, args.repeat))
        print(row_text(rows[-1]), flush=True)
    ran = [r for r in rows if "error" in r]
    converted = sum(r["converts"] == "yes" for r in rows)
    within = sum(r["error"] <= 1e-2 and r["argmax"] for r in ran)
    print(f"\n{converted} of {len(rows)} convert; {within} of {len(ran)} run within 1e-2 of the largest logit with "
          f"the same argmax; {time.perf_counter() - start:.0f} s in all.")


if __name__ == "__main__":
    main()
