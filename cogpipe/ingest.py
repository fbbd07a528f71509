"""Ingest: one manifest row per file under the source folder, accepted or rejected.

`video_id` is the sha256 of the file's bytes, so exact copies share it. Probes (hash,
size, frame rate, frame count) are cached by path + size + mtime in
`cache/probe/probes.parquet`, so re-ingesting an unchanged tree reads no video.

    cogpipe ingest configs/demo.yaml
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from cogpipe.config import PipelineConfig
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

VERSION = 1
COLUMNS = [
    "video_id", "path", "size", "mtime_ns", "width", "height", "fps", "frames", "duration",
    "status", "reason",
]  # fmt: skip


def list_source(source: Path) -> list[tuple[str, int, int]]:
    """Every regular file under `source` as (path, size, mtime_ns), sorted by path.

    Raises:
        FileNotFoundError: the source folder does not exist.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"ingest.source {source} is not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: still a row, rejected at probe time
                out.append((path, -1, -1))
                continue
            out.append((path, st.st_size, st.st_mtime_ns))
    return sorted(out)


def key_of(
    cfg: PipelineConfig,
    inputs: dict | None = None,
    listing: list[tuple[str, int, int]] | None = None,
) -> str:
    """The ingest key covers the config and the source listing (path, size, mtime)."""
    listing = list_source(cfg.ingest.source) if listing is None else listing
    return stage_key("ingest", VERSION, cfg.ingest.key_fields(), {"listing": sha256_json(listing)})


def _probe_row(path: str, size: int, mtime_ns: int, extensions: set[str]) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, size=size, mtime_ns=mtime_ns, status="rejected")
    if size < 0:
        row["reason"] = "cannot stat file (dangling link or no permission)"
        return row
    if size == 0:
        row["reason"] = "empty file (0 bytes)"
        return row
    try:
        row["video_id"] = sha256_file(Path(path))
    except OSError as e:
        row["reason"] = f"cannot read file: {e.strerror}"
        return row
    suffix = Path(path).suffix.lower()
    if suffix not in extensions:
        row["reason"] = f"not a video file (extension {suffix or 'none'!r})"
        return row
    info, error = probe_video(path)
    if error:
        row["reason"] = error
        return row
    row.update(info, status="ok", reason="")
    return row


def run_ingest(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict | None = None,
    progress: Progress = no_progress,
) -> StageResult:
    """Scan the source folder and write `ingest/<key>/videos.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `ingest`).
        upstream: unused (ingest is the first stage).
        progress: called as (files done, files total, note).

    Returns:
        The stage result; counts hold files, ok and rejected.
    """
    started = time.time()
    listing = list_source(cfg.ingest.source)
    key = key_of(cfg, listing=listing)
    out = ws.stage_dir("ingest", key)
    if ws.done(out):
        return ws.result("ingest", out)

    cache_path = ws.cache_dir("probe") / "probes.parquet"
    cache = read_table(cache_path) if cache_path.exists() else pd.DataFrame(columns=COLUMNS)
    cached = {(r.path, r.size, r.mtime_ns): r._asdict() for r in cache.itertuples(index=False)}
    extensions = {e.lower() for e in cfg.ingest.extensions}

    rows, probed = [], 0
    for i, (path, size, mtime_ns) in enumerate(listing):
        row = cached.get((path, size, mtime_ns))
        if row is None:
            row = _probe_row(path, size, mtime_ns, extensions)
            probed += 1
        rows.append(row)
        progress(i + 1, len(listing), path)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if probed:
        merged = pd.concat([cache, table]).drop_duplicates(
            ["path", "size", "mtime_ns"], keep="last"
        )
        write_table(cache_path, merged.reset_index(drop=True))
    write_table(out / "videos.parquet", table)

    ok = int((table.status == "ok").sum())
    counts = {"files": len(table), "ok": ok, "rejected": len(table) - ok, "probed": probed}
    reasons = table.loc[table.status != "ok", "reason"].value_counts().to_dict()
    result = StageResult("ingest", key, str(out), counts, stats={"rejections": reasons})
    return ws.finish(result, started)
