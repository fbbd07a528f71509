"""Run a function over many files in worker processes, each call under a time limit.

Video files are hostile input: a crafted or broken file can hang a demuxer or crash a
decoder. Every per-file call of ingest and check goes through `map_files`, so a hang
costs one time limit and a crash costs one worker, never the stage. Workers come from
a forkserver (safe to start from a threaded Prefect task) and are replaced after a kill.

    for index, value, error in map_files(probe, [(p,) for p in paths], workers=2, timeout=60):
        ...
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

Outcome = tuple[int, Any, str]  # (index into the items, value or None, error or "")


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _serve(conn: Connection, fn: Callable) -> None:
    """Worker loop: call `fn(*args)` for each (index, args) received until None arrives."""
    while True:
        job = conn.recv()
        if job is None:
            return
        index, args = job
        try:
            conn.send((index, fn(*args), ""))
        except Exception as e:
            conn.send((index, None, _error_text(e)))


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def map_files(
    fn: Callable,
    items: Sequence[tuple],
    workers: int,
    timeout: float,
) -> Iterator[Outcome]:
    """Yield `(index, fn(*items[index]), "")` for every item, in completion order.

    A call that raises yields `(index, None, "<Type>: <message>")`; one that runs longer
    than `timeout` seconds, or kills its worker, yields `(index, None, "timed out ...")` or
    `(index, None, "worker crashed ...")`. `fn` must be importable (a module-level function).
    With `workers=0` calls run in this process, without a time limit (for debugging).
    """
    if workers <= 0:
        for i, args in enumerate(items):
            try:
                yield i, fn(*args), ""
            except Exception as e:
                yield i, None, _error_text(e)
        return

    ctx = mp.get_context("forkserver")
    pending = list(range(len(items)))[::-1]  # popped from the end: first item first
    pool = [_Worker(ctx, fn) for _ in range(min(workers, len(items)))]
    try:
        while pending or any(w.job is not None for w in pool):
            for w in pool:
                if w.job is None and pending:
                    w.job = pending.pop()
                    w.deadline = time.monotonic() + timeout
                    w.conn.send((w.job, items[w.job]))
            busy = [w for w in pool if w.job is not None]
            left = min(w.deadline for w in busy) - time.monotonic()
            ready = wait([w.conn for w in busy], timeout=max(left, 0.0))
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        index, value, error = w.conn.recv()
                    except (EOFError, OSError):
                        w.process.join()
                        code = w.process.exitcode
                        yield w.job, None, f"worker crashed (exit code {code}) reading this file"
                        w.kill()
                        pool[i] = _Worker(ctx, fn)
                        continue
                    w.job = None
                    yield index, value, error
                elif time.monotonic() >= w.deadline:
                    yield w.job, None, f"timed out after {timeout:g}s"
                    w.kill()
                    pool[i] = _Worker(ctx, fn)
    finally:
        for w in pool:
            if w.process.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            w.process.join(timeout=1)
            if w.process.is_alive():
                w.kill()
