"""A person's corrections of the captions: `filter.overrides`, and the file to edit.

The file is YAML, one entry per clip (by clip_id) or per source video (by path: every
clip of that video), applied after the quality gate:

    3f2a9c0e1b7d4a55-00000000-00006000: A fighter winds up and slaps his opponent, ...
    /data/slaps/clip_0042.mp4:
      reject: the referee blocks the view

A caption entry is the clip's caption from then on and accepts the clip (a person's word
outranks the gate; its score is still computed, for ranking); a reject entry rejects it
with that reason. `cogpipe captions CONFIG --export FILE` writes every current caption in
this format (rejected clips as reject entries), so a person edits a few and points
`filter.overrides` at the file: fed back unchanged, it changes nothing and exports to the
same file. Overrides enter the filter's key by content, so only filter and what follows
it recompute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from cogpipe.config import ConfigError

HEADER = (
    "# cogpipe captions: clip_id (or a source video's path) -> caption, or -> {reject: why}.\n"
    "# Edit what you want to change, then set filter.overrides to this file.\n"
)


@dataclass(frozen=True)
class Override:
    line: int  # in the file, 1-based
    caption: str | None = None
    reject: str | None = None


def read_overrides(path: Path) -> dict[str, Override]:
    """{clip_id or path: Override} of an overrides file.

    Raises:
        ConfigError: the file is not YAML, not a mapping, or an entry is neither a caption
            nor {reject: reason} (the message names the file and the line).
    """
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"filter.overrides {path}: cannot read: {e}") from e
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"filter.overrides {path}: expected a mapping of clip_id -> caption")
    out = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        key, value = yaml.safe_load(yaml.serialize(key_node)), _value(value_node)
        entry = _entry(value, line)
        if entry is None or not isinstance(key, str):
            raise ConfigError(
                f"filter.overrides {path}: line {line}: expected `clip_id: caption` or"
                f" `clip_id: {{reject: reason}}`, got {key!r}: {value!r}"
            )
        if key in out:
            raise ConfigError(f"filter.overrides {path}: line {line}: {key} is listed twice")
        out[key] = entry
    return out


def _value(node: yaml.Node):
    return yaml.safe_load(yaml.serialize(node))


def _entry(value, line: int) -> Override | None:
    if isinstance(value, str) and value.strip():
        return Override(line, caption=value)  # verbatim: an unedited export changes nothing
    if isinstance(value, dict) and set(value) == {"reject"} and str(value["reject"]).strip():
        return Override(line, reject=str(value["reject"]).strip())
    return None


def _targets(key: str, clips: pd.DataFrame, bases: list[Path]) -> list[str]:
    """The clip_ids an entry names: the clip, or every clip of the video at that path."""
    if key in set(clips.clip_id):
        return [key]
    wanted = {os.path.normpath(b / key) for b in (Path("/"), *bases)}
    return list(clips.clip_id[clips.path.map(os.path.normpath).isin(wanted)])


def resolve(path: Path, clips: pd.DataFrame, source: Path) -> dict[str, Override]:
    """{clip_id: Override} for the clips of the check table.

    Raises:
        ConfigError: an entry names no clip and no video (file and line in the message).
    """
    bases = [path.parent, source if source.is_dir() else source.parent]
    out = {}
    for key, entry in read_overrides(path).items():
        ids = _targets(key, clips, bases)
        if not ids:
            raise ConfigError(
                f"filter.overrides {path}: line {entry.line}: {key!r} is no clip_id of the check"
                " stage and no path of a source video"
            )
        out |= dict.fromkeys(ids, entry)
    return out


def apply_overrides(table: pd.DataFrame, overrides: dict[str, Override], rescore) -> pd.DataFrame:
    """The judged table with the overrides applied and an `override` column (True where an
    entry changed the caption or the verdict).

    Args:
        table: clip_id, caption, score, accepted, reasons, source (one row per clip).
        overrides: {clip_id: Override} (`resolve`).
        rescore: caption -> score, for a caption a person wrote.
    """
    table = table.copy()
    table["override"] = False
    for i in table.index[table.clip_id.isin(overrides)]:
        entry, row = overrides[table.at[i, "clip_id"]], table.loc[i]
        if entry.reject is not None:
            changed = bool(row.accepted) or row.reasons != entry.reject
            table.loc[i, ["accepted", "reasons"]] = [False, entry.reject]
        else:
            changed = not row.accepted or row.caption != entry.caption
            if row.caption != entry.caption:
                table.loc[i, ["caption", "score", "source"]] = [
                    entry.caption,
                    rescore(entry.caption),
                    "override",
                ]
            table.loc[i, ["accepted", "reasons"]] = [True, ""]
        table.at[i, "override"] = changed
    return table


def export_captions(table: pd.DataFrame, path: Path) -> int:
    """Write the curated table's captions as an overrides file; returns the entries.

    Accepted clips as `clip_id: caption`, rejected ones as `clip_id: {reject: reasons}`.
    """
    from cogpipe.workspace import atomic_path

    entries = {
        r.clip_id: r.caption if r.accepted else {"reject": r.reasons or "rejected"}
        for r in table.sort_values("clip_id").itertuples()
        if r.accepted or isinstance(r.reasons, str)
    }
    text = yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=100)
    with atomic_path(path) as tmp:
        tmp.write_text(HEADER + text, encoding="utf-8")
    return len(entries)
