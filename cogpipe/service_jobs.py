"""The inference service's job store: jobs and registered LoRAs in one SQLite file, so a
restart keeps the queue, the finished results and the LoRAs added through the API.

    store = JobStore(Path(".cogpipe-api/jobs.sqlite"))
    job = store.add(key, lora="slap", spec={...})    # queued
    store.claim(job["id"]); store.finish(job["id"], "videos/<key>.mp4", 41.2)

What is notable:
- opening the store re-queues jobs left `running` by a process that died mid-video: the
  video in flight is made again, nothing else is lost;
- a job's `key` hashes everything its video depends on (the service computes it), so a
  finished job of the same key is a stored result (`find_done`);
- each call opens its own connection under one lock: the HTTP threads and the GPU worker
  thread share the store without sharing a connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "cancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    id TEXT UNIQUE NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    lora TEXT,                              -- a registered LoRA's name; NULL: the base model
    spec TEXT NOT NULL,                     -- JSON: prompt, generation options, LoRA sha256
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    seconds REAL,                           -- of generation (0 for a stored result)
    error TEXT,
    result TEXT,                            -- the mp4, relative to the service folder
    cached INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key, state);
CREATE TABLE IF NOT EXISTS loras (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,                     -- the LoRA's .safetensors file
    sha256 TEXT NOT NULL
);
"""


class JobStore:
    """Jobs and LoRAs of one service folder (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._db() as db:
            db.executescript(SCHEMA)
            db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One connection, committed on success, under the store's lock."""
        with self._lock, closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            with db:  # commit, or roll back on an exception
                yield db

    # ----------------------------------------------------------------------- jobs

    def add(self, key: str, lora: str | None, spec: dict, done_as: dict | None = None) -> dict:
        """A new job: queued, or `done_as`'s stored result (cached, no generation)."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._db() as db:
            if done_as is None:
                db.execute(
                    "INSERT INTO jobs (id, key, state, lora, spec, created) VALUES (?,?,?,?,?,?)",
                    (job_id, key, "queued", lora, json.dumps(spec), now),
                )
            else:
                db.execute(
                    "INSERT INTO jobs (id, key, state, lora, spec, created, started, finished,"
                    " seconds, result, cached) VALUES (?,?,'done',?,?,?,?,?,0,?,1)",
                    (job_id, key, lora, json.dumps(spec), now, now, now, done_as["result"]),
                )
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        """The job as a dict (spec parsed), or None."""
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def find(self, key: str, states: tuple[str, ...]) -> dict | None:
        """The earliest job of `key` in one of `states`, or None."""
        marks = ",".join("?" * len(states))
        with self._db() as db:
            row = db.execute(
                f"SELECT * FROM jobs WHERE key = ? AND state IN ({marks}) ORDER BY seq LIMIT 1",
                (key, *states),
            ).fetchone()
        return _job(row) if row is not None else None

    def queued(self) -> list[dict]:
        """The queued jobs in submission order."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq").fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        with self._db() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {state: n for state, n in rows}

    def _move(self, job_id: str, from_states: tuple[str, ...], **fields) -> bool:
        """Set `fields` on the job if it is in one of `from_states`; whether it was."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        marks = ",".join("?" * len(from_states))
        with self._db() as db:
            cur = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({marks})",
                (*fields.values(), job_id, *from_states),
            )
        return cur.rowcount == 1

    def claim(self, job_id: str) -> bool:
        """queued -> running; False when it was cancelled meanwhile."""
        return self._move(job_id, ("queued",), state="running", started=time.time())

    def finish(self, job_id: str, result: str, seconds: float) -> None:
        """running -> done, with the mp4 (relative to the service folder)."""
        self._move(
            job_id, ("running",), state="done", result=result, seconds=seconds, finished=time.time()
        )

    def fail(self, job_id: str, error: str) -> None:
        """running -> failed, with the reason."""
        self._move(job_id, ("running",), state="failed", error=error, finished=time.time())

    def requeue(self, job_id: str) -> None:
        """running -> queued: the process is stopping mid-video; a restart makes it again."""
        self._move(job_id, ("running",), state="queued", started=None)

    def cancel(self, job_id: str) -> bool:
        """queued -> cancelled; False when the job is not queued."""
        return self._move(job_id, ("queued",), state="cancelled", finished=time.time())

    # ----------------------------------------------------------------------- LoRAs

    def loras(self) -> list[dict]:
        """The registered LoRAs: name, path, sha256, in name order."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM loras ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    def put_lora(self, name: str, path: str, sha256: str) -> None:
        """Register (or re-point) a LoRA by name."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO loras VALUES (?,?,?)", (name, path, sha256))


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["spec"] = json.loads(job["spec"])
    job["cached"] = bool(job["cached"])
    return job
