"""The stage contract on disk: keys, atomic writes, done markers, tables.

Every stage writes under `workspace/<stage>/<key>/`, where `key` hashes the stage's own
config, the keys of its inputs and the stage's version. A folder is readable by
downstream stages only once it holds `_SUCCESS.json`. Everything is written to a
temporary name and renamed into place, so a crash leaves whole files or nothing.

    ws = Workspace("workspace")
    key = stage_key("check", CHECK_VERSION, cfg.check.key_fields(), {"ingest": ingest.key})
    out = ws.stage_dir("check", key)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS.json"
KEY_LEN = 12

# Progress callback: (done, total, note). The library calls it; the task layer turns it
# into a Prefect progress artifact and the CLI into a progress line.
Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, note: str = "") -> None:
    pass


# The stage runner's clock (`cogpipe.estimate.StageClock`, set by `pipeline.run_stage`):
# `finish` adds what it measured (setup and per-item seconds, predicted) to the marker.
stage_clock: ContextVar[Callable[[Any], dict[str, Any] | None] | None] = ContextVar(
    "stage_clock", default=None
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# Every `stage_key` call made while `recording_keys()` is active: what went into a key
# (`cogpipe.stages.StageSpec.key_inputs`).
_key_calls: ContextVar[list[dict[str, Any]] | None] = ContextVar("key_calls", default=None)

# What went into the key of the stage `pipeline.run_stage` runs ({"stage", "key",
# "inputs"}): `finish` records it in the done marker, for `cogpipe explain-key`.
stage_key_inputs: ContextVar[dict[str, Any] | None] = ContextVar("stage_key_inputs", default=None)


def stage_key(stage: str, version: int, config: Any, inputs: dict[str, str]) -> str:
    """Short hash of (stage config, input keys, stage version): the output folder's name."""
    key = sha256_json({"stage": stage, "v": version, "config": config, "inputs": inputs})[:KEY_LEN]
    calls = _key_calls.get()
    if calls is not None:
        call = {"stage": stage, "version": version, "config": config, "inputs": dict(inputs)}
        calls.append(call | {"key": key})
    return key


@contextmanager
def recording_keys() -> Iterator[list[dict[str, Any]]]:
    """Collect the `stage_key` calls made inside the block ({"stage", "version", "config",
    "inputs", "key"} each, in call order)."""
    calls: list[dict[str, Any]] = []
    token = _key_calls.set(calls)
    try:
        yield calls
    finally:
        _key_calls.reset(token)


FINGERPRINT_BYTES = 1 << 20  # read from each end of a weight file for its fingerprint
_fingerprints: dict[tuple, str] = {}  # (path, size, mtime_ns) -> digest, per process


def model_fingerprint(model: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies model weights: a hub id + revision, or a local folder's contents.

    A local folder is fingerprinted by every file's relative path, size and the sha256 of
    its first and last MiB (all of it for smaller files), never by where it lives or when
    it was written: moving or copying the folder keeps every key, and replacing weights in
    place gives a new one, without reading gigabytes.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return {"id": model, "revision": revision}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(path)), p.stat().st_size, _ends_digest(p)) for p in files]
    return {"files": sha256_json(listing)[:16]}


def _ends_digest(path: Path) -> str:
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _fingerprints:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            if st.st_size > 2 * FINGERPRINT_BYTES:
                f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            h.update(f.read(FINGERPRINT_BYTES))
        _fingerprints[memo] = h.hexdigest()[:16]
    return _fingerprints[memo]


@dataclass
class StageResult:
    """What a stage returns and what downstream stages and Prefect tasks pass on."""

    stage: str
    key: str
    path: str
    counts: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class StageNotReady(RuntimeError):
    """A stage was asked for an upstream output that has no done marker."""


class ShardsIncomplete(RuntimeError):
    """A merge-only run of a sharded stage found shards that no run has committed yet."""


class Workspace:
    """A workspace root: `<stage>/<key>/` folders, `cache/` stores."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def cache_dir(self, name: str) -> Path:
        d = self.root / "cache" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lock_path(self, name: str) -> Path:
        """The lock file of a unit of work: `.locks/<name>.lock` in the workspace."""
        return self.root / ".locks" / f"{name}.lock"

    def hold(self, name: str, wait: bool = True, on_wait: Callable[[str], None] | None = None):
        """Hold the workspace's lock `name` (e.g. "precompute-<key>-shard-00012"): one
        writer per unit of work across processes and hosts sharing the workspace."""
        return hold_lock(self.lock_path(name), wait, on_wait)

    def done(self, path: Path) -> bool:
        return (path / SUCCESS).is_file()

    def read_success(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads((path / SUCCESS).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def result(self, stage: str, path: Path) -> StageResult:
        """The StageResult recorded in a finished stage folder, marked as reused."""
        record = self.read_success(path)
        if record is None:
            raise StageNotReady(
                f"{stage} output {path} is not finished; run `cogpipe {stage} CONFIG` first"
            )
        res = StageResult.from_dict(record)
        res.path = str(
            path
        )  # where it was read: the workspace may have moved or be mounted elsewhere
        res.reused = True
        return res

    def finish(self, result: StageResult, started: float) -> StageResult:
        """Write the done marker (stats, counts, timings, versions and, when the runner
        knows them, the key's inputs) atomically."""
        result.seconds = round(time.time() - started, 3)
        record = result.to_dict() | {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
        }
        record.pop("reused", None)
        clock = stage_clock.get()
        timing = clock(result) if clock is not None else None
        if timing is not None:
            record["timing"] = timing
        known = stage_key_inputs.get() or {}
        if (known.get("stage"), known.get("key")) == (result.stage, result.key):
            record["key_inputs"] = known["inputs"]
        write_json(Path(result.path) / SUCCESS, record)
        return result


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cogpipe", "torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


TMP_PREFIX = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# `.tmp-<name>-h<host>p<pid>r<random>[.ext]`: who wrote a temporary, so a sweep removes
# only those whose writer is gone, never a live concurrent writer's.
_TMP_OWNER = re.compile(r"-h(?P<host>[A-Za-z0-9]+)p(?P<pid>\d+)r[0-9a-f]{8}(\.\w+)?$")
FOREIGN_TMP_S = 24 * 3600  # another host's temporary is stale after this long


def tmp_name(final: Path, keep_suffix: bool = False) -> Path:
    """A temporary sibling of `final` that names its writer (host and pid).

    `keep_suffix` ends it with `final`'s suffix (writers that pick a format by it).
    """
    token = f"h{_HOST}p{os.getpid()}r{uuid.uuid4().hex[:8]}"
    stem = final.stem if keep_suffix else final.name
    return final.with_name(f"{TMP_PREFIX}{stem}-{token}{final.suffix if keep_suffix else ''}")


def is_stale_tmp(path: Path) -> bool:
    """A temporary whose writer has died (same host, pid gone or reused), another host's
    older than a day, or one of an unknown format (written before writers were named)."""
    m = _TMP_OWNER.search(path.name)
    if m is None:
        return True
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False  # committed or removed meanwhile
    if m["host"] != _HOST:
        return age > FOREIGN_TMP_S
    return not _alive(int(m["pid"]), since=time.time() - age)


def _alive(pid: int, since: float) -> bool:
    """Whether `pid` is a live process that existed at `since` (a reused pid is not)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= since + 1
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False  # gone, or killed and not yet reaped: it writes nothing more


FAULT_ENV = "COGPIPE_FAULT"  # "N" or "N:text": SIGKILL this process at the Nth fault point (whose path contains text)
FAULT_LOG_ENV = "COGPIPE_FAULT_LOG"  # a file: every fault point reached is appended to it
PAUSE_ENV = "COGPIPE_PAUSE"  # "N:text": at that point, create the file COGPIPE_PAUSE_FILE and sleep
_faults_seen = 0
_pauses_seen = 0


def fault_point(label: str, path: Path | str = "") -> None:
    """A commit point: where a kill must leave a state the next run finishes correctly.

    Tests inject a kill here (`COGPIPE_FAULT`) and list the points a run reaches
    (`COGPIPE_FAULT_LOG`); without those variables it costs one environment lookup.
    """
    global _faults_seen
    spec, log = os.environ.get(FAULT_ENV), os.environ.get(FAULT_LOG_ENV)
    if os.environ.get(PAUSE_ENV):
        _pause(f"{label} {path}")
    if not spec and not log:
        return
    where = f"{label} {path}"
    if log:
        with open(log, "a") as f:
            f.write(where + "\n")
    if spec:
        n, _, text = spec.partition(":")
        if text in where:
            _faults_seen += 1
            if _faults_seen == int(n):
                os.kill(os.getpid(), signal.SIGKILL)


def _pause(where: str) -> None:
    """Hold still at a commit point (COGPIPE_PAUSE), so a test can interrupt the process
    there: what Ctrl-C in the middle of a stage meets."""
    global _pauses_seen
    n, _, text = os.environ[PAUSE_ENV].partition(":")
    if text in where:
        _pauses_seen += 1
        if _pauses_seen == int(n):
            Path(os.environ["COGPIPE_PAUSE_FILE"]).write_text(where)
            time.sleep(600)


@contextmanager
def atomic_path(final: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    Works for files and folders. The temporary's name starts with `.tmp-` (listings of
    committed units ignore it) and names its writer, so `sweep_temporaries` removes it
    once that process is gone. `keep_suffix`: the temporary ends with `final`'s suffix.
    """
    from cogpipe.errors import writing  # "disk full writing FINAL", not the writer's riddle

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final, keep_suffix)
    try:
        with writing(final):
            yield tmp
        fault_point("rename", final)
        old = None
        if tmp.is_dir() and final.is_dir():  # a rewrite of a folder (never of a committed unit)
            old = tmp_name(final)  # moved aside, not deleted first: a kill leaves one of them
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: Path, df: pd.DataFrame) -> None:
    """Write a Parquet table atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def read_table(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def read_parts(folder: Path, pattern: str = "part-*.parquet") -> pd.DataFrame:
    """Concatenate committed Parquet parts in name order (temporary files are ignored)."""
    parts = sorted(p for p in folder.glob(pattern) if not p.name.startswith(".tmp-"))
    if not parts:
        return pd.DataFrame()
    return pd.concat([read_table(p) for p in parts], ignore_index=True)


def clean_stale_tmp(folder: Path, pattern: str = ".tmp-*") -> int:
    """Remove the temporaries in `folder` whose writers are gone (a killed process's);
    a live writer's (a concurrent run's) stay. Returns how many were removed."""
    removed = 0
    if folder.is_dir():
        for p in folder.glob(pattern):
            if is_stale_tmp(p):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
    return removed


def sweep_temporaries(root: Path) -> int:
    """Remove every stale temporary under a workspace (see `clean_stale_tmp`), so a killed
    run leaves nothing behind once any later run starts, even one that finds all done."""
    removed = 0
    for folder, dirs, files in os.walk(root):
        names = [n for n in (*dirs, *files) if n.startswith(TMP_PREFIX)]
        for name in names:
            if is_stale_tmp(Path(folder, name)):
                path = Path(folder, name)
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                    missing_ok=True
                )
                removed += 1
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
    return removed


class Busy(RuntimeError):
    """A unit of work is held by another process (see `Workspace.hold`)."""


@contextmanager
def hold_lock(
    path: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (filelock's flock: the system frees it when its
    holder dies, SIGKILL included), writing who holds it into the file.

    Busy and `wait`: calls `on_wait(holder)` once, then waits. Busy and not `wait`: raises
    Busy naming the holder.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, on_acquired=_write_holder)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        holder = _holder(path)
        if not wait:
            raise Busy(holder) from None
        if on_wait is not None:
            on_wait(holder)
        lock.acquire()
    try:
        yield
    finally:
        os.truncate(path, 0)  # nobody holds it now; the next holder writes itself
        lock.release()


def _write_holder(fd: int) -> None:
    """Who holds the lock (pid, host, since when, command), into the lock file just taken."""
    me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{me}: {' '.join(sys.argv)[:200]}\n".encode(), 0)


def _holder(path: Path, patience_s: float = 1.0) -> str:
    """Who holds the lock, as its holder wrote it; the holder writes it just after taking
    the lock, so a process arriving at that moment waits a little for it."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text or time.monotonic() > deadline:
            return text or "another process"
        time.sleep(0.05)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
