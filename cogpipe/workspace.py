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
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(stage: str, version: int, config: Any, inputs: dict[str, str]) -> str:
    """Short hash of (stage config, input keys, stage version): the output folder's name."""
    return sha256_json({"stage": stage, "v": version, "config": config, "inputs": inputs})[:KEY_LEN]


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
        """Write the done marker (stats, counts, timings, versions) atomically."""
        result.seconds = round(time.time() - started, 3)
        record = result.to_dict() | {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
        }
        record.pop("reused", None)
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


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    Works for files and folders. The temporary name starts with `.tmp-` so listings of
    committed units can ignore it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)  # a rewrite of a folder (never of a committed unit)
        os.replace(tmp, final)
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


def clean_stale_tmp(folder: Path, pattern: str = ".tmp-*") -> None:
    """Remove temporaries left by a killed process (they are never committed units)."""
    if folder.is_dir():
        for p in folder.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
