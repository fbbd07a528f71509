"""Export the curated training set as a dataset another trainer reads.

    cogpipe export-dataset demo/demo.yaml --format finetrainers exported/
    cogpipe export-dataset demo/demo.yaml --format diffusers exported-diffusers/

    result = export_dataset(cfg, "exported/", "jsonl")   # ExportedDataset(clips=7, written=7, ...)

The clips exported are the config's finished filter stage's `selected` clips that check put
in the `train` split, in clip_id order. Each is its span [start, end) of its source cut to
its own file `videos/<clip_id>.mp4`: decoded with cogpipe's reader (display rotation
applied), resampled to a constant frame rate at the source's fps (target frame k is the
frame shown at start + k / fps), and encoded H.264 (libx264, yuv420p, CRF 18, odd sizes
padded by one edge pixel), without audio, a few clips at once on a thread pool. Every
clip file is written under a temporary name and renamed; its record
(`.cogpipe/clips/<clip_id>.json`: the span, the source's video_id, the encoder settings,
the file's size, mtime and sha256) follows it. A rerun, after an interruption or a config
change, re-encodes only clips without a matching record and file, and deletes the files of
clips no longer selected. The list files are written last, so an export is readable only
once complete. OUT must be new, empty or an earlier export of the same format (its marker
`.cogpipe/export.json` says which); `force` exports into any folder and removes the list
files of other layouts there (LAYOUT_FILES), so readers see one layout only.

Layouts (what each consumer documents):

- **finetrainers**: `videos/*.mp4` + `metadata.csv` with columns `file_name` (relative
  path) and `caption`, then provenance columns. finetrainers' docs/dataset/README.md
  (a-r-r-o-w/finetrainers) lists three local layouts: the two-file format (`prompt.txt` +
  `videos.txt`), caption-data file pairs, and `metadata.csv|json|jsonl` read by
  `VideoFolderDataset`, i.e. 🤗 datasets' `videofolder` (`file_name` column), whose samples
  give `caption` to the trainer (`finetrainers/data/dataset.py`). The metadata CSV is the
  one that carries a caption exactly: quoting keeps commas, quotes and newlines, where the
  two-file format splits `prompt.txt` with `str.splitlines()`. Some finetrainers versions
  also require a metadata file for a local folder.
- **diffusers**: `videos/*.mp4` + `videos.txt` (one relative path per line) + `prompts.txt`
  (one caption per line), what diffusers' `examples/cogvideo/train_cogvideox_lora.py` reads
  with `--instance_data_root OUT --caption_column prompts.txt --video_column videos.txt`
  (its dataset reads both files line by line and strips each line), the layout of
  CogVideo's finetune README. A caption's line breaks (any `str.splitlines` boundary)
  become spaces here.
- **jsonl**: `videos/*.mp4` + `metadata.jsonl`, one object per clip with `file_name`,
  `caption` and the provenance fields (🤗 datasets' folder metadata convention).

Provenance fields (finetrainers and jsonl): `source_clip_id`, `source_path`, `start`, `end`
(seconds in the source), `category` and `score` (from filter). Every layout re-ingests into
cogpipe (`ingest.source: OUT`, layout auto) as the same clips with the same captions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cogpipe.config import PipelineConfig
from cogpipe.errors import UserError
from cogpipe.stages import UPSTREAM, finished, stage_keys
from cogpipe.video import VideoReader
from cogpipe.workspace import (
    Progress,
    StageNotReady,
    Workspace,
    atomic_path,
    clean_stale_tmp,
    no_progress,
    read_table,
    sha256_file,
    write_json,
)

FORMATS = ("finetrainers", "diffusers", "jsonl")
VERSION = 1  # the clip recipe below; a new version re-encodes every clip
CRF = 18  # x264 constant quality: visually lossless for training data
STATE = ".cogpipe"  # OUT/.cogpipe/export.json and clips/<clip_id>.json (hidden from HF datasets)
LIST_FILES = {
    "finetrainers": ("metadata.csv",),
    "diffusers": ("videos.txt", "prompts.txt"),
    "jsonl": ("metadata.jsonl",),
}
# Files that tell a reader (cogpipe ingest, finetrainers, diffusers) which layout a folder
# has; with --force the ones of other layouts are removed so only this export is read.
LAYOUT_FILES = (
    "metadata.csv",
    "metadata.jsonl",
    "metadata.json",
    "videos.txt",
    "video.txt",
    "prompts.txt",
    "prompt.txt",
    "captions.txt",
    "caption.txt",
)
PROVENANCE = ("source_clip_id", "source_path", "start", "end", "category", "score")


class DatasetExportError(UserError, RuntimeError):
    """An export that cannot go ahead; the message says what to do."""


@dataclass
class ExportedDataset:
    """What `export_dataset` did."""

    format: str
    out: str
    clips: int  # clips in the export
    written: int  # encoded this run
    reused: int  # already there with a matching record
    removed: int  # files of clips no longer selected, deleted
    seconds: float


# -- what to export ----------------------------------------------------------------------
def selected_clips(cfg: PipelineConfig) -> pd.DataFrame:
    """The selected training clips of the config's finished filter stage, by clip_id.

    Returns:
        One row per clip: clip_id, caption, score, category, video_id, path, start, end, fps.

    Raises:
        StageNotReady: check or filter is not finished for this config.
        DatasetExportError: no selected clip is in the train split.
    """
    ws = Workspace(cfg.workspace)
    keys = stage_keys(cfg, "filter")
    paths = {}
    for stage in ("check", "filter"):
        res = finished(ws, cfg, stage, keys[stage], {u: keys[u] for u in UPSTREAM[stage]})
        if res is None:
            raise StageNotReady(
                f"the {stage} stage is not finished for this config (key {keys[stage]}); run "
                f"`cogpipe run CONFIG --until filter` (or `cogpipe {stage} CONFIG` once its "
                "inputs are done) first"
            )
        paths[stage] = Path(res.path)
    curated = read_table(paths["filter"] / "curated.parquet")
    clips = read_table(paths["check"] / "clips.parquet")
    table = curated[["clip_id", "caption", "score", "category", "selected"]].merge(
        clips[["clip_id", "video_id", "path", "start", "end", "fps", "split"]],
        on="clip_id",
        validate="one_to_one",
    )
    chosen = table[table.selected.astype(bool) & (table.split == "train")]
    if chosen.empty:
        raise DatasetExportError(
            f"no selected training clip to export: {int(table.selected.sum())} selected in "
            f"{paths['filter'] / 'curated.parquet'}, none in the train split"
        )
    chosen = chosen.drop(columns=["selected", "split"]).sort_values("clip_id", ignore_index=True)
    chosen.attrs["filter"] = str(paths["filter"])  # recorded in the export's marker
    return chosen


def one_line(caption: str) -> str:
    """A caption for a line-per-caption file: every line boundary becomes a space."""
    return " ".join(caption.splitlines()).strip()


# -- one clip ----------------------------------------------------------------------------
def cfr_frames(reader: VideoReader, start: float, end: float, fps: float) -> Iterator[np.ndarray]:
    """The frames shown at start + k / fps for k < round((end - start) * fps), in order.

    One forward decode of the span: a frame is repeated or skipped where the source's
    timing is not constant. A quarter frame of slack absorbs timestamp rounding.
    Yields [H, W, 3] uint8 RGB, display rotation applied.
    """
    count = max(1, round((end - start) * fps))
    slack = 0.25 / fps
    k, shown, rgb = 0, None, None
    for t, raw in reader.scan(start, end, convert=False):
        while shown is not None and k < count and t > start + k / fps + slack:
            rgb = reader.array(shown) if rgb is None else rgb
            yield rgb
            k += 1
        shown, rgb = raw, None
    if shown is None:
        raise DatasetExportError(f"{reader.path}: no frame decodes in [{start:.3f}, {end:.3f})")
    rgb = reader.array(shown) if rgb is None else rgb
    for _ in range(k, count):
        yield rgb


def encode_clip(
    source: str | Path, start: float, end: float, fps: float, dest: Path, threads: int = 1
) -> int:
    """Cut [start, end) of `source` to an H.264 mp4 at a constant `fps`.

    Args:
        source: the source video.
        start: span start, seconds from the first frame.
        end: span end (exclusive), seconds.
        fps: output frame rate (the source's).
        dest: output file (any name: the muxer is mp4 whatever the suffix).
        threads: x264 threads.

    Returns:
        Frames written.
    """
    import av

    if "libx264" not in av.codecs_available:
        raise DatasetExportError("this FFmpeg build (PyAV) has no libx264 encoder")
    rate = Fraction(fps).limit_denominator(1001)
    written = 0
    with VideoReader(source) as reader, av.open(str(dest), mode="w", format="mp4") as container:
        stream = None
        for frame in cfr_frames(reader, start, end, fps):
            h, w = frame.shape[:2]
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
                stream.options = {"crf": str(CRF), "threads": str(threads)}
            if (h % 2, w % 2) != (0, 0):  # [H, W, 3] -> even [H', W', 3], edge repeated
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            image.pts, image.time_base = written, 1 / rate
            container.mux(stream.encode(image))
            written += 1
        container.mux(stream.encode())  # flush the encoder
    return written


def clip_spec(row: Any) -> dict[str, Any]:
    """What decides a clip file's content: the source bytes, the span, the recipe."""
    return {
        "v": VERSION,
        "video_id": row.video_id,
        "start": float(row.start),
        "end": float(row.end),
        "fps": float(row.fps),
        "crf": CRF,
    }


def _record_path(out: Path, clip_id: str) -> Path:
    return out / STATE / "clips" / f"{clip_id}.json"


def _reusable(out: Path, row: Any) -> bool:
    """Whether the clip's file is there, written by this recipe from this span.

    Size and mtime as recorded: yes without reading it; a file of the recorded size with
    another mtime (a copied export) is hashed.
    """
    try:
        record = json.loads(_record_path(out, row.clip_id).read_text())
        st = (out / record["file"]).stat()
        if record["spec"] != clip_spec(row) or st.st_size != record["size"]:
            return False
        return st.st_mtime_ns == record["mtime_ns"] or (
            sha256_file(out / record["file"]) == record["sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _export_clip(out: Path, row: Any, threads: int) -> bool:
    """Encode one clip unless a matching file is there; True when it was encoded."""
    if _reusable(out, row):
        return False
    rel = f"videos/{row.clip_id}.mp4"
    with atomic_path(out / rel) as tmp:
        frames = encode_clip(
            row.path, float(row.start), float(row.end), float(row.fps), tmp, threads
        )
    st = (out / rel).stat()
    record = {
        "file": rel,
        "spec": clip_spec(row),
        "frames": frames,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256_file(out / rel),
    }
    write_json(_record_path(out, row.clip_id), record)
    return True


# -- the folder --------------------------------------------------------------------------
def prepare_out(out: Path, fmt: str, force: bool = False) -> None:
    """Make `out` an export of `fmt`: new, empty, or an earlier export of `fmt`.

    Raises:
        DatasetExportError: `out` is a file, or a folder holding something else (another
            format's export, other files) and `force` is False.
    """
    if out.exists() and not out.is_dir():
        raise DatasetExportError(f"{out} exists and is not a folder")
    marker = out / STATE / "export.json"
    try:
        earlier = json.loads(marker.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if out.is_dir() and any(out.iterdir()) and earlier != fmt and not force:
        what = f"a {earlier} export" if earlier else "not a cogpipe dataset export"
        raise DatasetExportError(
            f"{out} exists and is {what}; choose another folder, or pass --force to export "
            f"{fmt} into it (files of other layouts there are removed)"
        )
    for name in set(LAYOUT_FILES) - set(LIST_FILES[fmt]):
        (out / name).unlink(missing_ok=True)
    write_json(marker, {"format": fmt, "tool": "cogpipe export-dataset", "complete": False})
    clean_stale_tmp(out / "videos")


def _rows(clips: pd.DataFrame) -> list[dict[str, Any]]:
    """One metadata record per clip: file_name and caption first, then provenance."""
    return [
        {
            "file_name": f"videos/{r.clip_id}.mp4",
            "caption": r.caption,
            "source_clip_id": r.clip_id,
            "source_path": str(r.path),
            "start": float(r.start),
            "end": float(r.end),
            "category": r.category,
            "score": float(r.score),
        }
        for r in clips.itertuples(index=False)
    ]


def _jsonl(record: dict[str, Any]) -> str:
    # U+2028 / U+2029 are legal in JSON strings but split lines for str.splitlines readers.
    text = json.dumps(record, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def list_files(clips: pd.DataFrame, fmt: str) -> dict[str, str]:
    """The text of each list file of `fmt` (name -> content) for `clips`."""
    rows = _rows(clips)
    if fmt == "diffusers":
        return {
            "videos.txt": "".join(f"{r['file_name']}\n" for r in rows),
            "prompts.txt": "".join(f"{one_line(r['caption'])}\n" for r in rows),
        }
    if fmt == "jsonl":
        return {"metadata.jsonl": "".join(_jsonl(r) + "\n" for r in rows)}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return {"metadata.csv": buffer.getvalue()}


def _prune(out: Path, keep: set[str]) -> int:
    """Delete the files and records of clips not in `keep`; returns how many."""
    removed = 0
    for record_path in sorted((out / STATE / "clips").glob("*.json")):
        if record_path.stem in keep:
            continue
        try:
            (out / json.loads(record_path.read_text())["file"]).unlink(missing_ok=True)
        except (OSError, ValueError, KeyError):
            pass
        record_path.unlink(missing_ok=True)
        removed += 1
    return removed


# -- the export --------------------------------------------------------------------------
def _encode_all(
    out: Path, clips: pd.DataFrame, workers: int, progress: Progress
) -> tuple[int, list[str]]:
    """Encode every clip not already there, `workers` at a time; (written, errors)."""
    rows = list(clips.itertuples(index=False))
    threads = max(1, (os.cpu_count() or 1) // workers)
    written, errors = 0, []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_export_clip, out, row, threads): row for row in rows}
        for done, future in enumerate(as_completed(futures), start=1):
            row = futures[future]
            try:
                written += future.result()
            except Exception as e:  # a broken source: the others still commit
                errors.append(f"{row.clip_id} ({row.path}): {type(e).__name__}: {e}")
            progress(done, len(rows), row.clip_id)
    return written, sorted(errors)


def export_dataset(
    cfg: PipelineConfig,
    out: str | Path,
    fmt: str,
    force: bool = False,
    workers: int = 0,
    progress: Progress = no_progress,
) -> ExportedDataset:
    """Write the config's selected training clips to `out` in the layout of `fmt`.

    Args:
        cfg: the pipeline config; its filter stage must be finished.
        out: the export folder (created; an earlier export of `fmt` is updated in place).
        fmt: one of FORMATS: finetrainers, diffusers or jsonl.
        force: export into a folder that holds something else.
        workers: clips encoded at once; 0: one per CPU core, at most 8.
        progress: called as (clips done, clips total, clip_id).

    Returns:
        Counts of clips exported, written this run, reused and removed, and the seconds taken.

    Raises:
        StageNotReady: filter (or check) is not finished for this config.
        DatasetExportError: nothing to export, `out` is not an export of `fmt` (without
            `force`), or clips failed to encode (the others are committed).
    """
    started = time.time()
    if fmt not in FORMATS:
        raise DatasetExportError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
    clips = selected_clips(cfg)
    out = Path(out).resolve()
    prepare_out(out, fmt, force)
    workers = workers or min(8, os.cpu_count() or 1)
    written, errors = _encode_all(out, clips, workers, progress)
    if errors:
        raise DatasetExportError(
            f"{len(errors)} of {len(clips)} clips failed to encode (the rest are in {out}; "
            f"rerun to retry): " + "; ".join(errors[:3])
        )
    for name, text in list_files(clips, fmt).items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    removed = _prune(out, set(clips.clip_id))
    result = ExportedDataset(
        fmt,
        str(out),
        len(clips),
        written,
        len(clips) - written,
        removed,
        round(time.time() - started, 3),
    )
    record = asdict(result) | {
        "tool": "cogpipe export-dataset",
        "complete": True,
        "filter": clips.attrs["filter"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / STATE / "export.json", record)
    return result
