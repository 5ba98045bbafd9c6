"""``primia infer``: encrypted inference — the image and the weights both stay private.

All three roles on this machine, in one command (processes on 127.0.0.1)::

    primia infer --local --run runs/pneumonia  xrays/  --out results/
    primia infer --local --model resnet18 --weights resnet18.pt --input-size 224 \\
                 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225  scan.dcm --out results/

One role per command, over the network runtime (the party list as for ``primia party``;
id 0 = data owner, 1 = model server, 2 = crypto provider).  The model server and the
dealer are long-lived services: they serve one data owner after another, and several
at once, until stopped (Ctrl-C or SIGTERM)::

    primia infer --role dealer       --network parties.toml
    primia infer --role model-server --network parties.toml --run runs/pneumonia --calibrate validation/
    primia infer --role data-owner   --network parties.toml xrays/ --out results/

The fixed point is sized from activation bounds the model owner measures on its own
images (``--calibrate``; with ``--local``, on the images being classified), shipped in the
model card (see docs/inference.md).  The data owner writes one JSON file per image
(class, probabilities, logits, model id, timings, bytes), each atomically, plus
``summary.json``.  The model server and the dealer learn nothing about the images or
the results; what the architecture itself reveals is described in docs/inference.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["register"]

log = logging.getLogger("primia.infer")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="encrypted inference: a data owner's images through a model server's private model",
        description="Run encrypted inference with a data owner (images), a model server (weights) and a crypto "
        "provider: all three on this machine with --local, or one role per command with --role over the "
        "network runtime (the model server and the dealer then serve sessions until stopped). Only the data "
        "owner sees the results. See docs/inference.md.",
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
    model.add_argument("--calibrate", type=Path, help="images like those the model will serve (a folder or a file): "
                       "the model owner measures the activation ranges on them and ships them in the model card "
                       "(required for --role model-server unless --act-bits and --comparison-bits are given; "
                       "with --local the default is the images being classified)")

    service = p.add_argument_group("service (model server and dealer)")
    service.add_argument("--max-sessions", type=int, default=4,
                         help="data-owner sessions served at once; more are refused (default 4)")
    service.add_argument("--max-session-s", type=float, default=3600.0,
                         help="a session running longer is aborted (default 3600 s)")

    data = p.add_argument_group("images (data owner, or --local)")
    data.add_argument("images", nargs="*", type=Path, help="image files (PNG, JPEG, BMP, TIFF, DICOM) or folders")
    data.add_argument("--out", type=Path, default=Path("inference"), help="output folder for the JSON results")
    data.add_argument("--batch-size", type=int, default=1, help="images per encrypted forward pass (default 1)")
    data.add_argument("--no-progress", action="store_true", help="no progress bar")
    data.add_argument("--port", type=int, help="data owner: port to listen on for its session's mesh "
                      "(default: its port in the party list; 0: any free port)")

    tuning = p.add_argument_group("fixed point (default: sized from the model card's bounds; if given, the data "
                                  "owner and the model server must give the same)")
    tuning.add_argument("--act-bits", type=int, help="fractional bits of activations")
    tuning.add_argument("--weight-bits", type=int, help="fractional bits of the weights (default 20)")
    tuning.add_argument("--comparison-bits", type=int,
                        help="comparison domain in bits: exact while compared differences stay below "
                        "2^(bits - 1 - act_bits) in magnitude; up to 64")
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
    if args.calibrate is not None:
        from bridge.images import find_images

        settings["calibrate"] = [str(f) for f in find_images(args.calibrate)]
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


def _limits(args: argparse.Namespace) -> Any:
    from mpc.net.sessions import SessionLimits

    return SessionLimits(max_sessions=args.max_sessions, max_session_s=args.max_session_s)


def main(args: argparse.Namespace) -> int:
    from mpc.errors import ConfigError

    if args.local:
        return _run_local(args)
    if args.network is None:
        raise ConfigError(f"--role {args.role} needs --network PARTIES.toml (or use --local)")
    from mpc.net.config import check_port, load_config

    network = load_config(args.network)
    if network.parties != 2:
        raise ConfigError(f"encrypted inference runs 2 parties and a dealer; {args.network} lists {network.parties}")
    if args.role == "data-owner":
        port = None if args.port is None else check_port(args.port, "--port", allow_any=True)
        from bridge.service import query_model_server

        summary = query_model_server(network, _owner_settings(args), port=port)
        print(f"encrypted inference of {summary['images']} image(s) with {summary['model']} ({summary['model_id']}): "
              f"{summary['seconds']:.2f} s, {summary['total']['rounds']} rounds")
        print(f"results written to {args.out}")
        return 0
    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # a line per connection otherwise
    if args.role == "dealer":
        from mpc.net.sessions import serve_dealer_sessions

        host = serve_dealer_sessions(network, _limits(args))
    else:
        from bridge.service import load_served_model, serve_model_sessions

        settings = _model_settings(args)
        model = load_served_model(settings)
        log.info("model %s (%s): %s", model.card.name, model.card.model_id, model.plan.summary())
        if model.card.bounds is not None:
            log.info("activation bounds %s", model.card.bounds.describe())
        host = serve_model_sessions(network, model, settings, _limits(args))
    return _serve_until_stopped(host, args.role)


def _serve_until_stopped(host: Any, role: str) -> int:
    """Serve until Ctrl-C or SIGTERM; then stop accepting, abort running sessions, exit 0."""
    me = host.config.endpoint(host.endpoint_id)
    print(f"{role} serving on {me.listen_host}:{me.port} (up to {host.limits.max_sessions} sessions at once); "
          "stop with Ctrl-C", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        host.stop()
    print(f"{role} stopped: {host.completed} session(s) served, {host.failed} failed", flush=True)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from bridge.service import load_served_model, local_program
    from bridge.sizing import LOCAL_MARGIN, run_with_retry, size_fixed_point
    from mpc.net import run_processes

    model_settings = _model_settings(args)
    owner_settings = _owner_settings(args)
    if "calibrate" not in model_settings:  # this machine holds model and images: measure on the images themselves
        model_settings = {**model_settings, "calibrate": [path for path, _ in owner_settings["images"]],
                          "calibration_margin": LOCAL_MARGIN}
    model = load_served_model(model_settings)  # a bad file or an unsupported layer fails before any party starts
    log.info("model %s (%s): %s", model.card.name, model.card.model_id, model.plan.summary())
    bounds = dataclasses.asdict(model.card.bounds) if model.card.bounds is not None else None
    explicit = _fixed_point(args)

    def run(widen_bits: int) -> list[Any]:
        # Both roles get the settings sized here, from the same bounds, by the same function.
        fixed = size_fixed_point(model.card.bounds, plan=model.plan, **explicit, widen_bits=widen_bits).options()
        server = {**model_settings, "calibrate": None, "bounds": bounds, **fixed}
        owner = {**owner_settings, **fixed}
        return run_processes(local_program, parties=2, args=({"model_server": server, "data_owner": owner},))

    t0 = time.perf_counter()
    outs = run_with_retry(run)
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
