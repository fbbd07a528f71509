"""Ingest: one manifest row per input, accepted or rejected with a specific reason.

The inputs, and the captions that come with them, are read from `ingest.source` by
`cogpipe.sources` (a folder, a list file, the diffusers / CogVideo / finetrainers layouts).

`video_id` is the sha256 of the file's bytes, so exact copies share it. Hash and probe
results are cached by path + size + mtime in `cache/probe/probes.parquet`: re-ingesting
an unchanged tree of 100,000 files reads no file. Each new file is hashed and probed in
a worker process under `ingest.timeout`, so no file can hang or crash the stage.

A rejection that a retry may clear is never kept for good: a file this user may not read
is a listing error (fixing the permission changes the listing, so the key), a failed read
is not cached, and a probe that timed out is probed again under a longer timeout (see
`key_of`). An ingest that accepts no video fails (EmptyStage) and is not done.

    cogpipe ingest demo/demo.yaml
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pandas as pd

from cogpipe.config import PipelineConfig
from cogpipe.errors import EmptyStage
from cogpipe.pool import map_files
from cogpipe.sources import list_source
from cogpipe.video import probe_video
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    no_progress,
    read_table,
    sha256_file,
    sha256_json,
    stage_key,
    write_table,
)

VERSION = 2
PROBE_COLUMNS = [
    "video_id",
    "width",
    "height",
    "fps",
    "frames",
    "duration",
    "keyframes",
    "rotation",
    "vfr",
    "codec",
    "pix_fmt",
    "bit_depth",
    "bitrate",
    "status",
    "reason",
]
COLUMNS = ["path", "size", "mtime_ns", "source_caption", *PROBE_COLUMNS]
TIMED_OUT = re.compile(r"probe failed: timed out after ([0-9.e+-]+)s")
UNREADABLE = "cannot read file: "  # a read that failed: not cached, the next ingest tries again

# First bytes of the containers FFmpeg reads; a file with none of them is not probed.
_SIGNATURES = (
    (4, b"ftyp"),
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (4, b"skip"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
    (0, b"\x00\x00\x01\xba"),
    (0, b"\x00\x00\x01\xb3"),  # MPEG-PS / MPEG video
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x30\x26\xb2\x75"),  # FLV, Ogg, ASF / WMV
)


def key_of(cfg: PipelineConfig, inputs: dict | None = None, listing: list | None = None) -> str:
    """The ingest key covers the config and the listing (path, size, mtime, caption, and
    the error of a file that cannot be read, so a fixed permission gives a new key).

    `ingest.timeout` is not keyed (it decides how long a probe may take, not what a probe
    finds), except where it matters: when the ingest of this listing is done and some file
    timed out under a shorter timeout than the configured one, the key also covers the
    timeout, so a longer one probes those files again (the probe cache keeps every other).
    """
    listing = list_source(cfg) if listing is None else listing
    fields, listed = cfg.ingest.key_fields(), {"listing": sha256_json(listing)}
    key = stage_key("ingest", VERSION, fields, listed)
    shorter = _timed_out(Workspace(cfg.workspace).read_success(Path(cfg.workspace, "ingest", key)))
    if shorter is not None and cfg.ingest.timeout > shorter:
        key = stage_key("ingest", VERSION, fields, listed | {"timeout": cfg.ingest.timeout})
    return key


def _timed_out(record: dict | None) -> float | None:
    """The longest timeout a file of a finished ingest timed out under; None if none did."""
    reasons = (record or {}).get("stats", {}).get("rejections", {})
    found = [float(m[1]) for r in reasons if (m := TIMED_OUT.match(r))]
    return max(found) if found else None


# -- one file ----------------------------------------------------------------------------
def _sniff(path: str) -> str:
    """'' when the first bytes are a known container's, else what they look like."""
    with open(path, "rb") as f:
        head = f.read(64)
    if any(head[at : at + len(sig)] == sig for at, sig in _SIGNATURES):
        return ""
    if head[:1] == b"\x47" and len(head) > 1:  # MPEG-TS sync byte
        return ""
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown binary data"


def probe_file(path: str, extensions: list[str]) -> dict:
    """Hash and probe one file: the manifest's probe columns (status 'ok' or 'rejected')."""
    row = dict.fromkeys(PROBE_COLUMNS)
    row["status"] = "rejected"
    suffix = Path(path).suffix.lower()
    if suffix not in extensions:
        row["reason"] = f"not a video file (extension {suffix or 'none'!r})"
        return row
    try:
        if os.path.getsize(path) == 0:
            row["reason"] = "empty file (0 bytes)"
            return row
        row["video_id"] = sha256_file(Path(path))
        looks = _sniff(path)
    except OSError as e:
        row["reason"] = f"cannot read file: {e.strerror}"
        return row
    if looks:
        row["reason"] = f"not a video (no container signature; content is {looks})"
        return row
    info, error = probe_video(path)
    if error:
        row["reason"] = error
        return row
    row.update(info, status="ok", reason="")
    return row


def _workers(n: int) -> int:
    return n or os.cpu_count() or 1


# -- the probe cache ---------------------------------------------------------------------
def _read_cache(path: Path, timeout: float) -> dict[tuple[str, int, int], dict]:
    """Cached probes by (path, size, mtime_ns), without those a new probe may change: a
    read that failed (a permission since fixed) and a timeout shorter than `timeout`."""
    if not path.exists():
        return {}
    cache = read_table(path)
    limits = cache["timeout"] if "timeout" in cache else pd.Series(float("nan"), cache.index)
    ids = zip(cache.path, cache["size"], cache.mtime_ns, strict=True)
    rows = zip(ids, cache[PROBE_COLUMNS].to_dict("records"), limits, strict=True)
    return {i: row for i, row, limit in rows if _reusable(row["reason"], limit, timeout)}


def _reusable(reason: str | None, limit: float, timeout: float) -> bool:
    if str(reason).startswith(UNREADABLE):
        return False
    if TIMED_OUT.match(str(reason)):
        return limit >= timeout  # NaN (a cache written before timeouts were kept): probe again
    return True


def _write_cache(path: Path, fresh: pd.DataFrame) -> None:
    """Add this run's probes to the cache (a file's newest probe wins); failed reads stay out."""
    fresh = fresh[~fresh.reason.astype(str).str.startswith(UNREADABLE)]
    old = read_table(path) if path.exists() else None
    merged = fresh if old is None else pd.concat([old, fresh], ignore_index=True)
    merged = merged.drop_duplicates(["path", "size", "mtime_ns"], keep="last")
    write_table(path, merged.reset_index(drop=True))


def _failed(error: str, timeout: float) -> dict:
    """The probe row of a file whose probe timed out or crashed its worker."""
    row = {**dict.fromkeys(PROBE_COLUMNS), "status": "rejected", "reason": f"probe failed: {error}"}
    return row | {"timeout": timeout if error.startswith("timed out") else float("nan")}


def _no_video(source: Path, table: pd.DataFrame) -> EmptyStage:
    """The error of an ingest that accepted no file, with its commonest reasons."""
    from cogpipe.report import reason_kind

    kinds = table.reason.map(reason_kind).value_counts().head(3)
    top = ", ".join(f"{kind} ({n})" for kind, n in kinds.items())
    return EmptyStage(
        f"ingest: no video in ingest.source {source}: {len(table)} files, every one rejected"
        f" ({top})"
    )


# -- the stage ---------------------------------------------------------------------------
def _cached_probes(listing: list, cached: dict) -> tuple[list[dict | None], list[int]]:
    """(a probe per listed file: its cached one, a rejection for a listing error, or None;
    the indices of the Nones, still to probe)."""
    probes: list[dict | None] = []
    todo: list[int] = []
    for i, (path, size, mtime, _, error) in enumerate(listing):
        hit = cached.get((path, size, mtime))
        if error:
            hit = {**dict.fromkeys(PROBE_COLUMNS), "status": "rejected", "reason": error}
        elif hit is None:
            todo.append(i)
        probes.append(hit)
    return probes, todo


def _probe(
    cfg: PipelineConfig, listing: list, probes: list, todo: list[int], progress: Progress
) -> list[float]:
    """Probe the files `todo` in worker processes into `probes`; a timeout or a crash is a
    rejected row with the reason. Returns per file the timeout its probe timed out under
    (NaN: it did not)."""
    done = len(listing) - len(todo)
    progress(done, len(listing), "cached")
    extensions = [e.lower() for e in cfg.ingest.extensions]
    jobs = [(listing[i][0], extensions) for i in todo]
    workers = _workers(cfg.ingest.workers)
    limits = [float("nan")] * len(listing)
    for j, value, error in map_files(probe_file, jobs, workers, cfg.ingest.timeout):
        if error:
            value = _failed(error, cfg.ingest.timeout)
            limits[todo[j]] = value.pop("timeout")
        probes[todo[j]] = value
        done += 1
        progress(done, len(listing), listing[todo[j]][0])
    return limits


def run_ingest(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict | None = None,
    progress: Progress = no_progress,
) -> StageResult:
    """Read the source and write `ingest/<key>/videos.parquet`, one row per input.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `ingest`).
        upstream: unused (ingest is the first stage).
        progress: called as (files done, files total, note).

    Returns:
        The stage result; counts hold files, ok, rejected and probed (read this run).

    Raises:
        EmptyStage: no file is a video (the manifest is written, the stage not done).
    """
    started = time.time()
    listing = list_source(cfg)
    key = key_of(cfg, listing=listing)
    out = ws.stage_dir("ingest", key)
    if ws.done(out):
        return ws.result("ingest", out)

    cache_path = ws.cache_dir("probe") / "probes.parquet"
    cached = _read_cache(cache_path, cfg.ingest.timeout)
    probes, todo = _cached_probes(listing, cached)
    limits = _probe(cfg, listing, probes, todo, progress)
    head = pd.DataFrame(
        [e[:4] for e in listing], columns=["path", "size", "mtime_ns", "source_caption"]
    )
    table = pd.concat([head, pd.DataFrame(probes, columns=PROBE_COLUMNS)], axis=1)
    if todo:
        fresh = table.iloc[todo][["path", "size", "mtime_ns", *PROBE_COLUMNS]]
        _write_cache(cache_path, fresh.assign(timeout=[limits[i] for i in todo]))
    write_table(out / "videos.parquet", table)

    ok = int((table.status == "ok").sum())
    if not ok:  # written for a look, but not done: nothing for check to read
        raise _no_video(cfg.ingest.source, table)
    counts = {"files": len(table), "ok": ok, "rejected": len(table) - ok, "probed": len(todo)}
    reasons = table.loc[table.status != "ok", "reason"].value_counts().to_dict()
    result = StageResult("ingest", key, str(out), counts, stats={"rejections": reasons})
    return ws.finish(result, started)
