"""Running a party program: every computing party and the dealer, in one process."""

from __future__ import annotations

import threading
from typing import Any, Callable

from .comm import DEFAULT_TIMEOUT_S, Communicator, InProcessNetwork
from .context import Context, setup_dealer, setup_party
from .dealer import serve_dealer
from .errors import PeerFailure

__all__ = ["run_local"]


def run_local(
    program: Callable[..., Any],
    parties: int = 2,
    *,
    args: tuple = (),
    frac_bits: int = 16,
    truncation: str = "exact",
    comparison: str = "auto",
    comparison_bits: int = 64,
    comparison_slack_bits: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``program(ctx, *args)`` in every party, as threads, with a dealer thread.

    Returns each party's return value, in rank order.  If any party (or the
    dealer) fails, every other one is woken with a :class:`PeerFailure` and the
    first failure is re-raised here.
    """
    if parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {parties}")
    network = InProcessNetwork(parties + 1)
    results: list[Any] = [None] * parties
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def fail(who: int, exc: BaseException) -> None:
        with lock:
            errors.append((who, exc))
        network.abort(f"{'dealer' if who == parties else f'party {who}'} failed: {exc!r}")

    def party(rank: int) -> None:
        try:
            comm = Communicator(rank, parties, network.endpoint(rank), timeout_s=timeout_s)
            ctx: Context = setup_party(
                comm, frac_bits=frac_bits, truncation=truncation,
                comparison=comparison, comparison_bits=comparison_bits,
                comparison_slack_bits=comparison_slack_bits,
            )
            results[rank] = program(ctx, *args)
            ctx.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            fail(rank, exc)

    def dealer() -> None:
        try:
            comm = Communicator(parties, parties, network.endpoint(parties), timeout_s=timeout_s)
            serve_dealer(comm, setup_dealer(comm))
        except BaseException as exc:  # noqa: BLE001
            fail(parties, exc)

    threads = [threading.Thread(target=party, args=(r,), name=f"primia-party-{r}") for r in range(parties)]
    threads.append(threading.Thread(target=dealer, name="primia-dealer"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        # The root cause is the first error that is not a consequence of another's failure.
        root = next((e for _, e in errors if not isinstance(e, PeerFailure)), errors[0][1])
        raise root
    return results
