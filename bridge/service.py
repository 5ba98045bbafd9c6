"""The inference roles as services: plain settings in, result files out.

``primia infer`` runs these programs, over the network runtime (one command
per role, see :mod:`cli.infer`) or all on this machine (``--local``):

- the model server (party 1): :func:`load_served_model` loads the weights, the
  card and the bounds once (measuring them on calibration images,
  :func:`calibrate`); :func:`serve_model_sessions` then serves data owner after
  data owner, several at once, each in a fresh session
  (:mod:`mpc.net.sessions`) until stopped.  With ``--local``,
  :func:`model_server_program` serves one session.
- the data owner (party 0): :func:`data_owner_program` receives the card,
  preprocesses its images as the model was trained, refuses images beyond the
  calibrated range and writes one JSON file per image;
  :func:`query_model_server` opens its session with a model server.
- the crypto provider is the engine's dealer
  (:func:`mpc.net.sessions.serve_dealer_sessions`); it needs no program.

Both parties size their fixed point from the card's bounds with
:func:`bridge.sizing.size_fixed_point`, and a session that overflows is run
once more with a wider comparison domain (:func:`bridge.sizing.run_with_retry`).

Settings are plain JSON-able dicts (they travel as command-line JSON and as
process arguments).  Model settings: ``run`` (a ``primia train`` output
folder), or ``weights`` (a state-dict file) with ``model`` (an architecture
name) and optionally ``config`` (a training TOML); overrides ``input_size``,
``mean``, ``std``, ``classes``.  Data-owner settings: ``images`` (pairs of a
file and the name of its result, from :func:`bridge.images.collect_images`),
``out`` (folder), ``batch_size``, ``progress``.
Model server: ``calibrate`` (image files to measure bounds on, with
``calibration_margin``), or ``bounds`` (measured already).  Both: explicit fixed-point options ``act_bits``,
``weight_bits``, ``comparison_bits`` (:func:`fixed_point`; both parties must give
the same), and ``widen_bits`` (the session's retry widening).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import mpc
from fl.checkpoint import write_json
from mpc.errors import ConfigError
from mpc.net.config import NetworkConfig
from mpc.net.sessions import (
    SESSION_JOIN,
    SESSION_OPEN,
    SessionHost,
    SessionLimits,
    SessionRefused,
    front_door_request,
    new_session_id,
    parse_address,
    run_session,
    session_transport,
)

from .card import Bounds, ModelCard
from .images import load_batch
from .models import build_from_card, card_from_config, card_from_run, card_from_state, load_model, load_state_dict
from .plan import Plan
from .roles import DATA_OWNER, MODEL_OWNER, BatchResult, query_model, serve_model
from .secure import MAX_BATCH
from .sizing import (CALIBRATION_MARGIN, WIDEN_BITS, FixedPoint, check_inputs, check_weights, measure_bounds,
                     run_with_retry, size_fixed_point)
from .trace import convert

log = logging.getLogger("primia.infer")

__all__ = [
    "load_card_and_weights",
    "ServedModel",
    "load_served_model",
    "calibrate",
    "serve_model_sessions",
    "open_session",
    "query_model_server",
    "fixed_point",
    "plan_for_card",
    "FileBatches",
    "output_path",
    "result_record",
    "model_server_program",
    "serve_session",
    "data_owner_program",
    "local_program",
]

_OVERRIDES = ("input_size", "mean", "std", "classes", "pooling", "num_classes")


def load_card_and_weights(settings: dict[str, Any]) -> tuple[ModelCard, dict[str, Any]]:
    """The model server's card and state dict from its settings (see the module docstring)."""
    overrides = {k: settings.get(k) for k in _OVERRIDES}
    if overrides["classes"] is not None:
        overrides["classes"] = tuple(overrides["classes"])
    if overrides["mean"] is not None:
        overrides["mean"] = tuple(overrides["mean"])
    if overrides["std"] is not None:
        overrides["std"] = tuple(overrides["std"])
    if settings.get("run"):
        return card_from_run(settings["run"], **overrides)
    if not settings.get("weights"):
        raise ConfigError("the model server needs --run DIR, or --weights FILE with --model NAME (or --config)")
    state, meta = load_state_dict(settings["weights"])
    if settings.get("config"):
        return card_from_config(settings["config"], state, meta, **overrides), state
    if not settings.get("model"):
        raise ConfigError("give the architecture with --model NAME (e.g. resnet18) or --config TRAINING.toml")
    return card_from_state(settings["model"], state, meta, **overrides), state


def fixed_point(settings: dict[str, Any]) -> dict[str, int]:
    """The fixed-point options (``act_bits``, ``weight_bits``, ``comparison_bits``) given in the settings."""
    return {k: int(settings[k]) for k in ("act_bits", "weight_bits", "comparison_bits") if settings.get(k) is not None}


def _widen_bits(value: Any) -> int:
    # A data owner may ask for the one retry's wider domain, no more (it costs the servers dealer traffic).
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= WIDEN_BITS:
        raise ConfigError(f"widen_bits must be an integer in 0..{WIDEN_BITS}, got {value!r:.40}")
    return value


def _sized(card: ModelCard, plan: Plan, settings: dict[str, Any]) -> FixedPoint:
    """This party's fixed point: from the card's bounds and the plan, as the other party derives it."""
    return size_fixed_point(card.bounds, plan=plan, **fixed_point(settings),
                            widen_bits=_widen_bits(settings.get("widen_bits", 0)))


@dataclass(frozen=True)
class ServedModel:
    """What a model server holds for all its sessions: the public card (with bounds), the plan, the weights."""

    card: ModelCard
    plan: Plan
    weights: dict[str, np.ndarray]


def calibrate(card: ModelCard, plan: Plan, weights: dict[str, np.ndarray], files: list[Path], *,
              margin: float = CALIBRATION_MARGIN, batch_size: int = 16) -> Bounds:
    """Bounds measured on image files, preprocessed as the card says, a few at a time."""
    if not files:
        raise ConfigError("no calibration images: give a folder of images like those the model will see")

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            yield load_batch(files[start:start + batch_size], card)

    return measure_bounds(plan, weights, batches(), margin=margin)


def load_served_model(settings: dict[str, Any]) -> ServedModel:
    """The model server's card, plan and weights, with bounds (``bounds`` or measured on ``calibrate``).

    Checks that the fixed point can be sized and that no layer can leave the
    ring (:func:`bridge.sizing.check_weights`), so that a model server that
    could serve nobody fails at start-up.
    """
    card, state = load_card_and_weights(settings)
    converted = convert(load_model(card, state), card.input_shape)
    if settings.get("bounds"):
        card = dataclasses.replace(card, bounds=Bounds(**settings["bounds"]))
    elif settings.get("calibrate"):
        files = [Path(f) for f in settings["calibrate"]]
        margin = float(settings.get("calibration_margin") or CALIBRATION_MARGIN)
        card = dataclasses.replace(card, bounds=calibrate(card, converted.plan, converted.weights, files,
                                                          margin=margin))
    fixed = size_fixed_point(card.bounds, plan=converted.plan, **fixed_point(settings))
    check_weights(converted.plan, converted.weights, fixed, fixed.activation_bound)  # every session would refuse
    return ServedModel(card, converted.plan, converted.weights)


def plan_for_card(card: ModelCard) -> Plan:
    """The data owner's plan: the card's architecture, freshly built (no weights), converted."""
    return convert(build_from_card(card), card.input_shape).plan


class FileBatches:
    """The data owner's image files in batches, decoded and preprocessed when asked for."""

    def __init__(self, paths: list[str | Path], batch_size: int):
        if not 1 <= batch_size <= MAX_BATCH:
            raise ConfigError(f"batch size must be between 1 and {MAX_BATCH}, got {batch_size}")
        self.paths = [Path(p) for p in paths]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def files(self, index: int) -> list[Path]:
        return self.paths[index * self.batch_size:(index + 1) * self.batch_size]

    def load(self, index: int, card: ModelCard | None) -> np.ndarray:
        """The batch, preprocessed; refused if an image reaches beyond the card's calibrated range."""
        if card is None:
            raise ConfigError("image files need the model card for their preprocessing")
        files = self.files(index)
        x = load_batch(files, card)
        check_inputs(x, card.bounds, [str(f) for f in files])
        return x


def result_record(path: Path, row: int, result: BatchResult, card: ModelCard) -> dict[str, Any]:
    """The JSON record of one image: class, probabilities, model, timings, bytes."""
    names = card.class_names
    probs = result.probabilities[row]
    best = int(np.argmax(probs))
    n = result.logits.shape[0]
    s = result.stats
    return {
        "image": str(path),
        "class": names[best],
        "class_index": best,
        "probabilities": {name: float(p) for name, p in zip(names, probs)},
        "logits": [float(v) for v in result.logits[row]],
        "model": card.name,
        "model_id": card.model_id,
        "timings": {"batch_seconds": result.seconds, "seconds_per_image": result.seconds / n, "batch_size": n},
        "bytes": {"sent": s["bytes_sent"], "received": s["bytes_received"],
                  "from_dealer": s["dealer_bytes"], "to_dealer": s["dealer_bytes_sent"],
                  "total": s["bytes_sent"] + s["bytes_received"] + s["dealer_bytes"] + s["dealer_bytes_sent"],
                  "scope": "this data owner's traffic for the batch holding the image"},
        "rounds": s["rounds"],
    }


def output_path(out: Path, name: str) -> Path:
    """Where the result of the image named ``name`` (see :func:`bridge.images.collect_images`) goes."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"result name {name!r} must be a relative path inside the output folder")
    return out / rel.parent / f"{rel.name}.json"


def model_server_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """Party 1 for one session: load the weights, publish the card, serve every batch; learns no image and no result."""
    if ctx.rank != MODEL_OWNER:
        raise ConfigError(f"the model server must be party {MODEL_OWNER}, not {ctx.rank}")
    return serve_session(ctx, load_served_model(settings), settings)


def serve_session(ctx: mpc.Context, model: ServedModel, settings: dict[str, Any]) -> dict[str, Any]:
    """Party 1's part of one session with an already loaded model."""
    fixed = _sized(model.card, model.plan, settings)
    # the ring check of the owner's weights assumes what the card's bounds hold (margin x measured)
    return serve_model(ctx, model.plan, model.weights, card=model.card, activation_bound=fixed.activation_bound,
                       **fixed.options())


def data_owner_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """Party 0: send the images encrypted, write one JSON per image (atomically); returns a summary."""
    if ctx.rank != DATA_OWNER:
        raise ConfigError(f"the data owner must be party {DATA_OWNER}, not {ctx.rank}")
    images = [(Path(path), str(name)) for path, name in settings["images"]]
    targets = [output_path(Path(settings["out"]), name) for _, name in images]
    if len(set(targets)) != len(targets):
        raise ConfigError("two images would write the same result file; name each image once "
                          "(bridge.images.collect_images does)")
    batches = FileBatches([path for path, _ in images], int(settings.get("batch_size", 1)))
    out = Path(settings["out"])
    bar = None
    if settings.get("progress", False):
        from tqdm import tqdm

        bar = tqdm(total=len(batches.paths), desc="encrypted inference", unit="image")
    written: list[str] = []

    def on_result(result: BatchResult, card: ModelCard | None) -> None:
        assert card is not None
        first = result.index * batches.batch_size
        for row, path in enumerate(batches.files(result.index)):
            target = targets[first + row]
            write_json(target, result_record(path, row, result, card))
            written.append(str(target))
        if bar is not None:
            bar.update(result.logits.shape[0])

    try:
        summary = query_model(ctx, batches, plan_from_card=plan_for_card, on_result=on_result,
                              options_from_card=lambda card, plan: _sized(card, plan, settings).options())
    finally:
        if bar is not None:
            bar.close()
    card = summary["card"]
    report = {"images": len(written), "model": card.name, "model_id": card.model_id,
              "seconds": summary["seconds"], "setup_seconds": summary["setup_seconds"],
              "setup": summary["setup"], "total": summary["total"]}
    write_json(out / "summary.json", report)
    return {**report, "written": written}


def local_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """``primia infer --local``: each computing party runs its role with its part of the settings."""
    if ctx.rank == MODEL_OWNER:
        return model_server_program(ctx, settings["model_server"])
    return data_owner_program(ctx, settings["data_owner"])


# -- the networked roles as services -------------------------------------------------------------
def serve_model_sessions(config: NetworkConfig, model: ServedModel, settings: dict[str, Any],
                         limits: SessionLimits = SessionLimits()) -> SessionHost:
    """Start the model server as a long-lived service; returns its host (``wait()`` and ``stop()`` it).

    Each data owner's :data:`~mpc.net.sessions.SESSION_OPEN` gets a session of
    its own: the model server listens for it on a free port, has the dealer
    join it, and runs :func:`serve_session` there.  ``settings`` holds the
    explicit fixed-point options, if any.
    """
    me = config.endpoint(MODEL_OWNER)

    def listen(session_id: str) -> tuple[Any, int]:
        transport = session_transport(config, MODEL_OWNER, session_id)
        try:
            return transport, transport.listen(me.listen_host, 0)
        except BaseException:
            transport.abort("session set-up failed")
            raise

    async def on_open(channel: Any, message: Any) -> None:
        header = message.header
        session_id = header.get("session")
        try:
            owner = parse_address(header.get("owner"), "owner")
            widen_bits = _widen_bits(header.get("widen_bits", 0))
        except ConfigError as exc:
            await host.refuse(channel, str(exc))
            return
        reason = host.reserve(session_id)
        if reason is not None:
            await host.refuse(channel, reason)
            return
        transport = None
        try:
            transport, port = await asyncio.get_running_loop().run_in_executor(None, listen, session_id)
            await front_door_request(config, MODEL_OWNER, config.dealer_id, SESSION_JOIN,
                                     {"session": session_id, "owner": list(owner), "server": [me.host, port]},
                                     label="dealer")
            await host.accept(channel)
        except BaseException as exc:
            host.release(session_id)
            if transport is not None:
                transport.abort("session set-up failed")
            if not isinstance(exc, Exception):
                raise
            why = str(exc) if isinstance(exc, SessionRefused) else f"{type(exc).__name__}: {exc}"
            try:
                await host.refuse(channel, f"the session could not be set up: {why}")
            except Exception:  # noqa: BLE001 - the data owner is gone too; nothing left to tell
                pass
            return
        session_settings = {**settings, "widen_bits": widen_bits}

        def body() -> None:
            transport.connect({DATA_OWNER: owner})
            run_session(config, transport, MODEL_OWNER, serve_session, (model, session_settings))

        host.launch(session_id, transport, body)

    host = SessionHost(config, MODEL_OWNER, accept_from=DATA_OWNER, request_kind=SESSION_OPEN, on_request=on_open,
                       limits=limits)
    host.start()
    return host


def open_session(config: NetworkConfig, *, port: int | None = None, widen_bits: int = 0) -> Any:
    """The data owner's side of a new session: a connected transport (party 0 of a fresh mesh).

    Listens on the party list's address for endpoint 0 (``port`` overrides its
    port; 0 is any free port), asks the model server for a session
    (:data:`~mpc.net.sessions.SESSION_OPEN`) and waits for it and the dealer to dial in.

    Raises:
        SessionRefused: the model server or the dealer refused (busy, shutting down...).
        PeerFailure, AuthenticationError: a peer could not be reached or authenticated.
    """
    me = config.endpoint(DATA_OWNER)
    session_id = new_session_id()
    transport = session_transport(config, DATA_OWNER, session_id)
    try:
        bound = transport.listen(me.listen_host, me.port if port is None else port)
        asyncio.run(front_door_request(config, DATA_OWNER, MODEL_OWNER, SESSION_OPEN,
                                       {"session": session_id, "owner": [me.host, bound], "widen_bits": widen_bits},
                                       label="model server"))
        transport.connect({})
    except BaseException:
        transport.abort("session set-up failed")
        raise
    log.info("session %s open", session_id[:8])
    return transport


def query_model_server(config: NetworkConfig, settings: dict[str, Any], *, port: int | None = None) -> dict[str, Any]:
    """The data owner: run :func:`data_owner_program` in a session with the model server (:func:`open_session`).

    After an overflow the whole session runs once more, wider (:func:`bridge.sizing.run_with_retry`).
    """
    def one_session(widen_bits: int) -> dict[str, Any]:
        transport = open_session(config, port=port, widen_bits=widen_bits)
        return run_session(config, transport, DATA_OWNER, data_owner_program, ({**settings, "widen_bits": widen_bits},))

    return run_with_retry(one_session)
