"""Print the encrypted ResNet-18 table: primia against plaintext torch (and CrypTen), measured in one run.

    python benchmarks/resnet18_table.py [--size 224] [--repeat 1] [--crypten CRYPTEN_ENV/bin/python]

One image (3 x size x size), torchvision's ResNet-18 (2 classes, random weights
with non-trivial BatchNorm statistics, BatchNorm folded), three processes on
127.0.0.1 through :func:`bridge.infer_local`: the data owner shares the image,
the model server keeps its weights private, a dealer process provides the
correlated randomness.  Reported per run (medians over ``--repeat``):

- seconds: wall time of the whole inference in the parties, from the moment the
  three processes are connected until the data owner holds the logits (weight
  masking, image sharing, every layer, the dealer's work; process start-up and
  tracing are listed apart);
- rounds among the computing parties (set-up included);
- bytes sent + received by the busiest computing party: online (between the
  parties) and dealer traffic (which can be produced before the image arrives);
- the error of the encrypted logits against plaintext torch, and the ratio of
  the encrypted time to plaintext torch (float32, 2 threads) in the same run.

With ``--crypten``, the CrypTen anchor (/work/shared/anchors/crypten_resnet18.py)
runs in the same session for a side-by-side ratio; otherwise its reference
figures measured on this machine are shown, marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import bridge  # noqa: E402

if __name__ != "__mp_main__":
    # The party processes (multiprocessing's spawn) import this file again as __mp_main__; they
    # need neither, and importing torchvision there would add seconds to each process's start-up.
    import torch
    import torchvision

#: CrypTen 0.4.1 on this machine (docs: /work/shared/reference/anchors.md), used when --crypten is not given
CRYPTEN_REFERENCE = {"seconds": 26.9, "rounds": 925, "bytes": 5.0e9, "source": "reference run (anchors.md)"}
ANCHOR_SCRIPT = Path("/work/shared/anchors/crypten_resnet18.py")


def resnet18(seed: int = 0) -> torch.nn.Module:
    """ResNet-18 for 2 classes, random weights, BatchNorm statistics as after training."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


def plaintext_seconds(model: torch.nn.Module, x: torch.Tensor, repeat: int = 7) -> float:
    torch.set_num_threads(2)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_primia(size: int, repeat: int, comparison_bits: int | None) -> dict:
    model = resnet18()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).double().numpy()
    runs = [bridge.infer_local(model, x, comparison_bits=comparison_bits, profile=True) for _ in range(repeat)]
    plain = plaintext_seconds(model, x)
    best = sorted(runs, key=lambda r: r.stats["seconds"])[len(runs) // 2]
    s = best.stats
    times = sorted(r.stats["seconds"] for r in runs)
    return {
        "seconds": s["seconds"],
        "seconds_range": (times[0], times[-1]),
        "setup_seconds": s["setup_seconds"],
        "startup_seconds": s["startup_seconds"],
        "rounds": s["rounds"],
        "inference_rounds": s["inference_rounds"],
        "bytes": s["bytes"],
        "online_bytes": s["online_bytes"],
        "dealer_bytes": s["dealer_bytes"],
        "setup_bytes": s["setup_bytes"],
        "plaintext_seconds": plain,
        "max_error": float(np.abs(best.logits - ref).max()),
        "max_logit": float(np.abs(ref).max()),
        "argmax_agrees": bool((best.logits.argmax(1) == ref.argmax(1)).all()),
        "profile": s["profile"],
        "fixed_point": f"activations {s['act_bits']} bits, weights {s['weight_bits']} bits, "
                       f"comparisons in a {s['comparison_bits']}-bit domain",
    }


def run_crypten(python: str, size: int, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):  # alternating with nothing else: primia's runs come first, in the same invocation
        proc = subprocess.run([python, str(ANCHOR_SCRIPT), str(size)], capture_output=True, text=True, timeout=1800)
        match = re.search(r"wall ([\d.]+)s rounds (\d+) bytes\(party0 send\+recv\) ([\d.]+)MB", proc.stdout)
        if proc.returncode or not match:
            raise RuntimeError(f"the CrypTen anchor failed:\n{proc.stdout}\n{proc.stderr}")
        runs.append((float(match[1]), int(match[2]), float(match[3]) * 1e6))
    times = sorted(r[0] for r in runs)
    return {"seconds": statistics.median(times), "seconds_range": (times[0], times[-1]), "rounds": runs[0][1],
            "bytes": runs[0][2], "source": "this run"}


def table(p: dict, crypten: dict, size: int) -> str:
    def ratio(theirs: float, ours: float) -> str:
        return f"{theirs / ours:.1f}x"

    def spread(row: dict) -> str:
        low, high = row.get("seconds_range", (None, None))
        return f" ({low:.2f}-{high:.2f})" if low is not None and high > low else ""

    gb = 1e9
    lines = [
        f"ResNet-18, one 3x{size}x{size} image, 2 parties + dealer, three processes on 127.0.0.1",
        "",
        f"| | primia | CrypTen 0.4.1 ({crypten['source']}) | primia better by |",
        "|---|---|---|---|",
        f"| wall time (s), median (range) | {p['seconds']:.2f}{spread(p)} | {crypten['seconds']:.1f}{spread(crypten)} | "
        f"{ratio(crypten['seconds'], p['seconds'])} |",
        f"| rounds | {p['rounds']} | {crypten['rounds']} | {ratio(crypten['rounds'], p['rounds'])} |",
        f"| bytes, busiest party (GB) | {p['bytes'] / gb:.3f} | {crypten['bytes'] / gb:.2f} | "
        f"{ratio(crypten['bytes'], p['bytes'])} |",
        "",
        "| primia detail | value |",
        "|---|---|",
        f"| online bytes (between the parties) | {p['online_bytes'] / 1e6:.1f} MB |",
        f"| dealer bytes (to/from the dealer) | {p['dealer_bytes'] / 1e6:.1f} MB |",
        f"| of which set-up (weights masked once per model) | {p['setup_bytes'] / 1e6:.1f} MB |",
        f"| rounds per image after set-up | {p['inference_rounds']} |",
        f"| set-up seconds (plan check, masked weights) | {p['setup_seconds']:.2f} |",
        f"| process start-up, not counted above (s) | {p['startup_seconds']:.1f} |",
        f"| plaintext torch, float32, 2 threads (s) | {p['plaintext_seconds']:.3f} |",
        f"| encrypted / plaintext time | {p['seconds'] / p['plaintext_seconds']:.0f}x |",
        f"| max logit error (max logit) | {p['max_error']:.2e} ({p['max_logit']:.2f}) |",
        f"| argmax agrees | {p['argmax_agrees']} |",
        f"| fixed point | {p['fixed_point']} |",
        "",
        "| op kind (data owner's view) | ops | seconds | rounds | online MB | dealer MB |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in sorted(p["profile"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"| {kind} | {int(row['ops'])} | {row['seconds']:.2f} | {int(row['rounds'])} | "
                     f"{row['online_bytes'] / 1e6:.1f} | {row['dealer_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--comparison-bits", type=int, help="comparison domain (default: infer_local's choice)")
    parser.add_argument("--crypten", help="python of a CrypTen environment (shared/anchors/setup_crypten.sh)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    primia = run_primia(args.size, args.repeat, args.comparison_bits)
    crypten = run_crypten(args.crypten, args.size, args.repeat) if args.crypten else CRYPTEN_REFERENCE
    print(table(primia, crypten, args.size))
    if args.json:
        args.json.write_text(json.dumps({"primia": primia, "crypten": crypten}, indent=1))


if __name__ == "__main__":
    main()
