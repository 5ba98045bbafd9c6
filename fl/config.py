"""The federation's configuration: one TOML file, every key checked.

A configuration has six tables::

    [run]          name, rounds, seed, output directory, evaluation cadence
    [federation]   the nodes (name, address, credentials), dropout policy, timeouts, message limit
    [model]        a small CNN or a torchvision classification model, by name
    [data]         input size, channels, validation split, normalisation, augmentations
    [training]     local epochs or steps, batch size, optimizer, learning-rate schedule
    [aggregation]  weighting, secure aggregation, fixed-point precision, server optimizer

Every key is declared once below, with its type, default, allowed values and a
one-line description (``docs/federation.md`` lists the same keys).  Unknown
keys and bad values raise :class:`mpc.errors.ConfigError` naming the key, e.g.
``training.lrr: unknown key (did you mean training.lr?)``.

The hub sends nodes the part of the configuration they need (:meth:`Config.node_spec`,
everything but ``[federation]``); nodes parse it with :func:`parse_node_spec`,
through the same checks.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from mpc.errors import ConfigError
from mpc.net.auth import MIN_SECRET_BYTES

from .augment import build_augmentations
from .models import SIMPLE_CNN, check_model_name

__all__ = [
    "NodeEntry",
    "Augmentation",
    "RunConfig",
    "FederationConfig",
    "ModelConfig",
    "DataConfig",
    "TrainingConfig",
    "AggregationConfig",
    "Config",
    "load_config",
    "parse_config",
    "parse_node_spec",
    "all_keys",
    "SIMPLE_CNN",
]


def _key(doc: str, *, choices: tuple = (), lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A dataclass field with the metadata the parser and the docs use."""
    return field(metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi}, **kw)


@dataclass(frozen=True)
class NodeEntry:
    """One data owner's node: where the hub reaches it and the secret it proves membership with."""

    name: str = _key("unique node name (letters, digits, '-', '_'); used in metrics and logs")
    address: str = _key("websocket address of the node, e.g. ws://10.0.0.5:8781")
    token: str = _key("shared secret for this node (or use token_file)", default="")
    token_file: str = _key("file holding the shared secret (first line), instead of token", default="")


@dataclass(frozen=True)
class Augmentation:
    """A torchvision transform by class name, with its keyword arguments."""

    name: str
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class RunConfig:
    name: str = _key("run name, used for the default output directory", default="federation")
    rounds: int = _key("number of federated rounds", default=10, lo=1, hi=100_000)
    seed: int = _key("seed for model initialisation, data splits and shuffling", default=0, lo=0, hi=2**63 - 1)
    output_dir: str = _key("checkpoints, report and plots go here (default runs/<name>)", default="")
    evaluate_every: int = _key(
        "evaluate the global model every this many rounds and after the last (0: never)", default=1, lo=0
    )


@dataclass(frozen=True)
class FederationConfig:
    nodes: tuple[NodeEntry, ...] = _key("the nodes, as [[federation.nodes]] tables", default=())
    min_nodes: int = _key("fewest nodes a round may complete with (0 = 2, or 1 for a one-node federation)", default=0, lo=0)
    on_dropout: str = _key(
        "'continue' the round with the remaining nodes, or 'fail' it", default="continue", choices=("continue", "fail")
    )
    connect_timeout_s: float = _key("seconds to reach every node at start-up", default=60.0, lo=0.1)
    train_timeout_s: float = _key("seconds a node may take to train one round", default=3600.0, lo=0.1)
    reply_timeout_s: float = _key("seconds a node may take for any other reply", default=300.0, lo=0.1)
    max_message_mib: int = _key("largest message accepted, in MiB (websockets max_size)", default=1024, lo=1, hi=65536)
    tls_ca: str = _key("CA certificate that signed the nodes' certificates, for wss:// addresses", default="")
    dealer_address: str = _key(
        "websocket address of the dealer (crypto provider) for aggregation.masking = 'dealer', e.g. ws://10.0.0.9:8790",
        default="",
    )
    dealer_token: str = _key("shared secret for the dealer (or use dealer_token_file)", default="")
    dealer_token_file: str = _key("file holding the dealer's shared secret (first line), instead of dealer_token",
                                  default="")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key(f"'{SIMPLE_CNN}' or a torchvision classification model name (e.g. resnet18)", default=SIMPLE_CNN)
    width: int = _key(f"channels of the first {SIMPLE_CNN} block (doubling per block)", default=32, lo=1, hi=1024)
    pooling: str = _key(f"{SIMPLE_CNN} down-sampling: 'max' or 'avg'", default="max", choices=("max", "avg"))


@dataclass(frozen=True)
class DataConfig:
    input_size: int = _key("images are resized to input_size x input_size pixels", default=32, lo=4, hi=4096)
    channels: int = _key("1 (grayscale) or 3 (RGB); 0 = 3 if any node has colour images, else 1", default=0, choices=(0, 1, 3))
    val_fraction: float = _key("fraction of each node's images kept for local validation", default=0.2, lo=0.0, hi=0.9)
    mean: tuple[float, ...] = _key("per-channel mean subtracted after scaling pixels to [0, 1]", default=(0.5,))
    std: tuple[float, ...] = _key("per-channel standard deviation divided by", default=(0.25,))
    augmentations: tuple[Augmentation, ...] = _key(
        "torchvision transforms for training images, as [[data.augmentations]] tables", default=()
    )


@dataclass(frozen=True)
class TrainingConfig:
    local_epochs: int = _key("passes over the local training split per round (or set local_steps)", default=1, lo=1)
    local_steps: int = _key("optimizer steps per round, instead of local_epochs (0 = use local_epochs)", default=0, lo=0)
    batch_size: int = _key("mini-batch size", default=32, lo=1, hi=1_000_000)
    optimizer: str = _key("'sgd', 'adam' or 'adamw'", default="sgd", choices=("sgd", "adam", "adamw"))
    lr: float = _key("learning rate (first round)", default=0.01, lo=0.0, hi=100.0)
    momentum: float = _key("SGD momentum", default=0.9, lo=0.0, hi=1.0)
    nesterov: bool = _key("SGD Nesterov momentum", default=False)
    betas: tuple[float, ...] = _key("Adam betas", default=(0.9, 0.999))
    weight_decay: float = _key("L2 penalty (decoupled for adamw)", default=0.0, lo=0.0, hi=1.0)
    lr_schedule: str = _key(
        "'constant', 'cosine' (to end_lr), 'step' (x gamma every step_rounds) or 'exponential' (x gamma per round)",
        default="constant",
        choices=("constant", "cosine", "step", "exponential"),
    )
    end_lr: float = _key("learning rate of the last round for the cosine schedule", default=0.0, lo=0.0, hi=100.0)
    step_rounds: int = _key("rounds between decays for the step schedule", default=10, lo=1)
    gamma: float = _key("decay factor for the step and exponential schedules", default=0.5, lo=0.0, hi=1.0)
    optimizer_state: str = _key(
        "'keep' each node's optimizer state (momentum, Adam moments) from round to round, or 'reset' it",
        default="keep",
        choices=("keep", "reset"),
    )


@dataclass(frozen=True)
class AggregationConfig:
    weighting: str = _key("'samples' (FedAvg) or 'equal'", default="samples", choices=("samples", "equal"))
    secure: bool = _key("secure aggregation: the hub learns only the sum of the updates", default=True)
    frac_bits: int = _key("fixed-point fractional bits of the masked updates", default=16, lo=4, hi=40)
    ring_bits: int = _key("ring of the masked updates: 32 (bytes of float32) or 64", default=32, choices=(32, 64))
    masking: str = _key(
        "'pairwise': nodes mask with pair masks that cancel in the sum (no third party); 'dealer': one mask per "
        "node, removed from the sum by a dealer (crypto provider) that must not collude with the hub",
        default="pairwise",
        choices=("pairwise", "dealer"),
    )
    neighbours: int = _key(
        "pair masks per node (pairwise masking): 0 = with every other node (Bonawitz et al.); k >= 2 = with k "
        "neighbours on a Harary graph (SecAgg+), less work per node, any k - 1 dropouts survived",
        default=0,
        lo=0,
        hi=100_000,
    )
    server_lr: float = _key("server learning rate applied to the averaged update (1 = FedAvg)", default=1.0, lo=0.0, hi=100.0)
    server_momentum: float = _key("server momentum on the averaged update (FedAvgM)", default=0.0, lo=0.0, hi=1.0)


_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "federation": FederationConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "aggregation": AggregationConfig,
}
#: sections the hub sends to the nodes
NODE_SECTIONS = ("run", "model", "data", "training", "aggregation")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or os.path.join("runs", self.run.name))

    @property
    def min_nodes(self) -> int:
        return self.federation.min_nodes or min(2, len(self.federation.nodes))

    def node_spec(self) -> dict[str, Any]:
        """What nodes need to train: every section but ``[federation]``, as plain data."""
        return {name: _as_plain(getattr(self, name)) for name in NODE_SECTIONS}

    def digest(self) -> str:
        """A hash of everything that fixes the trained model except the number of rounds.

        ``--resume`` refuses a checkpoint whose digest differs.
        """
        spec = self.node_spec()
        spec["run"] = {k: v for k, v in spec["run"].items() if k not in ("rounds", "output_dir", "evaluate_every")}
        blob = json.dumps(spec, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _as_plain(obj: Any) -> Any:
    if isinstance(obj, Augmentation):
        return {"name": obj.name, **dict(obj.kwargs)}
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _as_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_as_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _as_plain(v) for k, v in obj.items()}
    return obj


# -- parsing -----------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> Config:
    """Read and check a federation TOML file.

    Raises:
        ConfigError: the file is missing or not TOML, or a key is unknown or bad.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(raw, base_dir=path.parent)


def parse_config(raw: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Check a configuration given as nested tables (as ``tomllib`` returns them)."""
    _reject_unknown(raw, _SECTIONS.keys(), prefix="")
    training = raw.get("training", {})
    if isinstance(training, Mapping) and "local_steps" in training and "local_epochs" in training:
        raise ConfigError("training.local_steps: give local_epochs or local_steps, not both")
    sections = {name: _parse_section(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = Config(**sections)
    cfg = replace(cfg, federation=_resolve_tokens(cfg.federation, base_dir or Path(".")))
    _check_cross(cfg, need_nodes=True)
    return cfg


def parse_node_spec(spec: Mapping[str, Any]) -> Config:
    """Check the specification a hub sent (every section but ``[federation]``)."""
    if not isinstance(spec, Mapping):
        raise ConfigError("the training specification must be a table")
    _reject_unknown(spec, NODE_SECTIONS, prefix="")
    sections = {name: _parse_section(name, _SECTIONS[name], spec.get(name, {})) for name in NODE_SECTIONS}
    cfg = Config(**sections)
    _check_cross(cfg, need_nodes=False)
    return cfg


def all_keys() -> list[tuple[str, str, Any, str]]:
    """Every configuration key as (dotted name, type, default, description), for docs and tests."""
    out = []
    for section, cls in [*_SECTIONS.items(), ("federation.nodes", NodeEntry)]:
        for f in fields(cls):
            if section == "federation" and f.name == "nodes":
                continue
            default = None if f.default is MISSING else f.default
            out.append((f"{section}.{f.name}", _type_name(f.type), default, f.metadata.get("doc", "")))
    return out


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def _reject_unknown(table: Mapping[str, Any], known: Any, *, prefix: str) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _as_floats(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a number or a non-empty list of numbers, got {value!r}")
    return tuple(_as_float(f"{key}[{i}]", v) for i, v in enumerate(value))


def _as_nodes(key: str, value: Any) -> tuple[NodeEntry, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected [[{key}]] tables, got {value!r}")
    nodes = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a table with name, address and token, got {item!r}")
        nodes.append(_parse_section(where, NodeEntry, item, prefix=f"{where}."))
    return tuple(nodes)


def _as_augmentations(key: str, value: Any) -> tuple[Augmentation, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected [[{key}]] tables, got {value!r}")
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: expected a table with a 'name' (a torchvision transform) and its arguments")
        kwargs = {k: v for k, v in item.items() if k != "name"}
        for k, v in kwargs.items():
            _check_plain_value(f"{where}.{k}", v)
        out.append(Augmentation(item["name"], kwargs))
    return tuple(out)


#: the checker for each field annotation (as a string: ``from __future__ import annotations``)
_CHECKERS: dict[str, Callable[[str, Any], Any]] = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "tuple[float, ...]": _as_floats,
    "tuple[NodeEntry, ...]": _as_nodes,
    "tuple[Augmentation, ...]": _as_augmentations,
}


def _check_plain_value(key: str, value: Any) -> None:
    # Transform arguments travel to nodes: only numbers, strings, booleans and lists of them.
    if isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain_value(f"{key}[{i}]", v)
        return
    raise ConfigError(f"{key}: transform arguments must be numbers, strings, booleans or lists, got {value!r}")


def _parse_section(name: str, cls: type, table: Any, *, prefix: str | None = None) -> Any:
    prefix = f"{name}." if prefix is None else prefix
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name}: expected a table, got {table!r}")
    by_name = {f.name: f for f in fields(cls)}
    _reject_unknown(table, by_name, prefix=prefix)
    values = {}
    for key, value in table.items():
        f = by_name[key]
        dotted = f"{prefix}{key}"
        checked = _CHECKERS[str(f.type)](dotted, value)
        meta = f.metadata
        if meta.get("choices") and checked not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise ConfigError(f"{dotted}: {checked!r} is not allowed; choose one of {allowed}")
        if isinstance(checked, (int, float)) and not isinstance(checked, bool):
            if meta.get("lo") is not None and checked < meta["lo"]:
                raise ConfigError(f"{dotted}: {checked!r} is below the minimum {meta['lo']}")
            if meta.get("hi") is not None and checked > meta["hi"]:
                raise ConfigError(f"{dotted}: {checked!r} is above the maximum {meta['hi']}")
        values[key] = checked
    for f in fields(cls):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{f.name}: missing; {f.metadata.get('doc', '')}")
    return cls(**values)


def _resolve_tokens(fed: FederationConfig, base_dir: Path) -> FederationConfig:
    if fed.tls_ca:
        ca = Path(fed.tls_ca)
        fed = replace(fed, tls_ca=str(ca if ca.is_absolute() else base_dir / ca))
    nodes = []
    for i, node in enumerate(fed.nodes):
        where = f"federation.nodes[{i}]."
        token = _read_secret(where + "token", node.token, where + "token_file", node.token_file, base_dir,
                             "the node's shared secret")
        nodes.append(replace(node, token=token, token_file=""))
    fed = replace(fed, nodes=tuple(nodes))
    if fed.dealer_address or fed.dealer_token or fed.dealer_token_file:
        token = _read_secret("federation.dealer_token", fed.dealer_token, "federation.dealer_token_file",
                             fed.dealer_token_file, base_dir, "the dealer's shared secret")
        fed = replace(fed, dealer_token=token, dealer_token_file="")
    return fed


def _read_secret(key: str, token: str, file_key: str, token_file: str, base_dir: Path, what: str) -> str:
    if token and token_file:
        raise ConfigError(f"{key}: give {key.rsplit('.', 1)[-1]} or {file_key.rsplit('.', 1)[-1]}, not both")
    if token_file:
        path = Path(token_file)
        path = path if path.is_absolute() else base_dir / path
        try:
            token = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        except OSError as exc:
            raise ConfigError(f"{file_key}: cannot read {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"{key}: missing; give {what} as {key.rsplit('.', 1)[-1]} or {file_key.rsplit('.', 1)[-1]}")
    if len(token.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{key}: the secret has {len(token.encode('utf-8'))} bytes; use at least {MIN_SECRET_BYTES} "
            "(make one with `openssl rand -hex 32`)"
        )
    return token


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_address(key: str, address: str, who: str, tls_ca: str) -> None:
    url = urlparse(address)
    if url.scheme not in ("ws", "wss") or not url.hostname or url.port is None:
        raise ConfigError(f"{key}: {address!r} must look like ws://HOST:PORT or wss://HOST:PORT")
    if url.scheme == "wss" and not tls_ca:
        raise ConfigError(
            f"federation.tls_ca: missing; {who} is reached over wss://, so give the CA certificate that signed its "
            "certificate"
        )


def _check_cross(cfg: Config, *, need_nodes: bool) -> None:
    """Checks that involve more than one key."""
    fed, train, data = cfg.federation, cfg.training, cfg.data
    if need_nodes:
        if not fed.nodes:
            raise ConfigError("federation.nodes: missing; add one [[federation.nodes]] table per node")
        names = [n.name for n in fed.nodes]
        for i, node in enumerate(fed.nodes):
            if not node.name or not set(node.name) <= _NAME_CHARS or len(node.name) > 64:
                raise ConfigError(f"federation.nodes[{i}].name: {node.name!r} must be 1-64 letters, digits, '-', '_' or '.'")
            if node.name in names[:i]:
                raise ConfigError(f"federation.nodes[{i}].name: {node.name!r} is used twice; node names must be unique")
            _check_address(f"federation.nodes[{i}].address", node.address, f"node {node.name}", fed.tls_ca)
        if fed.min_nodes > len(fed.nodes):
            raise ConfigError(
                f"federation.min_nodes: {fed.min_nodes} is more than the {len(fed.nodes)} configured nodes"
            )
        dealer = cfg.aggregation.secure and cfg.aggregation.masking == "dealer"
        if dealer and not fed.dealer_address:
            raise ConfigError(
                "federation.dealer_address: missing; aggregation.masking = 'dealer' needs a dealer (start one with "
                "`primia dealer --port 8790 --token-file dealer.key`) or use masking = 'pairwise'"
            )
        if fed.dealer_address:
            if not dealer:
                raise ConfigError(
                    "federation.dealer_address: only used with aggregation.secure = true and masking = 'dealer'; "
                    "remove it or set aggregation.masking = 'dealer'"
                )
            _check_address("federation.dealer_address", fed.dealer_address, "the dealer", fed.tls_ca)
        if cfg.aggregation.secure and len(fed.nodes) < 2:
            raise ConfigError(
                "aggregation.secure: needs at least two nodes (the sum of one update is that update); "
                "add a node or set aggregation.secure = false"
            )
    if len(train.betas) != 2 or not all(0.0 <= b < 1.0 for b in train.betas):
        raise ConfigError(f"training.betas: expected two numbers in [0, 1), got {list(train.betas)}")
    if train.nesterov and (train.optimizer != "sgd" or train.momentum == 0.0):
        raise ConfigError("training.nesterov: needs optimizer = 'sgd' and momentum > 0")
    for key in ("mean", "std"):
        values = getattr(data, key)
        if len(values) not in (1, 3):
            raise ConfigError(f"data.{key}: expected 1 value (all channels) or 3 (RGB), got {len(values)}")
    if any(s <= 0 for s in data.std):
        raise ConfigError(f"data.std: every value must be positive, got {list(data.std)}")
    agg = cfg.aggregation
    if agg.masking == "dealer" and agg.neighbours:
        raise ConfigError(
            "aggregation.neighbours: pair masks are not used with masking = 'dealer'; remove it or set masking = 'pairwise'"
        )
    if agg.neighbours == 1:
        raise ConfigError(
            "aggregation.neighbours: 1 would pair the nodes off without connecting them (the hub would learn "
            "the sum of each pair); use 0 (every node masks with every other) or at least 2"
        )
    if agg.secure and agg.frac_bits > agg.ring_bits - 8:
        raise ConfigError(
            f"aggregation.frac_bits: {agg.frac_bits} leaves too little integer range in a {agg.ring_bits}-bit ring; "
            f"use at most {agg.ring_bits - 8} or set aggregation.ring_bits = 64"
        )
    check_model_name(cfg.model.name, key="model.name")
    if data.augmentations:
        build_augmentations(data.augmentations, input_size=data.input_size, channels=data.channels or 1)
