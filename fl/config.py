"""The federation's configuration: one TOML file, every key checked.

A configuration has six tables::

    [run]          name, rounds, seed, output directory, evaluation cadence
    [federation]   where the hub listens, its key and TLS, the nodes (name, public key), dropout policy,
                   timeouts and limits
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
import ipaddress
import hashlib
import json
import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from mpc.errors import ConfigError

from .augment import build_augmentations
from .identity import NAME_CHARS, RESERVED_NAMES, check_name, fingerprint_text, load_private_key, load_public_key
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
    """One data owner's node: its name and the public key it proves itself with."""

    name: str = _key("unique node name (letters, digits, '-', '_', '.'); the node's --name, used in metrics and logs")
    public_key_file: str = _key("the node's public key, NAME.pub from `primia keygen --name NAME` (relative to this "
                                "file)")


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
    output_dir: str = _key("checkpoints, report and plots go here (relative to this file; default runs/<name> in "
                           "the current folder)", default="")
    evaluate_every: int = _key(
        "evaluate the global model every this many rounds and after the last (0: never)", default=1, lo=0
    )


@dataclass(frozen=True)
class FederationConfig:
    listen: str = _key("HOST:PORT the hub listens on for its nodes (and the dealer); port 0 picks a free one "
                       "(see primia train --port-file)", default="127.0.0.1:8780")
    key_file: str = _key("the hub's private key, hub.key from `primia keygen --name hub` (relative to this file)",
                         default="")
    nodes: tuple[NodeEntry, ...] = _key("the nodes, as [[federation.nodes]] tables", default=())
    dealer_public_key_file: str = _key(
        "the dealer's public key (dealer.pub) for aggregation.masking = 'dealer'", default="")
    tls_cert: str = _key("certificate (PEM) the hub serves wss:// with; required off loopback", default="")
    tls_key: str = _key("private key (PEM) of tls_cert", default="")
    allow_plaintext: bool = _key("listen without TLS on a non-loopback address (logged as a warning at every "
                                 "start; only on a network you trust)", default=False)
    min_nodes: int = _key("fewest nodes a round may complete with (0 = 2, or 1 for a one-node federation)", default=0, lo=0)
    on_dropout: str = _key(
        "'continue' the round with the remaining nodes, or 'fail' it", default="continue", choices=("continue", "fail")
    )
    connect_timeout_s: float = _key("seconds the hub waits for min_nodes nodes to connect (at start-up, and before "
                                    "a round that lacks them)", default=300.0, lo=0.1)
    start_grace_s: float = _key("once min_nodes nodes are connected, seconds to wait for the rest before round 1",
                                default=10.0, lo=0.0)
    train_timeout_s: float = _key("seconds a node may take to train one round", default=3600.0, lo=0.1)
    reply_timeout_s: float = _key("seconds a node may take for any other reply", default=300.0, lo=0.1)
    max_message_mib: int = _key("largest message accepted, in MiB (websockets max_size)", default=1024, lo=1, hi=65536)
    handshake_timeout_s: float = _key("seconds a connection may take to authenticate before it is closed",
                                      default=20.0, lo=0.1)
    max_unauthenticated: int = _key("connections allowed to authenticate at once; more are turned away (1013) "
                                    "until some finish", default=64, lo=1, hi=100_000)


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

    @property
    def listen(self) -> tuple[str, int]:
        """(host, port) of ``federation.listen`` (checked when the config was read)."""
        return parse_listen(self.federation.listen, "federation.listen")

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
    base = base_dir or Path(".")
    _check_node_names(cfg.federation)
    cfg = replace(cfg, federation=_resolve_files(cfg.federation, base))
    if cfg.run.output_dir and not Path(cfg.run.output_dir).expanduser().is_absolute():
        cfg = replace(cfg, run=replace(cfg.run, output_dir=str(base / Path(cfg.run.output_dir).expanduser())))
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
        if key not in known and key in _REMOVED and prefix.startswith("federation"):
            raise ConfigError(f"{prefix}{key}: no longer used; {_REMOVED[key]} (see docs/federation.md)")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


_SECRET_WORDS = ("token", "secret", "password", "passphrase")
#: keys of earlier versions, and what replaced them
_REMOVED = {
    "address": "nodes dial the hub now (primia node --hub ws://HUB:PORT): remove it",
    "token": "nodes prove themselves with key pairs now: replace it with public_key_file (primia keygen)",
    "token_file": "nodes prove themselves with key pairs now: replace it with public_key_file (primia keygen)",
    "tls_ca": "the hub serves TLS now: set tls_cert and tls_key here, and give nodes --tls-ca",
    "dealer_address": "the dealer dials the hub now: remove it and set dealer_public_key_file",
    "dealer_token": "the dealer proves itself with a key pair now: set dealer_public_key_file",
    "dealer_token_file": "the dealer proves itself with a key pair now: set dealer_public_key_file",
}


def _shown(key: str, value: Any) -> str:
    """A value as error messages may show it: never a secret, never a whole table."""
    if any(word in key.rsplit(".", 1)[-1].lower() for word in _SECRET_WORDS):
        return "<hidden>"
    if isinstance(value, Mapping):
        return f"a table (keys: {', '.join(map(str, list(value)[:8]))})"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        return f"a list of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {_shown(key, value)}")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {_shown(key, value)}")
    return float(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_shown(key, value)}")
    return value


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_shown(key, value)}")
    return value


def _as_floats(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a number or a non-empty list of numbers, got {_shown(key, value)}")
    return tuple(_as_float(f"{key}[{i}]", v) for i, v in enumerate(value))


def _as_nodes(key: str, value: Any) -> tuple[NodeEntry, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected [[{key}]] tables (one per node, each with name and public_key_file), "
                          f"got {_shown(key, value)}")
    nodes = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a table with name and public_key_file, got {_shown(where, item)}")
        nodes.append(_parse_section(where, NodeEntry, item, prefix=f"{where}."))
    return tuple(nodes)


def _as_augmentations(key: str, value: Any) -> tuple[Augmentation, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected [[{key}]] tables, got {_shown(key, value)}")
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
    raise ConfigError(f"{key}: transform arguments must be numbers, strings, booleans or lists, got "
                      f"{_shown(key, value)}")


def _parse_section(name: str, cls: type, table: Any, *, prefix: str | None = None) -> Any:
    prefix = f"{name}." if prefix is None else prefix
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name}: expected a table, got {_shown(name, table)}")
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
            raise ConfigError(f"{dotted}: {_shown(dotted, checked)} is not allowed; choose one of {allowed}")
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


_LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost): plaintext is allowed there."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: Any, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), port in 0..65535.

    Raises:
        ConfigError: naming ``key``, what is wrong and what it should look like.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected \"HOST:PORT\" (e.g. \"0.0.0.0:8780\"), got {value!r:.80}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}: {value!r:.80} must look like HOST:PORT, e.g. \"0.0.0.0:8780\" or \"[::1]:8780\"")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(f"{key}: port {number} is outside 0..65535 (0 picks a free port)")
    return host, number


def _check_node_names(fed: FederationConfig) -> None:
    names = [n.name for n in fed.nodes]
    for i, node in enumerate(fed.nodes):
        check_name(node.name, f"federation.nodes[{i}].name")
        if node.name in RESERVED_NAMES:
            raise ConfigError(f"federation.nodes[{i}].name: {node.name!r} is reserved for the {node.name}; "
                              "choose another name")
        if node.name in names[:i]:
            raise ConfigError(f"federation.nodes[{i}].name: {node.name!r} is used twice; node names must be unique")


def _resolve_files(fed: FederationConfig, base_dir: Path) -> FederationConfig:
    """Paths made absolute (relative to the config file) and every key file read once, so that a missing or
    wrong file is named now, not when the first node connects."""

    def path(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base_dir / p)

    updates: dict[str, Any] = {}
    if not fed.key_file:
        raise ConfigError("federation.key_file: missing; make the hub's key pair with `primia keygen --name hub "
                          "--out keys` and set key_file = \"keys/hub.key\"")
    for key in ("key_file", "tls_cert", "tls_key", "dealer_public_key_file"):
        if getattr(fed, key):
            updates[key] = path(getattr(fed, key))
    load_private_key(updates["key_file"], what="federation.key_file")
    nodes, seen = [], {}
    for i, node in enumerate(fed.nodes):
        where = f"federation.nodes[{i}]"
        public = load_public_key(path(node.public_key_file), what=f"{where}.public_key_file")
        printed = fingerprint_text(public)
        if printed in seen:
            raise ConfigError(f"{where}.public_key_file: the same key as {seen[printed]}: one node is listed twice "
                              "under two names; give each node its own key pair (`primia keygen --name NAME`)")
        seen[printed] = f"federation.nodes[{i}] ({node.name!r})"
        nodes.append(replace(node, public_key_file=path(node.public_key_file)))
    updates["nodes"] = tuple(nodes)
    if "dealer_public_key_file" in updates:
        load_public_key(updates["dealer_public_key_file"], what="federation.dealer_public_key_file")
    return replace(fed, **updates)


def _check_run_name(name: str) -> None:
    """The default output folder is runs/<name>: the name must stay inside runs/."""
    if not name or not set(name) <= NAME_CHARS or name.startswith(".") or len(name) > 128:
        raise ConfigError(f"run.name: {name!r:.80} must be letters, digits, '-', '_' or '.' (not starting with '.'), "
                          "since it names the folder runs/<name>; set run.output_dir for any other place")


def _check_cross(cfg: Config, *, need_nodes: bool) -> None:
    """Checks that involve more than one key."""
    fed, train, data = cfg.federation, cfg.training, cfg.data
    if need_nodes:
        if not fed.nodes:
            raise ConfigError("federation.nodes: missing; add one [[federation.nodes]] table (name, public_key_file) "
                              "per node")
        host, _ = parse_listen(fed.listen, "federation.listen")
        if bool(fed.tls_cert) != bool(fed.tls_key):
            raise ConfigError("federation.tls_cert, tls_key: give both (the certificate and its private key) or neither")
        if not fed.tls_cert and not is_loopback(host) and not fed.allow_plaintext:
            raise ConfigError(
                f"federation.listen: {host} is reachable from other machines, so the hub needs TLS: set "
                "federation.tls_cert and tls_key (docs/federation.md shows how to make them); without TLS an "
                "on-path attacker could read and rewrite every message.  Set allow_plaintext = true only on a "
                "network you trust."
            )
        if fed.min_nodes > len(fed.nodes):
            raise ConfigError(
                f"federation.min_nodes: {fed.min_nodes} is more than the {len(fed.nodes)} configured nodes"
            )
        dealer = cfg.aggregation.secure and cfg.aggregation.masking == "dealer"
        if dealer and not fed.dealer_public_key_file:
            raise ConfigError(
                "federation.dealer_public_key_file: missing; aggregation.masking = 'dealer' needs a dealer: make its "
                "keys with `primia keygen --name dealer`, set dealer_public_key_file = \"keys/dealer.pub\" and start "
                "`primia dealer` (or use masking = 'pairwise')"
            )
        if fed.dealer_public_key_file and not dealer:
            raise ConfigError(
                "federation.dealer_public_key_file: only used with aggregation.secure = true and masking = 'dealer'; "
                "remove it or set aggregation.masking = 'dealer'"
            )
        if cfg.aggregation.secure and len(fed.nodes) < 2:
            raise ConfigError(
                "aggregation.secure: needs at least two nodes (the sum of one update is that update); "
                "add a node or set aggregation.secure = false"
            )
        if cfg.aggregation.secure and fed.min_nodes == 1:
            raise ConfigError(
                "federation.min_nodes: 1 is not possible with secure aggregation, which sums at least two updates "
                "(a sum of one is that update); set min_nodes = 2 or more, or aggregation.secure = false"
            )
    if len(train.betas) != 2 or not all(0.0 <= b < 1.0 for b in train.betas):
        raise ConfigError(f"training.betas: expected two numbers in [0, 1), got {list(train.betas)}")
    if train.nesterov and (train.optimizer != "sgd" or train.momentum == 0.0):
        raise ConfigError("training.nesterov: needs optimizer = 'sgd' and momentum > 0")
    for key in ("mean", "std"):
        values = getattr(data, key)
        if len(values) not in (1, 3):
            raise ConfigError(f"data.{key}: expected 1 value (all channels) or 3 (RGB), got {len(values)}")
        if data.channels == 1 and len(values) == 3:
            raise ConfigError(f"data.{key}: 3 values (RGB) but data.channels = 1 (grayscale); give one value, or "
                              "set data.channels = 3")
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
    if not cfg.run.output_dir:
        _check_run_name(cfg.run.name)
    if data.augmentations:
        build_augmentations(data.augmentations, input_size=data.input_size, channels=data.channels or 1)
