"""Captions that arrive with the data: the dataset's own and those of an earlier run.

The caption stage captions only what these leave uncaptioned (`caption.existing: fill`),
nothing (`use`), or everything (`ignore`). A caption given per video describes the whole
video, so it goes to a clip only where check made exactly one clip of that video; a video
split into shots or training windows has its clips captioned by the model (the count is
in the stage's stats). A caption given per clip_id goes to that clip.

An import file (`caption.import_file`) is a CSV, JSONL, JSON or Parquet table with a
caption column and a key column: clip_id, video_id (sha256 of the file) or a path
(absolute, relative to the import file, relative to ingest.source, or else a file name
that names exactly one video). It takes precedence over the dataset's captions. A row
that matches no video is an error naming the file and the line: an earlier run's captions
are never dropped silently.

    given, stats = existing_captions(cfg, kept, clips)   # clip_id, caption, source
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from cogpipe.config import ConfigError, PipelineConfig

KEY_COLUMNS = ("clip_id", "video_id", "path", "file_name", "video", "video_path", "file")
CAPTION_COLUMNS = ("caption", "prompt", "text", "description")


def read_import(path: Path) -> pd.DataFrame:
    """The import file as a table with `_line` (the row's line in the file, 1-based).

    Raises:
        ConfigError: the file cannot be read, or has no key or caption column.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pd.read_parquet(path)
            table["_line"] = range(1, len(table) + 1)  # row number
        elif suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            table["_line"] = range(2, len(table) + 2)  # after the header
        elif suffix in (".jsonl", ".json"):
            table = _read_json(path)
        else:
            raise ConfigError(f"caption.import_file {path}: use .csv, .jsonl, .json or .parquet")
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"caption.import_file {path}: cannot read: {e}") from e
    if not any(c in table for c in CAPTION_COLUMNS) or not any(c in table for c in KEY_COLUMNS):
        raise ConfigError(
            f"caption.import_file {path}: needs a caption column ({', '.join(CAPTION_COLUMNS)})"
            f" and a key column ({', '.join(KEY_COLUMNS)}); it has {', '.join(table.columns)}"
        )
    return table


def _read_json(path: Path) -> pd.DataFrame:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = [{**r, "_line": i} for i, r in enumerate(json.loads(text), start=1)]
    else:
        rows = [
            {**json.loads(line), "_line": i}
            for i, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    return pd.DataFrame(rows)


def _first(row: pd.Series, columns: tuple[str, ...]) -> tuple[str, str] | None:
    """(column, value) of the first of `columns` the row has a value in."""
    for c in columns:
        value = row.get(c)
        if isinstance(value, str) and value.strip():
            return c, value.strip()
    return None


class _Videos:
    """Finds the video a path names, the ways an earlier run may have written it."""

    def __init__(self, clips: pd.DataFrame, source: Path, import_dir: Path):
        self.paths = {
            os.path.normpath(p): v for p, v in zip(clips.path, clips.video_id, strict=True)
        }
        self.ids = set(clips.video_id)
        self.bases = [source if source.is_dir() else source.parent, import_dir]
        names: dict[str, set[str]] = {}
        for p, v in self.paths.items():
            names.setdefault(os.path.basename(p), set()).add(v)
        self.names = {n: next(iter(v)) for n, v in names.items() if len(v) == 1}

    def by_path(self, value: str) -> str | None:
        for base in (Path("/"), *self.bases):
            hit = self.paths.get(os.path.normpath(base / value))
            if hit is not None:
                return hit
        return self.names.get(os.path.basename(value))


def imported(cfg: PipelineConfig, clips: pd.DataFrame) -> dict[str, dict[str, str]]:
    """{"clip": {clip_id: caption}, "video": {video_id: caption}} from `caption.import_file`.

    Raises:
        ConfigError: a row has no caption or key, or matches no clip or video of the check
            table (the message names the file, the line and the value).
    """
    path = cfg.caption.import_file
    out: dict[str, dict[str, str]] = {"clip": {}, "video": {}}
    if path is None:
        return out
    videos = _Videos(clips, cfg.ingest.source, path.parent)
    clip_ids = set(clips.clip_id)
    for _, row in read_import(path).iterrows():
        where = f"caption.import_file {path}: line {row['_line']}"
        key, caption = _first(row, KEY_COLUMNS), _first(row, CAPTION_COLUMNS)
        if key is None or caption is None:
            raise ConfigError(f"{where}: no {'key' if key is None else 'caption'} value")
        column, value = key
        if column == "clip_id":
            found = value if value in clip_ids else None
        elif column == "video_id":
            found = value if value in videos.ids else None
        else:
            found = videos.by_path(value)
        if found is None:
            raise ConfigError(f"{where}: {column} {value!r} matches no clip or video of the source")
        out["clip" if column == "clip_id" else "video"][found] = caption[1]
    return out


def existing_captions(
    cfg: PipelineConfig, kept: pd.DataFrame, clips: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The kept clips that come captioned: clip_id, caption, source ('import' or 'dataset').

    Args:
        cfg: the pipeline config (uses `caption.existing`, `caption.import_file`).
        kept: the kept clips (check rows).
        clips: every clip of the check table (to tell whether a video was split).

    Returns:
        (the table, sorted by clip_id; stats: given per source and `split_videos`, clips
        whose video's caption was not used because check split the video).
    """
    empty = pd.DataFrame(columns=["clip_id", "caption", "source"])
    if cfg.caption.existing == "ignore" or not len(kept):
        return empty, {}
    per_video = clips.video_id.value_counts()
    given = imported(cfg, clips)
    rows, split = [], 0
    for clip in kept.itertuples(index=False):
        whole = per_video.get(clip.video_id, 0) == 1
        dataset = clip.source_caption if isinstance(clip.source_caption, str) else None
        candidates = [
            (given["clip"].get(clip.clip_id), "import"),
            (given["video"].get(clip.video_id) if whole else None, "import"),
            (dataset.strip() if whole and dataset and dataset.strip() else None, "dataset"),
        ]
        text, source = next(((t, s) for t, s in candidates if t), (None, None))
        split += (
            text is None
            and not whole
            and (clip.video_id in given["video"] or bool(dataset and dataset.strip()))
        )
        if text is not None:
            rows.append({"clip_id": clip.clip_id, "caption": text, "source": source})
    table = pd.DataFrame(rows, columns=empty.columns).sort_values("clip_id", ignore_index=True)
    stats = {f"given_{s}": int(n) for s, n in table.source.value_counts().items()}
    return table, stats | {"split_videos": int(split)}
