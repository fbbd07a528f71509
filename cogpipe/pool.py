"""Run a function over many files in worker processes, each call under a time limit.

Video files are hostile input: a crafted or broken file can hang a demuxer or crash a
decoder. Every per-file call of ingest and check goes through `map_files`, so a hang
costs one time limit and a crash costs one worker, never the stage. Workers are fresh
interpreters (safe to start from a threaded Prefect task), replaced after a kill.

    for index, value, error in map_files(probe, [(p,) for p in paths], workers=2, timeout=60):
        ...
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from cogpipe.errors import first_line

Outcome = tuple[int, Any, str]  # (index into the items, value or None, error or "")


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, 300)}" if str(e).strip() else type(e).__name__


def _serve(inbox: Connection, outbox: Connection, fn: Callable) -> None:
    """Worker loop: call `fn(*args)` for each (index, args) received until None arrives."""
    while True:
        job = inbox.recv()
        if job is None:
            return
        index, args = job
        try:
            outbox.send((index, fn(*args), ""))
        except Exception as e:
            outbox.send((index, None, _error_text(e)))


def _child() -> None:
    """Entry point of a worker interpreter: argv = module, function, in fd, out fd."""
    module, name, rfd, wfd = sys.argv[1:5]
    fn = getattr(importlib.import_module(module), name)
    _serve(Connection(int(rfd)), Connection(int(wfd)), fn)


class _Worker:
    """A fresh Python interpreter serving `fn` over two pipes.

    Not multiprocessing's spawn or forkserver: those re-import the caller's main script
    (a notebook cell or a script without a main guard would run again in every worker),
    and fork is unsafe from a threaded process such as a Prefect task runner.
    """

    def __init__(self, fn: Callable):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = "from cogpipe.pool import _child; _child()"
        argv = [
            sys.executable,
            "-c",
            code,
            fn.__module__,
            fn.__qualname__,
            str(to_child_r),
            str(from_child_w),
        ]
        self.process = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self.inbox = Connection(from_child_r)  # what the worker sends back
        self.outbox = Connection(to_child_w)
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()


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
        yield from _in_process(fn, items)
        return
    pending = list(range(len(items)))[::-1]  # popped from the end: first item first
    pool = [_Worker(fn) for _ in range(min(workers, len(items)))]
    try:
        while pending or any(w.job is not None for w in pool):
            for w in pool:
                if w.job is None and pending:
                    w.job = pending.pop()
                    w.deadline = time.monotonic() + timeout
                    w.outbox.send((w.job, items[w.job]))
            busy = [w for w in pool if w.job is not None]
            left = min(w.deadline for w in busy) - time.monotonic()
            ready = wait([w.inbox for w in busy], timeout=max(left, 0.0))
            for i, w in enumerate(pool):
                if w.job is not None and (outcome := _outcome(pool, i, ready, fn, timeout)):
                    yield outcome
    finally:
        _shut_down(pool)


def _in_process(fn: Callable, items: Sequence[tuple]) -> Iterator[Outcome]:
    """`map_files` with no workers: every call here, in order, without a time limit."""
    for i, args in enumerate(items):
        try:
            yield i, fn(*args), ""
        except Exception as e:
            yield i, None, _error_text(e)


def _outcome(pool: list[_Worker], i: int, ready: list, fn: Callable, timeout: float):
    """What busy worker `pool[i]` has to report: its answer, or a crash or a timeout (it
    is then replaced by a fresh worker); None while it is still within its time."""
    w = pool[i]
    if w.inbox in ready:
        try:
            index, value, error = w.inbox.recv()
        except (EOFError, OSError):
            code = w.process.wait()
            w.close()
            pool[i] = _Worker(fn)
            return w.job, None, f"worker crashed (exit code {code}) reading this file"
        w.job = None
        return index, value, error
    if time.monotonic() >= w.deadline:
        w.kill()
        pool[i] = _Worker(fn)
        return w.job, None, f"timed out after {timeout:g}s"
    return None


def _shut_down(pool: list[_Worker]) -> None:
    """Ask every worker to stop, then kill any that has not within 2 s."""
    for w in pool:
        try:
            w.outbox.send(None)
        except OSError:
            pass
    for w in pool:
        try:
            w.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()
        w.close()
