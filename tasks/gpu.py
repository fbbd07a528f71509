"""Holding a GPU worker's slots while a flow run uses its GPUs: one job per GPU.

The slots are global concurrency limits of one slot each (cogpipe.gpus.slot_names),
created by `cogpipe worker` / `cogpipe serve`, acquired with `strict=True` so a worker
whose limits were never created fails loudly, and held as leases the run renews: when a
worker dies, its slots free themselves `LEASE_S` seconds later (on a server `cogpipe serve`
started, across its restarts too: cogpipe_tasks.lease_storage). The lease names its flow run
as holder, so the server's lease storage says who holds a slot.

A run whose slots are taken says so in its log, naming the slot, and again every
`LOG_EVERY_S` seconds while it waits: Prefect's own wait is silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator

from cogpipe.gpus import SLOTS_ENV

LEASE_S = 60  # the server's minimum lease
FIRST_LOG_S = 2.0  # a run still without its slots this long says why
LOG_EVERY_S = 60.0  # and says it again this often while it waits


@contextlib.contextmanager
def gpu_slots(
    first_log_s: float = FIRST_LOG_S, log_every_s: float = LOG_EVERY_S
) -> Iterator[list[str]]:
    """Hold every GPU slot of the worker that started this flow run; a no-op outside a
    `cogpipe worker` (the CLI, tests, a CPU worker). Waits for slots another run holds,
    logging which.

    Raises:
        ConcurrencySlotAcquisitionError: a slot's limit does not exist (a worker started
            without `cogpipe worker`, whose limits were never created).
    """
    names = [n for n in os.environ.get(SLOTS_ENV, "").split(",") if n]
    if not names:
        yield []
        return
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as held:
        with _WaitLog(names, first_log_s, log_every_s):
            # Prefect waits for taken slots silently, asking again when the server says to
            held.enter_context(
                concurrency(names, occupy=1, strict=True, lease_duration=LEASE_S, holder=_holder())
            )
        yield names


class _WaitLog:
    """While a run acquires its slots: after `first_s`, and every `every_s` after that, log
    the slots that are taken (nothing while none is: the server is only slow)."""

    def __init__(self, names: list[str], first_s: float, every_s: float):
        self.names, self.first_s, self.every_s = names, first_s, every_s
        self.logger, self.done = _logger(), threading.Event()
        self.started, self.logged = time.monotonic(), False
        context = contextvars.copy_context()  # this run's settings (its API) and logger
        self.thread = threading.Thread(
            target=context.run, args=(self._run,), name="gpu-slot-wait-log", daemon=True
        )

    def __enter__(self) -> _WaitLog:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()
        if self.logged and exc_info[0] is None:
            waited = time.monotonic() - self.started
            self.logger.info("got GPU slot %s after %.0f s", ", ".join(self.names), waited)

    def _run(self) -> None:
        pause = self.first_s
        while not self.done.wait(pause):
            reason = _wait_reason(self.names)
            if self.done.is_set() or reason is None:
                pause = self.first_s
                continue
            waited = time.monotonic() - self.started
            if self.logged:
                self.logger.warning("still waiting after %.0f s for GPU slot %s", waited, reason)
            else:
                self.logger.info("waiting for GPU slot %s", reason)
            self.logged, pause = True, self.every_s


def _wait_reason(names: list[str]) -> str | None:
    """Which of `names` are taken ("gpu:host:0 (1/1 taken)") and what frees them; None when
    none is."""
    taken = [
        f"{name} ({limit.active_slots}/{limit.limit} taken)"
        for name, limit in _limits(names)
        if limit is not None and limit.active_slots >= limit.limit
    ]
    if not taken:
        return None
    return (
        f"{', '.join(taken)}: held by another run, or by a run that died (its lease "
        f"expires {LEASE_S} s after its last renewal; a slot a restarted server forgot is "
        "freed when `cogpipe serve` starts)"
    )


def _limits(names: list[str]) -> list[tuple[str, object]]:
    """(name, the server's limit or None when it cannot be read) for each of `names`."""
    from prefect.client.orchestration import get_client

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found.append((name, client.read_global_concurrency_limit_by_name(name)))
            except Exception:
                found.append((name, None))
    return found


def _holder():
    """This flow run as the lease's holder (None outside a flow run)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=ctx.flow_run.id)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines reach the UI), else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
