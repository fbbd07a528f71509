"""Targets for `cogpipe.distributed.launch` in tests: light to import in a spawned process."""

from __future__ import annotations

import os
import time


def report(rank: int, progress, steps: int) -> dict:
    """Rank 0 reports `steps` steps; every rank returns what it was told it is."""
    if rank == 0:
        for step in range(1, steps + 1):
            progress(step, steps, f"step {step}")
    return {"rank": rank, "world": os.environ["WORLD_SIZE"], "master": os.environ["MASTER_ADDR"]}


def fail_on(rank: int, progress, bad_rank: int) -> int:
    """`bad_rank` raises; the others wait as if in a collective with it."""
    if rank == bad_rank:
        raise ValueError("no usable samples on this rank")
    time.sleep(120)
    return rank
