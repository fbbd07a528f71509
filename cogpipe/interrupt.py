"""Ctrl-C for the long commands (`run`, `demo`, the stage commands, `generate`, `sweep`):
one SIGINT stops within seconds, prints one line saying what was committed and how to
resume, and exits 130 with no traceback and no process of ours left behind.

How: the first SIGINT raises KeyboardInterrupt in the main thread, as Python does, so the
code running unwinds (Prefect records the flow run as Crashed on the way); the command's
`Guard` then prints its line, stops every child process (SIGTERM, SIGKILL after
`STOP_GRACE_S`: training ranks, the temporary Prefect server) and leaves with `os._exit`,
so no thread pool or Prefect background thread can keep the process alive. Code that
swallows the KeyboardInterrupt, or sits in a long native call, does not delay it beyond
`GRACE_S`: a watchdog thread does the same then. A second Ctrl-C exits at once.

    with Guard(lambda: "interrupted; train at step 100 (checkpoint-000100); run again to resume"):
        run_the_command()
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import psutil

GRACE_S = 4.0  # after a Ctrl-C, how long the command gets to unwind before it is cut short
STOP_GRACE_S = 3.0  # how long child processes get after SIGTERM before SIGKILL
EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for a process ended by Ctrl-C
RESUME = "run again to resume"


class Guard:
    """Turns a Ctrl-C inside the `with` block into `summary()`'s line on stderr (and at the
    end of `log_file`) and exit code 130. `summary` is called once, after the interrupt,
    and should only read."""

    def __init__(
        self, summary: Callable[[], str], log_file: Path | None = None, grace_s: float = GRACE_S
    ):
        self.summary = summary
        self.log_file = log_file
        self.grace_s = grace_s
        self.requested: float | None = None  # monotonic time of the first Ctrl-C
        self._finishing = threading.Event()
        self._lock = threading.Lock()
        self._previous = None

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        # Whatever the interrupt turned into on its way out (Prefect's crash, a rank's
        # error), or nothing if some code swallowed it: the run was interrupted.
        if isinstance(error, KeyboardInterrupt) or self.requested is not None:
            self.finish()

    def _on_sigint(self, signum, frame) -> None:
        if self.requested is not None or self._finishing.is_set():
            _signal(descendants(os.getpid()), signal.SIGKILL)  # the second Ctrl-C: no waiting
            _exit_now()
        self.requested = time.monotonic()
        threading.Thread(target=self._watchdog, daemon=True, name="cogpipe-interrupt").start()
        raise KeyboardInterrupt

    def _watchdog(self) -> None:
        time.sleep(self.grace_s)
        self.finish()

    def finish(self) -> NoReturn:
        """Print the line, stop every child process, exit 130 (once, whoever calls first)."""
        with self._lock:
            self._finishing.set()
            line = self._line()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            self._log(line)
            stop_children()
            _exit_now()

    def _log(self, line: str) -> None:
        if self.log_file is not None:
            with contextlib.suppress(OSError), open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {line}\n")

    def _line(self) -> str:
        try:
            return self.summary()
        except Exception as e:  # noqa: BLE001 - the exit must happen whatever the disk says
            return f"interrupted ({type(e).__name__} while reading what was committed); {RESUME}"


def _exit_now() -> NoReturn:
    """Flush the log files and leave, skipping interpreter shutdown (thread joins)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            with contextlib.suppress(Exception):
                handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_CODE)


def stop_children(grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process below this one, SIGKILL those still alive `grace_s` later
    (at once those that ignore SIGTERM, such as multiprocessing's resource tracker)."""
    pids = descendants(os.getpid())
    deaf = [p for p in pids if ignores(p, signal.SIGTERM)]
    _signal(deaf, signal.SIGKILL)
    _signal([p for p in pids if p not in deaf], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    _signal([p for p in pids if alive(p)], signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, whatever its session; none when `pid` is gone. psutil
    also leaves out a process whose pid was reused (started before `pid`)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def ignores(pid: int, sig: int) -> bool:
    """Whether process `pid` ignores `sig` (its SigIgn mask in /proc: psutil does not read
    signal masks)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def interrupted(what: str) -> str:
    """'interrupted; <what>; run again to resume'."""
    return f"interrupted; {what}; {RESUME}"
