"""``primia train``: the hub of a federation, from one TOML file.

    primia train --config federation.toml            # a new run
    primia train --config federation.toml --resume   # continue after the last completed round

Every key of the file is described in docs/federation.md.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="run a federation from a TOML config (the hub)",
        description="Listen for the nodes listed in the config (they connect out to the hub) and train one model "
        "with federated averaging (secure aggregation by default).  Writes checkpoints, a JSON report and plots "
        "to run.output_dir.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="federation config (TOML)")
    p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir after its last round")
    p.add_argument("--port-file", metavar="FILE", help="write the port the hub listens on to this file (the number alone), "
                                                       "once it listens (for federation.listen with port 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fl.config import load_config
    from fl.hub import run_hub

    cfg = load_config(args.config)
    report = run_hub(cfg, resume=args.resume, progress=False if args.no_progress else None, port_file=args.port_file)
    final = report.get("final", {}).get("pooled", {})
    summary = {k: final.get(k) for k in ("accuracy", "loss", "mcc", "roc_auc_macro")}
    print(f"done: {report['run']['rounds_done']} rounds; final pooled validation metrics {json.dumps(summary)}")
    for what, path in report["outputs"].items():
        print(f"  {what}: {path}")
    return 0
