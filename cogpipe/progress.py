"""Progress a person can watch: one rate/ETA implementation and the console display.

The library reports progress as `(done, total, note)` calls (`workspace.Progress`). This
module turns them into text, once, for everyone who shows it:

    rate = Rate()                                 # per stage; the first report is the baseline
    rate.line("caption", 120, 2982, "shard 0 part 4")
    # 'caption: 120/2,982 (4%), 1,840 clips/h, ETA 1h33m, shard 0 part 4'

    with show(console_display()) as display:      # the CLI: a bar per stage on a terminal,
        run_stage(cfg, "caption", progress=display.stage("caption"))  # else plain lines

`tasks/common.ProgressArtifact` publishes the same text as a Prefect progress artifact and
also sends every report to the display `show` installed (`report`): `cogpipe run` runs its
flow in-process, so the stage tasks' reports reach the terminal of the person waiting.

On a terminal the display is a `rich` progress bar per stage on stderr (done/total, rate,
ETA and the stage's note: the loss for train). Log lines and prints go above the bars, so
no line is drawn over a half-drawn bar: while the display runs, `sys.stdout`/`sys.stderr`
and the logging handlers that write to them go through the display's console. Without a
terminal (a pipe, a log file) the display prints plain lines, the first and last of a stage
and one at most every `COGPIPE_PROGRESS_EVERY` seconds (default 30) between, so a log is
neither silent for hours nor flooded. A note starting "waiting for " is always a whole line
of its own. The rate counts only work done in this run: what a resumed run found committed
at its first report is the baseline, not speed.

No Prefect here: the library layer must import without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from cogpipe.config import ConfigError
from cogpipe.workspace import Progress

EVERY_ENV = "COGPIPE_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0
WAITING = "waiting for "  # a note that is a whole line, never skipped
REDRAW_S = 0.1  # a terminal's bars are redrawn at a report at most this often (else 4/s)
# What a stage counts, for its rate ("1,840 clips/h"); a shard's stage is named after it.
UNITS = {
    "ingest": "videos",
    "check": "videos",
    "caption": "clips",
    "recaption": "clips",
    "filter": "clips",
    "precompute": "shards",
    "train": "steps",
    "evaluate": "videos",
    "export-dataset": "clips",
    "sweep": "videos",
    "generate": "steps",
}


def unit_of(stage: str) -> str:
    """The unit a stage counts: 'caption-shard-2' counts what caption counts; '' if unknown."""
    return UNITS.get(stage) or UNITS.get(stage.split("-shard-")[0].split(" ")[0], "")


def format_eta(seconds: float | None) -> str:
    """Seconds left as a person reads them: '45s', '3m20s', '2h05m', '1d03h'; '?' unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(per_second: float, unit: str = "", per_hour: bool | None = None) -> str:
    """'1,840 clips/h' or '2.5 steps/s'; by default per hour below one a second."""
    unit = f" {unit}" if unit else ""
    if not (per_second < 1 if per_hour is None else per_hour):
        return f"{per_second:,.1f}{unit}/s"
    return f"{per_second * 3600:,.0f}{unit}/h"


class Rate:
    """Rate and ETA of one stage in this run.

    The first report sets the baseline (what a resumed run found committed) and the start:
    a run that resumes at 2,900 of 2,982 clips has done nothing yet, not 2,900 in a second.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started: float | None = None
        self.baseline = 0
        self.per_hour: bool | None = None  # the rate's unit: no flipping back and forth at 1/s

    def measure(self, done: int, total: int) -> tuple[float | None, float | None]:
        """(units per second in this run, seconds left); each None while unknown (nothing
        done in this run yet; a finished stage has 0 s left)."""
        now = self.clock()
        if self.started is None:
            self.started, self.baseline = now, done
        elapsed = now - self.started
        per_second = (
            (done - self.baseline) / elapsed if elapsed > 0 and done > self.baseline else None
        )
        if done >= total:
            return per_second, 0.0
        return per_second, (total - done) / per_second if per_second else None

    def parts(self, done: int, total: int, unit: str = "") -> tuple[str, str]:
        """('1,840 clips/h', 'ETA 1h33m') after a report of `done` of `total`; the rate is
        '' until this run has done something."""
        per_second, left = self.measure(done, total)
        if per_second is None:
            return "", f"ETA {format_eta(left)}"
        if self.per_hour is None or per_second >= 2 or per_second < 0.5:  # hysteresis
            self.per_hour = per_second < 1 if self.per_hour is None else per_second < 0.5
        return format_rate(per_second, unit, self.per_hour), f"ETA {format_eta(left)}"

    def line(
        self, stage: str, done: int, total: int, note: str = "", unit: str | None = None
    ) -> str:
        """'caption: 120/2,982 (4%), 1,840 clips/h, ETA 1h33m, shard 0 part 4' (`unit`:
        what the stage counts, default `unit_of(stage)`)."""
        rate, eta = self.parts(done, total, unit_of(stage) if unit is None else unit)
        percent = 100 * done // max(total, 1)
        parts = [f"{stage}: {done:,}/{total:,} ({percent}%)", rate, eta, note]
        return ", ".join(p for p in parts if p)


# --------------------------------------------------------------------------- displays


class Display:
    """Where progress goes: `report(stage, done, total, note)` from any thread."""

    units: dict[str, str]  # stage -> what it counts, where `unit_of` does not know

    def report(self, stage: str, done: int, total: int, note: str = "") -> None:
        raise NotImplementedError

    def stage(self, name: str, unit: str | None = None) -> Progress:
        """A library progress callback that reports as `name`, counting `unit` (default:
        `unit_of(name)`)."""
        if unit is not None:
            self.units[name] = unit
        return lambda done, total, note="": self.report(name, done, total, note)

    def unit(self, stage: str) -> str:
        return self.units.get(stage) or unit_of(stage)

    def start(self) -> None:
        """Begin showing (a terminal display takes over the screen's last lines)."""

    def stop(self) -> None:
        """End showing: every line written is whole."""


class PlainDisplay(Display):
    """Whole lines, for logs: a stage's first and last report and one every `every` seconds
    between; a waiting note always. Writes to `stream` (default: stderr when reporting)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream
        self.every = every_seconds() if every is None else every
        self.clock = clock
        self.rates: dict[str, Rate] = {}
        self.units = {}
        self.last: dict[str, float] = {}  # stage -> when its last line was written
        self.lock = threading.Lock()

    def report(self, stage: str, done: int, total: int, note: str = "") -> None:
        with self.lock:
            if stage not in self.rates:
                self.rates[stage] = Rate(self.clock)
            rate = self.rates[stage]
            line = rate.line(stage, done, total, note, self.unit(stage))
            now = self.clock()
            if note.startswith(WAITING):
                self._write(f"{stage}: {note}")
                return
            due = stage not in self.last or done >= total or now - self.last[stage] >= self.every
            if due:
                self.last[stage] = now
                self._write(line)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


class RichDisplay(Display):
    """A `rich` progress bar per stage on a terminal: done/total, rate, ETA and the note."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(file=stream or sys.stderr)
        self.bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            refresh_per_second=4,
            redirect_stdout=is_terminal(sys.stdout),
            redirect_stderr=True,
        )
        self.tasks: dict[str, tuple[int, Rate]] = {}
        self.units = {}
        self.lock = threading.Lock()
        self.drawn = 0.0  # when a report last redrew the bars

    def report(self, stage: str, done: int, total: int, note: str = "") -> None:
        with self.lock:
            if note.startswith(WAITING):  # above the bars, as a line of its own
                self.console.print(f"{stage}: {note}", highlight=False, markup=False)
                return
            if stage not in self.tasks:
                task = self.bars.add_task(_escape(stage), total=total, rate="", eta="", note="")
                self.tasks[stage] = (task, Rate())
            task, rate = self.tasks[stage]
            rate_text, eta = rate.parts(done, total, self.unit(stage))
            now = time.monotonic()  # a report is drawn now (every committed part shows),
            redraw = now - self.drawn >= REDRAW_S  # but a fast stage does not flood the screen
            self.drawn = now if redraw else self.drawn
            self.bars.update(
                task,
                completed=done,
                total=total,
                rate=rate_text,
                eta=eta,
                note=_escape(note[-48:]),
                refresh=redraw,
            )

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self.bars.stop()

    def proxy(self, original: TextIO) -> TextIO:
        """A stream whose whole lines print above the bars (for logging handlers)."""
        from rich.file_proxy import FileProxy

        class LinesAbove(FileProxy):
            @property
            def rich_proxied_file(self) -> TextIO:  # a rich Console unwraps a FileProxy: not this
                return self

        return LinesAbove(self.console, original)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def every_seconds() -> float:
    """`COGPIPE_PROGRESS_EVERY` (seconds between plain lines of a stage), default 30."""
    raw = os.environ.get(EVERY_ENV, "")
    try:
        return max(float(raw), 0.0) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        raise ConfigError(f"{EVERY_ENV}={raw!r}: not a number of seconds") from None


def is_terminal(stream: TextIO) -> bool:
    """A terminal that can redraw a line (not a pipe, a file or TERM=dumb)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def console_display(stream: TextIO | None = None) -> Display:
    """Bars on a terminal, plain periodic lines otherwise; on stderr by default."""
    stream = stream or sys.stderr
    return RichDisplay(stream) if is_terminal(stream) else PlainDisplay(stream)


# --------------------------------------------------------------------------- process-wide

_installed: list[Display] = []  # the display `show` installed (a list: no `global` needed)


def report(stage: str, done: int, total: int, note: str = "") -> None:
    """Send a report to the display `show` installed, if any (tasks in this process call
    it: the CLI's flow runs them here). A console that cannot be written (a closed pipe)
    does not stop the stage: its progress is also in the run's artifacts."""
    for display in list(_installed):
        with contextlib.suppress(OSError, ValueError):
            display.report(stage, done, total, note)


@contextlib.contextmanager
def show(display: Display) -> Iterator[Display]:
    """Start `display`, make it the process's (`report`) and, for a terminal display, route
    the logging handlers that write to the terminal through it; stop it on the way out."""
    display.start()
    _installed.append(display)
    try:
        with _logging_through(display):
            yield display
    finally:
        _installed.remove(display)
        display.stop()


@contextlib.contextmanager
def _logging_through(display: Display) -> Iterator[None]:
    """While a terminal display runs, every logging handler writing to stdout or stderr
    (Prefect's rich console handler too) writes through the display's console, so its
    lines go above the bars instead of over them."""
    if not isinstance(display, RichDisplay):
        yield
        return
    # The streams as they were before the display redirected sys.stdout/sys.stderr.
    streams = (sys.__stdout__, sys.__stderr__, display.console.file)
    originals = {id(s): s for s in streams if s is not None and is_terminal(s)}
    swapped: list[Callable[[], None]] = []
    for handler in _handlers():
        console = getattr(handler, "console", None)
        if console is not None and id(getattr(console, "file", None)) in originals:
            file = console.file
            console.file = display.proxy(file)
            swapped.append(lambda c=console, f=file: setattr(c, "file", f))
        elif isinstance(handler, logging.StreamHandler) and id(handler.stream) in originals:
            stream = handler.setStream(display.proxy(handler.stream))
            swapped.append(lambda h=handler, s=stream: h.setStream(s))
    try:
        yield
    finally:
        for undo in swapped:
            undo()


def _handlers() -> list[logging.Handler]:
    """Every handler of the root logger and of every named logger, once."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    seen: dict[int, logging.Handler] = {}
    for lg in loggers:
        for handler in lg.handlers:
            seen.setdefault(id(handler), handler)
    return list(seen.values())
