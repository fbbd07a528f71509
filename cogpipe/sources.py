"""Reading `ingest.source`: every layout users have, and every caption that comes with it.

Layouts read from `ingest.source` (`ingest.layout: auto` tells them apart by what is there):

- folder: every file under a folder (recursive, symlinks followed, loops detected). A
  video with a sibling `<stem>.txt` (`clip.mp4` + `clip.txt`, the caption-file pairs of
  finetrainers and most LoRA trainers) gets that text as its caption; the consumed .txt
  is not a row of its own, and a .txt with no video beside it stays a rejected row.
- list: one file, `.csv` / `.jsonl` / `.json` records or a `.txt` of paths, relative to
  the file's folder.
- diffusers: the diffusers / CogVideo / finetrainers two-file layout: one of `prompt.txt`,
  `prompts.txt`, `caption.txt`, `captions.txt` paired line by line with one of
  `video.txt`, `videos.txt` (paths relative to the folder).
- metadata: HF / finetrainers `metadata.csv`, `metadata.jsonl` or `metadata.json` (a
  JSON array of records) with a path column (PATH_COLUMNS) and a caption (CAPTION_COLUMNS).

The file names follow finetrainers' dataset docs (a-r-r-o-w/finetrainers,
docs/dataset/README.md: "Two file format", "Caption-Data filename pair format",
"CSV/JSON/JSONL format"). Captions that come with a dataset are kept in `source_caption`,
and none is dropped silently: a caption that cannot be matched to one video (line counts
that differ, a blank video line, two caption lists at once, a video listed twice with two
captions) is a `SourceError` naming the file and the line. A blank caption line means "no
caption" for its video and keeps its place in the alignment.

    entries = list_source(cfg)   # (path, size, mtime_ns, caption, error), by path
"""

from __future__ import annotations

import codecs
import csv
import errno
import json
import os
import re
import stat
from pathlib import Path

from cogpipe.config import PipelineConfig

PATH_COLUMNS = (
    "path",
    "file_name",
    "video",
    "video_path",
    "video_file",
    "video_file_name",
    "file_path",
    "file",
)
CAPTION_COLUMNS = ("caption", "prompt", "text", "description")
CAPTION_LISTS = ("prompt.txt", "prompts.txt", "caption.txt", "captions.txt")
VIDEO_LISTS = ("video.txt", "videos.txt")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.json")
LIST_HEAD = 1 << 16  # bytes of a list file read to tell text from binary

_GAP = re.compile(r"[\s,]*")  # between two elements of a JSON array

Entry = tuple[str, int, int, str | None, str]  # path, size, mtime_ns, caption, stat error
Found = tuple[str, str | None, str]  # path, caption, error
Record = tuple[str, str | None, int]  # path as listed, caption, line in the list file


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


def _read_caption(path: str, video: str) -> tuple[str | None, str]:
    """(caption, error) of the caption file `path` of `video`; a blank file is no caption."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"caption file of {os.path.basename(video)} cannot be read ({e})"
    return text or None, ""


def _pair_captions(files: list[tuple[str, str]], extensions: list[str]) -> list[Found]:
    """Folder files as (path, caption, error): a video's sibling `<stem>.txt` is its caption.

    A consumed caption file is not an entry. One beside several videos of its stem
    (`a.mp4` and `a.mov`) or one that cannot be read stays an entry, rejected with why.
    """
    videos: dict[str, list[str]] = {}
    for path, error in files:
        stem, ext = os.path.splitext(path)
        if not error and ext.lower() in extensions:
            videos.setdefault(stem, []).append(path)
    captions: dict[str, str | None] = {}
    rest: list[tuple[str, str]] = []
    for path, error in files:
        stem, ext = os.path.splitext(path)
        beside = videos.get(stem, []) if ext.lower() == ".txt" and not error else []
        if len(beside) == 1:
            captions[beside[0]], error = _read_caption(path, beside[0])
            if not error:
                continue
        elif beside:
            names = ", ".join(os.path.basename(v) for v in beside)
            error = f"caption file beside {len(beside)} videos ({names}): which one is ambiguous"
        rest.append((path, error))
    return [(path, captions.get(path), error) for path, error in rest]


def _lines(path: Path) -> list[str]:
    """The stripped lines of a text file; blank lines keep their place, and the newline
    that ends the last line starts no line of its own."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # universal newlines
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def _array_lines(text: str) -> list[int]:
    """The line (1-based) on which each element of a valid JSON array starts."""
    decoder, out = json.JSONDecoder(), []
    line, counted = 1, 0
    at = _GAP.match(text, text.index("[") + 1).end()
    while text[at] != "]":
        line += text.count("\n", counted, at)
        counted = at
        out.append(line)
        _, at = decoder.raw_decode(text, at)
        at = _GAP.match(text, at).end()
    return out


def _json_line(path: Path, line: str, i: int) -> object:
    """Line `i` of a JSON-lines file, parsed."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: line {i} is not JSON ({e.msg})") from e


def _json_rows(path: Path, text: str) -> list[dict]:
    """The records of a JSON array (`metadata.json`) or of JSON lines, with '_line'."""
    if text.lstrip().startswith("["):
        rows = list(zip(json.loads(text), _array_lines(text), strict=True))
    else:
        lines = enumerate(text.split("\n"), start=1)
        rows = [(_json_line(path, line, i), i) for i, line in lines if line.strip()]
    for row, line in rows:
        if not isinstance(row, dict):
            raise SourceError(f"{path}: line {line} is not a record (a JSON object)")
    return [{**row, "_line": line} for row, line in rows]


def _rows_of(path: Path) -> list[dict]:
    """The records of a CSV, JSON or JSONL file, each with its line number as '_line'."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                return [{**row, "_line": reader.line_num} for row in reader]
            text = f.read()
        return _json_rows(path, text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e


def _field(row: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` with a non-blank value in `row`, stripped."""
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _records(path: Path) -> list[Record]:
    """(path as listed, caption, line) of a CSV / JSON / JSONL list or a text list of paths."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        return [(p, None, i) for i, p in enumerate(_lines(path), start=1) if p]
    out = []
    for row in _rows_of(path):
        video = _field(row, PATH_COLUMNS)
        if video is None:
            raise SourceError(
                f"{path}: line {row['_line']} has no path column (one of {', '.join(PATH_COLUMNS)})"
            )
        out.append((video, _field(row, CAPTION_COLUMNS), row["_line"]))
    return out


def _one_of(root: Path, names: tuple[str, ...], what: str) -> Path | None:
    """The one file of `names` in `root` (None if none); two at once are ambiguous."""
    present = [root / name for name in names if (root / name).is_file()]
    if len(present) > 1:
        raise SourceError(
            f"{present[0]} and {present[1]} are both {what} files: which one is meant is"
            " ambiguous; keep one of them"
        )
    return present[0] if present else None


def _two_files(root: Path) -> tuple[list[Record], str]:
    """diffusers / CogVideo / finetrainers layout: line i of the video list is captioned by
    line i of the caption list (a blank caption line: that video has no caption)."""
    videos_txt = _one_of(root, VIDEO_LISTS, "video list")
    if videos_txt is None:
        raise SourceError(f"{root}: no video list ({' or '.join(VIDEO_LISTS)}; layout: diffusers)")
    captions_txt = _one_of(root, CAPTION_LISTS, "caption list")
    videos = _lines(videos_txt)
    captions = [""] * len(videos) if captions_txt is None else _lines(captions_txt)
    if len(captions) > len(videos):
        raise SourceError(
            f"{captions_txt} has {len(captions)} lines but {videos_txt} has {len(videos)}:"
            f" line {len(videos) + 1} of {captions_txt} captions no video"
        )
    if len(captions) < len(videos):
        raise SourceError(
            f"{captions_txt} has {len(captions)} lines but {videos_txt} has {len(videos)}:"
            f" line {len(captions) + 1} of {videos_txt} has no caption line (a blank line"
            " means no caption)"
        )
    if "" in videos:
        line = videos.index("") + 1
        raise SourceError(
            f"{videos_txt}: line {line} is blank; every line names the video that line {line}"
            f" of {captions_txt or 'the caption list'} captions"
        )
    pairs = enumerate(zip(videos, captions, strict=True), start=1)
    return [(video, caption or None, i) for i, (video, caption) in pairs], str(videos_txt)


def _merge(records: list[Record], base: Path, where: str) -> list[Found]:
    """One entry per listed path (relative to `base`); a path listed twice keeps its caption,
    and a path listed twice with two different captions is an error naming both lines."""
    seen: dict[str, tuple[str | None, int]] = {}
    for path, caption, line in records:
        full = os.path.normpath(os.path.join(base, path))
        first, first_line = seen.get(full, (None, line))
        if caption and first and caption != first:
            raise SourceError(
                f"{where}: {path} is listed on line {first_line} and line {line} with"
                f" different captions ({_short(first)!r} and {_short(caption)!r})"
            )
        seen[full] = (first, first_line) if first else (caption, line)
    return [(path, caption, "") for path, (caption, _) in seen.items()]


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def detect_layout(source: Path) -> str:
    """What `ingest.layout: auto` reads `source` as: a file is a `list`; a folder with a
    video list is `diffusers`, one with a metadata file `metadata`, any other `folder`.

    Raises:
        SourceError: the folder holds two kinds of caption source (a video list and a
            metadata file), or a caption list with no video list to pair it with.
    """
    if source.is_file():
        return "list"
    lists = [source / n for n in VIDEO_LISTS if (source / n).is_file()]
    metas = [source / n for n in METADATA_FILES if (source / n).is_file()]
    captions = [source / n for n in CAPTION_LISTS if (source / n).is_file()]
    if lists and metas:
        raise SourceError(
            f"{lists[0]} and {metas[0]} both list the dataset's videos: which one is meant is"
            " ambiguous; set ingest.layout to diffusers or metadata"
        )
    if captions and not lists:
        raise SourceError(
            f"{captions[0]} is a caption list with no video list ({' or '.join(VIDEO_LISTS)})"
            " beside it, so its captions match no video; add one, or set ingest.layout"
        )
    return "diffusers" if lists else "metadata" if metas else "folder"


def _require_text(source: Path, extensions: list[str]) -> None:
    """A list file must be text: a video or any binary file given as `ingest.source` is a
    clear error, not a decode error from deep inside a list reader (its head is read, never
    the whole file, so a 10 GB video costs nothing)."""
    kinds = "a folder or a list of videos (.csv, .jsonl, .json, or a .txt of paths)"
    if source.suffix.lower() in extensions:
        raise SourceError(
            f"ingest.source {source} is a video file, not {kinds}: give the folder that holds it"
        )
    try:
        with open(source, "rb") as f:
            head = f.read(LIST_HEAD)
    except OSError as e:
        raise SourceError(f"ingest.source {source}: cannot read ({e.strerror})") from e
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < LIST_HEAD)
        text = b"\x00" not in head
    except UnicodeDecodeError:
        text = False
    if not text:
        raise SourceError(f"ingest.source {source} is a binary file, not {kinds}")


def _read_layout(source: Path, layout: str, extensions: list[str]) -> list[Found]:
    """(path, caption, error) of every input that `layout` finds in `source`."""
    if layout == "list":
        if not source.is_file():
            raise SourceError(f"ingest.source {source} is not a list file (layout: list)")
        _require_text(source, extensions)
        return _merge(_records(source), source.parent, str(source))
    if not source.is_dir():
        raise SourceError(f"ingest.source {source} is not a folder (layout: {layout})")
    if layout == "folder":
        return _pair_captions(_walk(source), extensions)
    if layout == "diffusers":
        records, where = _two_files(source)
        return _merge(records, source, where)
    meta = _one_of(source, METADATA_FILES, "metadata")
    if meta is None:
        raise SourceError(f"{source}: no {', '.join(METADATA_FILES)} (layout: metadata)")
    return _merge(_records(meta), source, str(meta))


def _stat(path: str, caption: str | None, error: str) -> Entry:
    """The entry of one input: size -1 and the reason in `error` when it cannot be statted.

    A file this process may not read is an entry with the error "permission denied", never
    probed: the error is part of the listing, so once the permission is fixed the listing
    (and the ingest key) changes and the file is probed.
    """
    size = mtime = -1
    if not error:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                error = f"not a regular file ({_kind(st.st_mode)})"
            elif not os.access(path, os.R_OK):
                error = "permission denied"
            else:
                size, mtime = st.st_size, st.st_mtime_ns
        except OSError as e:
            error = _stat_error(path, e)
        except ValueError as e:  # a list line with a NUL byte in it
            error = f"not a valid path ({e})"
    return (path, size, mtime, caption, error)


def list_source(cfg: PipelineConfig) -> list[Entry]:
    """Every input of `ingest.source` as (path, size, mtime_ns, caption, error), by path.

    A path listed twice is one entry. Inputs that cannot be statted keep their row with
    the reason in `error` and size -1.

    Raises:
        FileNotFoundError: the source does not exist.
        SourceError: a list or layout file is malformed, or a caption it holds cannot be
            matched to exactly one video (the message names the file and the line), or
            the source holds no file at all.
    """
    source = cfg.ingest.source
    if not source.exists():
        raise FileNotFoundError(f"ingest.source {source} does not exist")
    layout = detect_layout(source) if cfg.ingest.layout == "auto" else cfg.ingest.layout
    extensions = [e.lower() for e in cfg.ingest.extensions]
    entries = [_stat(*found) for found in _read_layout(source, layout, extensions)]
    if not entries:
        raise SourceError(
            f"ingest.source {source} holds no files ({layout} layout): nothing to ingest"
        )
    return sorted(entries, key=lambda entry: entry[0])


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
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
