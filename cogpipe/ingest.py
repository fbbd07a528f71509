"""Ingest: one manifest row per input, accepted or rejected with a specific reason.

Inputs come from a folder (recursive, symlinks followed, loops detected), a list file
(CSV / JSONL / text), or a dataset layout people already have: diffusers / CogVideo
(`prompts.txt` + `videos.txt`) or finetrainers / HF (`metadata.csv` / `metadata.jsonl`).
Captions that come with a dataset are kept in `source_caption`.

`video_id` is the sha256 of the file's bytes, so exact copies share it. Hash and probe
results are cached by path + size + mtime in `cache/probe/probes.parquet`: re-ingesting
an unchanged tree of 100,000 files reads no file. Each new file is hashed and probed in
a worker process under `ingest.timeout`, so no file can hang or crash the stage.

    cogpipe ingest configs/demo.yaml
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import time
from pathlib import Path

import pandas as pd

from cogpipe.config import PipelineConfig
from cogpipe.pool import map_files
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
    "video_id", "width", "height", "fps", "frames", "duration", "keyframes", "rotation", "vfr",
    "codec", "pix_fmt", "bit_depth", "bitrate", "status", "reason",
]  # fmt: skip
COLUMNS = ["path", "size", "mtime_ns", "source_caption", *PROBE_COLUMNS]
PATH_COLUMNS = ("path", "file_name", "video", "video_path", "file")
CAPTION_COLUMNS = ("caption", "prompt", "text", "description")

# First bytes of the containers FFmpeg reads; a file with none of them is not probed.
_SIGNATURES = (
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
    (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"),  # MPEG-PS / MPEG video
    (0, b"FLV"), (0, b"OggS"), (0, b"\x30\x26\xb2\x75"),  # FLV, Ogg, ASF / WMV
)  # fmt: skip

Entry = tuple[str, int, int, str | None, str]  # path, size, mtime_ns, caption, stat error


class SourceError(ValueError):
    """A dataset list or layout that cannot be read; the message names the file."""


# -- reading the source ------------------------------------------------------------------
def _walk(root: Path) -> list[tuple[str, str]]:
    """Every file under `root` as (path, error): links followed, each directory once."""
    out: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: str) -> None:
        st = os.stat(folder)
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            out.append((folder, f"cannot list folder: {e.strerror}"))
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if not is_dir:
                out.append((entry.path, ""))
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as e:
                out.append((entry.path, f"cannot stat folder: {e.strerror}"))
                continue
            if (st.st_dev, st.st_ino) in seen:
                out.append((entry.path, "symlink loop (links to a folder already scanned)"))
                continue
            visit(entry.path)

    visit(str(root))
    return out


def _rows_of(path: Path) -> list[dict]:
    """The records of a CSV or JSONL file, each with its line number as '_line'."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                for i, row in enumerate(csv.DictReader(f), start=2):
                    rows.append({**row, "_line": i})
            else:
                for i, line in enumerate(f, start=1):
                    if line.strip():
                        rows.append({**json.loads(line), "_line": i})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    return rows


def _records(path: Path) -> list[tuple[str, str | None]]:
    """(relative or absolute path, caption) pairs from a CSV / JSONL / text list."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(line.strip(), None) for line in lines if line.strip()]
    out = []
    for row in _rows_of(path):
        key = next((k for k in PATH_COLUMNS if row.get(k)), None)
        if key is None:
            raise SourceError(
                f"{path}: line {row['_line']} has no path column (one of {', '.join(PATH_COLUMNS)})"
            )
        cap = next((row[k] for k in CAPTION_COLUMNS if row.get(k) not in (None, "")), None)
        out.append((str(row[key]).strip(), None if cap is None else str(cap).strip()))
    return out


def _diffusers(root: Path) -> list[tuple[str, str | None]]:
    """CogVideo / diffusers layout: line i of videos.txt is captioned by line i of prompts.txt."""
    videos_txt = root / "videos.txt"
    prompts_txt = next(
        (p for p in (root / "prompts.txt", root / "prompt.txt") if p.is_file()), None
    )
    videos = [v.strip() for v in videos_txt.read_text(encoding="utf-8").splitlines() if v.strip()]
    if prompts_txt is None:
        return [(v, None) for v in videos]
    prompts = [p.strip() for p in prompts_txt.read_text(encoding="utf-8").splitlines() if p.strip()]
    if len(prompts) != len(videos):
        raise SourceError(
            f"{prompts_txt} has {len(prompts)} prompts but {videos_txt} has {len(videos)} videos"
        )
    return list(zip(videos, prompts, strict=True))


def detect_layout(source: Path) -> str:
    if source.is_file():
        return "list"
    if (source / "videos.txt").is_file():
        return "diffusers"
    if (source / "metadata.csv").is_file() or (source / "metadata.jsonl").is_file():
        return "metadata"
    return "folder"


def list_source(cfg: PipelineConfig) -> list[Entry]:
    """Every input of `ingest.source` as (path, size, mtime_ns, caption, error), by path.

    A path listed twice is one entry (the first caption wins). Inputs that cannot be
    statted keep their row with the reason in `error` and size -1.

    Raises:
        FileNotFoundError: the source does not exist.
        SourceError: a list or layout file is malformed.
    """
    source = cfg.ingest.source
    if not source.exists():
        raise FileNotFoundError(f"ingest.source {source} does not exist")
    layout = detect_layout(source) if cfg.ingest.layout == "auto" else cfg.ingest.layout
    if layout == "folder":
        if not source.is_dir():
            raise SourceError(f"ingest.source {source} is not a folder (layout: folder)")
        found = [(p, None, err) for p, err in _walk(source)]
    else:
        if layout == "list":
            base, records = source.parent, _records(source)
        elif layout == "diffusers":
            base, records = source, _diffusers(source)
        else:
            meta = next(
                p for p in (source / "metadata.csv", source / "metadata.jsonl") if p.exists()
            )
            base, records = source, _records(meta)
        found = [(os.path.join(base, p), cap, "") for p, cap in records]

    entries: dict[str, Entry] = {}
    for path, caption, error in found:
        if path in entries:
            continue
        size = mtime = -1
        if not error:
            try:
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    size, mtime = st.st_size, st.st_mtime_ns
                else:
                    error = f"not a regular file ({_kind(st.st_mode)})"
            except OSError as e:
                error = _stat_error(path, e)
        entries[path] = (path, size, mtime, caption, error)
    return [entries[p] for p in sorted(entries)]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def _stat_error(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "dangling symlink" if os.path.islink(path) else "missing file (listed, not found)"
    if e.errno == errno.EACCES:
        return "permission denied"
    return f"cannot stat: {e.strerror}"


def key_of(cfg: PipelineConfig, inputs: dict | None = None, listing: list | None = None) -> str:
    """The ingest key covers the config and the listing (path, size, mtime, caption)."""
    listing = list_source(cfg) if listing is None else listing
    return stage_key("ingest", VERSION, cfg.ingest.key_fields(), {"listing": sha256_json(listing)})


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


# -- the stage ---------------------------------------------------------------------------
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
    """
    started = time.time()
    listing = list_source(cfg)
    key = key_of(cfg, listing=listing)
    out = ws.stage_dir("ingest", key)
    if ws.done(out):
        return ws.result("ingest", out)

    cache_path = ws.cache_dir("probe") / "probes.parquet"
    cached: dict[tuple[str, int, int], dict] = {}
    if cache_path.exists():
        cache = read_table(cache_path)
        ids = zip(cache.path, cache["size"], cache.mtime_ns, strict=True)
        cached = dict(zip(ids, cache[PROBE_COLUMNS].to_dict("records"), strict=True))
    extensions = [e.lower() for e in cfg.ingest.extensions]

    probes: list[dict | None] = []
    todo: list[int] = []
    for i, (path, size, mtime, _, error) in enumerate(listing):
        hit = cached.get((path, size, mtime))
        if error:
            hit = {**dict.fromkeys(PROBE_COLUMNS), "status": "rejected", "reason": error}
        elif hit is None:
            todo.append(i)
        probes.append(hit)
    done = len(listing) - len(todo)
    progress(done, len(listing), "cached")
    jobs = [(listing[i][0], extensions) for i in todo]
    workers = _workers(cfg.ingest.workers)
    for j, value, error in map_files(probe_file, jobs, workers, cfg.ingest.timeout):
        if error:  # a timeout or crash: the file is still a row, with the reason
            value = {**dict.fromkeys(PROBE_COLUMNS), "status": "rejected",
                     "reason": f"probe failed: {error}"}  # fmt: skip
        probes[todo[j]] = value
        done += 1
        progress(done, len(listing), listing[todo[j]][0])

    head = pd.DataFrame(
        [e[:4] for e in listing], columns=["path", "size", "mtime_ns", "source_caption"]
    )
    table = pd.concat([head, pd.DataFrame(probes, columns=PROBE_COLUMNS)], axis=1)
    if todo:
        fresh = table.iloc[todo][["path", "size", "mtime_ns", *PROBE_COLUMNS]]
        old = read_table(cache_path) if cache_path.exists() else None
        merged = fresh if old is None else pd.concat([old, fresh], ignore_index=True)
        merged = merged.drop_duplicates(["path", "size", "mtime_ns"], keep="last")
        write_table(cache_path, merged.reset_index(drop=True))
    write_table(out / "videos.parquet", table)

    ok = int((table.status == "ok").sum())
    counts = {"files": len(table), "ok": ok, "rejected": len(table) - ok, "probed": len(todo)}
    reasons = table.loc[table.status != "ok", "reason"].value_counts().to_dict()
    result = StageResult("ingest", key, str(out), counts, stats={"rejections": reasons})
    return ws.finish(result, started)
