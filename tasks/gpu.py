"""Holding a GPU worker's slots while a flow run uses its GPUs: one job per GPU.

The slots are global concurrency limits of one slot each (cogpipe.gpus.slot_names),
created by `cogpipe worker` / `cogpipe serve`, acquired with `strict=True` so a worker
whose limits were never created fails loudly, and held as leases the run renews: when a
worker dies, its slots free themselves `LEASE_S` seconds later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cogpipe.gpus import SLOTS_ENV

LEASE_S = 60  # the server's minimum lease


@contextlib.contextmanager
def gpu_slots() -> Iterator[list[str]]:
    """Hold every GPU slot of the worker that started this flow run; a no-op outside a
    `cogpipe worker` (the CLI, tests, a CPU worker).

    Raises:
        ConcurrencySlotAcquisitionError: a slot's limit does not exist (a worker started
            without `cogpipe worker`, whose limits were never created).
    """
    names = [n for n in os.environ.get(SLOTS_ENV, "").split(",") if n]
    if not names:
        yield []
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(names, occupy=1, strict=True, lease_duration=LEASE_S):
        yield names
