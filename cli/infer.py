"""``primia infer``: encrypted inference — the image and the weights both stay private.

All three roles on this machine, in one command (processes on 127.0.0.1)::

    primia infer --local --run runs/pneumonia  xrays/  --out results/
    primia infer --local --model resnet18 --weights resnet18.pt --input-size 224 \\
                 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225  scan.dcm --out results/

One role per command, over the network runtime (the party list as for ``primia party``;
id 0 = data owner, 1 = model server, 2 = crypto provider)::

    primia infer --role model-server --network parties.toml --run runs/pneumonia
    primia infer --role dealer       --network parties.toml
    primia infer --role data-owner   --network parties.toml xrays/ --out results/

The data owner writes one JSON file per image (class, probabilities, logits,
model id, timings, bytes), each atomically, plus ``summary.json``.  The model
server and the dealer learn nothing about the images or the results; what the
architecture itself reveals is described in docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["register"]

log = logging.getLogger("primia.infer")

ROLE_IDS = {"data-owner": 0, "model-server": 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="encrypted inference: a data owner's images through a model server's private model",
        description="Run encrypted inference with a data owner (images), a model server (weights) and a crypto "
        "provider: all three on this machine with --local, or one role per command with --role over the "
        "network runtime. Only the data owner sees the results. See docs/inference.md.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run all three roles here, as separate processes")
    mode.add_argument("--role", choices=("data-owner", "model-server", "dealer"), help="run one role over the network")
    p.add_argument("--network", type=Path, help="party list (TOML) for --role; see docs/network.md")

    model = p.add_argument_group("model (model server, or --local)")
    model.add_argument("--run", type=Path, help="a finished 'primia train' output folder (model.pt + report.json)")
    model.add_argument("--weights", type=Path, help="state dict file, read with torch.load(weights_only=True)")
    model.add_argument("--model", help="architecture: simple_cnn or a torchvision classifier, e.g. resnet18")
    model.add_argument("--config", type=Path, help="training configuration (TOML) giving the model and preprocessing")
    model.add_argument("--input-size", type=int, help="resize images to this square size (overrides the config)")
    model.add_argument("--mean", type=_floats, help="normalisation mean, one value or one per channel, comma-separated "
                       "(pixels scaled to [0, 1]; overrides the config)")
    model.add_argument("--std", type=_floats, help="normalisation standard deviation, comma-separated")
    model.add_argument("--classes", help="comma-separated class names, in the model's output order")
    model.add_argument("--num-classes", type=int, help="number of classes (default: from --classes or the weights)")
    model.add_argument("--pooling", choices=("max", "avg"), help="simple_cnn's down-sampling (default max)")

    data = p.add_argument_group("images (data owner, or --local)")
    data.add_argument("images", nargs="*", type=Path, help="image files (PNG, JPEG, BMP, TIFF, DICOM) or folders")
    data.add_argument("--out", type=Path, default=Path("inference"), help="output folder for the JSON results")
    data.add_argument("--batch-size", type=int, default=1, help="images per encrypted forward pass (default 1)")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")

    tuning = p.add_argument_group("fixed point (the data owner and the model server must agree)")
    tuning.add_argument("--act-bits", type=int, help="fractional bits of activations (default 12)")
    tuning.add_argument("--weight-bits", type=int, help="fractional bits of the weights (default 20)")
    tuning.add_argument("--comparison-bits", type=int,
                        help="comparison domain in bits: exact while ReLU and max-pool inputs stay below "
                        "2^(bits - 1 - act_bits) in magnitude (default 22: below 512); up to 64")
    p.set_defaults(func=main)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _fixed_point(args: argparse.Namespace) -> dict[str, int]:
    values = {"act_bits": args.act_bits, "weight_bits": args.weight_bits, "comparison_bits": args.comparison_bits}
    return {k: v for k, v in values.items() if v is not None}


def _model_settings(args: argparse.Namespace) -> dict[str, Any]:
    from mpc.errors import ConfigError

    if args.run is None and args.weights is None:
        raise ConfigError("the model server needs --run DIR, or --weights FILE with --model NAME or --config FILE")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    settings = {
        "run": str(args.run) if args.run else None,
        "weights": str(args.weights) if args.weights else None,
        "model": args.model,
        "config": str(args.config) if args.config else None,
        "input_size": args.input_size,
        "mean": args.mean,
        "std": args.std,
        "classes": classes,
        "pooling": args.pooling,
        "num_classes": args.num_classes,
        **_fixed_point(args),
    }
    return settings


def _owner_settings(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.images import collect_images

    images = collect_images(args.images)
    settings = {
        "images": [[str(path), name] for path, name in images],
        "out": str(args.out),
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
        **_fixed_point(args),
    }
    return settings


def _check_model(settings: dict[str, Any]) -> None:
    """Load and convert the model now, so that a bad file or an unsupported layer fails before any party starts."""
    from bridge.models import load_model
    from bridge.service import load_card_and_weights
    from bridge.trace import convert

    card, state = load_card_and_weights(settings)
    plan = convert(load_model(card, state), card.input_shape).plan
    log.info("model %s (%s): %s", card.name, card.model_id, plan.summary())


def main(args: argparse.Namespace) -> int:
    from mpc.errors import ConfigError

    if args.local:
        return _run_local(args)
    if args.network is None:
        raise ConfigError(f"--role {args.role} needs --network PARTIES.toml (or use --local)")
    from mpc.net.config import load_config

    network = load_config(args.network)
    if network.parties != 2:
        raise ConfigError(f"encrypted inference runs 2 parties and a dealer; {args.network} lists {network.parties}")
    from cli import party

    if args.role == "dealer":
        program, settings = None, None
        endpoint = network.dealer_id
    elif args.role == "model-server":
        settings = _model_settings(args)
        _check_model(settings)
        program, endpoint = "bridge.service:model_server_program", ROLE_IDS[args.role]
    else:
        settings = _owner_settings(args)
        program, endpoint = "bridge.service:data_owner_program", ROLE_IDS[args.role]
    party_args = argparse.Namespace(config=args.network, id=endpoint, program=program,
                                    args=json.dumps([] if settings is None else [settings]), output=None)
    code = party.main(party_args)
    if args.role == "data-owner" and code == 0:
        print(f"results written to {args.out}")
    return code


def _run_local(args: argparse.Namespace) -> int:
    import time

    from bridge.service import local_program
    from mpc.net import run_processes

    model_settings = _model_settings(args)
    owner_settings = _owner_settings(args)
    _check_model(model_settings)
    t0 = time.perf_counter()
    settings = {"model_server": model_settings, "data_owner": owner_settings}
    outs = run_processes(local_program, parties=2, args=(settings,))
    owner, server = outs
    wall = time.perf_counter() - t0
    n = owner["images"]
    traffic = max(s["total"]["bytes_sent"] + s["total"]["bytes_received"] + s["total"]["dealer_bytes"]
                  + s["total"]["dealer_bytes_sent"] for s in outs)
    print(f"encrypted inference of {n} image(s) with {owner['model']} ({owner['model_id']}): "
          f"{owner['seconds']:.2f} s in the parties ({wall:.1f} s with process start-up), "
          f"{owner['total']['rounds']} rounds, {traffic / 1e6:.1f} MB at the busiest party")
    print(f"results written to {args.out} (one JSON per image, and summary.json)")
    return 0
