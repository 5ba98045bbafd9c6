"""Errors of federated learning, each under the project-wide root in :mod:`mpc.errors`.

    PrimiaError
    ├── ConfigError
    │   ├── DataFolderError    a node's image folder has problems (each one named)
    │   ├── ResumeError        a checkpoint cannot continue this configuration
    │   └── RunRefused         a node refuses the run the hub asks for (its own policy)
    ├── ProtocolError
    │   └── InconsistentUpdate a node's update does not fit the agreed model layout
    ├── PeerFailure
    │   └── NodeDropped        a node disconnected or timed out, at a named stage
    └── RoundFailed            a round could not complete
        └── TooFewNodes        fewer than ``min_nodes`` nodes remain

Every error carries its fields and builds its message from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpc.errors import ConfigError, PeerFailure, PrimiaError, ProtocolError

__all__ = [
    "DataProblem",
    "DataFolderError",
    "ResumeError",
    "RunRefused",
    "InconsistentUpdate",
    "NodeDropped",
    "RoundFailed",
    "TooFewNodes",
]


@dataclass(frozen=True)
class DataProblem:
    """One finding of the data-folder check.

    ``severity`` is ``"error"`` (the node refuses to start) or ``"warning"``
    (the node starts and handles it, e.g. by resizing).
    """

    severity: str
    what: str
    fix: str
    paths: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(self.paths[:5])
        more = f" and {len(self.paths) - 5} more" if len(self.paths) > 5 else ""
        where = f" ({shown}{more})" if self.paths else ""
        return f"{self.severity}: {self.what}{where}; {self.fix}"


class DataFolderError(ConfigError):
    """The data folder cannot be used; ``problems`` lists every finding."""

    def __init__(self, folder: str, problems: list[DataProblem]):
        self.folder = folder
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"data folder {folder} has {len(problems)} problem(s):\n{lines}")


class ResumeError(ConfigError):
    """``--resume`` was asked for but the checkpoint does not fit the configuration."""


class RunRefused(ConfigError):
    """The node's own policy refuses the run the hub configured (e.g. updates in the clear)."""


class InconsistentUpdate(ProtocolError):
    """A node sent an update whose size, dtype or values do not fit the agreed layout."""


class NodeDropped(PeerFailure):
    """A node disconnected or stopped answering during ``stage`` of a round."""

    def __init__(self, node: str, stage: str, reason: str):
        self.node = node
        self.stage = stage
        super().__init__(node, f"dropped during {stage}: {reason}")


class RoundFailed(PrimiaError):
    """Round ``round`` (0: the set-up) stopped at ``stage``; the global model keeps the previous round's weights.

    ``advice`` (set by the hub, which knows whether a checkpoint exists) says how to go on.
    """

    def __init__(self, round: int, stage: str, reason: str):
        self.round = round
        self.stage = stage
        self.reason = reason
        self.advice = ""
        what = f"round {round}" if round else "set-up"
        super().__init__(f"{what} failed during {stage}: {reason}")

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; {self.advice}" if self.advice else text


class TooFewNodes(RoundFailed):
    """Fewer nodes are left in a round than it needs (``needed``, for the reason ``rule`` names)."""

    def __init__(self, round: int, stage: str, remaining: list[str], needed: int, rule: str | None = None):
        self.remaining = remaining
        self.needed = needed
        rule = rule or f"federation.min_nodes = {needed}"
        super().__init__(
            round,
            stage,
            f"only {len(remaining)} node(s) remain ({', '.join(remaining) or 'none'}) but the round needs "
            f"{needed} ({rule}); start the missing nodes (they rejoin on their own), or lower federation.min_nodes",
        )
