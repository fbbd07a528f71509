"""Disk: what a workspace holds (`cogpipe du`) and freeing what no config uses (`cogpipe gc`).

A workspace only grows: every changed config adds stage keys, cache entries and runs.
Which of them a config still uses is computed from the config alone, with the pipeline's
own key functions (`stages.stage_keys`, `stages.stage_path`), never by running anything:

- stage outputs: `<stage>/<key>/`, `train/<run>/`, `evaluate/<ekey>/<run>/`;
- `cache/latents`, `cache/text`: the content keys in the `index.parquet` of a used
  precompute key (or, before it is written, its plan from the finished filter);
- `cache/recaption/<pass>/`: the passes a used recaption key's rounds go through;
- `cache/evaluate-base`: the base videos of a used prompt list, and any one hard-linked
  into an evaluation that stays.

`gc` removes the rest, except what a person cannot get back by running again: a training
run no config uses loses only its training states (`training_state.pt`); its LoRA (or
full) checkpoints and their evaluations go only with `checkpoints=True`. Shared stores
(`cache/probe`), `.prefect`, `logs` and `.locks` are shown, never touched.

Safety: gc takes `.locks/workspace.lock` exclusively (a run holding it shared through
`in_use` makes gc refuse; one starting meanwhile waits) and refuses while any other
workspace lock is held (a stage is writing a unit); it walks no symlink (a link is
removed as a link, its target never read), and removes a folder by renaming it to a
temporary name first: an interrupted gc leaves whole stage folders or none, and the next
run's temporary sweep removes the rest.

    report = collect({"a.yaml": cfg_a, "b.yaml": cfg_b})
    print(report.freeable(checkpoints=False))
    gc({"a.yaml": cfg_a, "b.yaml": cfg_b}, dry_run=True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from cogpipe.config import PipelineConfig
from cogpipe.errors import UserError
from cogpipe.stages import UPSTREAM, finished, stage_keys, stage_path
from cogpipe.workspace import (
    TMP_PREFIX,
    Busy,
    Workspace,
    hold_lock,
    is_stale_tmp,
    read_table,
    tmp_name,
    write_table,
)

KEYED = ("ingest", "check", "caption", "recaption", "filter", "precompute")
ENTRY_STORES = ("latents", "text")  # cache/<store>/<xx>/<key>.safetensors
KEPT_ALWAYS = ("probe",)  # shared stores gc never prunes
LATENT_COLUMNS = ("latents_cache", "reference_cache", "image_cache")
RUN_LOCK = "workspace"  # .locks/workspace.lock: shared by runs (`in_use`), exclusive for gc


class DiskError(UserError, RuntimeError):
    """A du or gc that cannot go on: mixed workspaces, a running stage, unknown keys."""


@dataclass
class Item:
    """One thing on disk: a stage key, a run, an evaluation, a cache entry or store."""

    group: str  # "ingest".."precompute", "train", "evaluate", "cache/<store>", "other"
    path: Path
    files: int = 0
    bytes: int = 0
    # (st_dev, st_ino) -> [size, hard links, links in this item]: a file counts once
    inodes: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)
    used_by: list[str] = field(default_factory=list)  # config labels
    kind: str = "output"  # output | run | evaluation | entry | temporary | kept

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Usage:
    """What `collect` found: every item, per label the config's keys, the eval keys used."""

    root: Path
    items: list[Item]
    keys: dict[str, dict[str, str]]  # label -> stage -> key
    ekeys: set[str] = field(default_factory=set)  # evaluate/<ekey>/ folders a config uses

    def removals(self, checkpoints: bool) -> list[Item]:
        """What gc removes: unused outputs, entries and stale temporaries. An unused run
        goes whole only with `checkpoints`; else it loses its training states (a `states`
        item) and keeps its evaluations under a used eval key (nightly evaluates there),
        with the base videos they link."""
        staying = [
            it for it in self.items if it.kind == "evaluation" and not self._goes(it, checkpoints)
        ]
        linked = {inode for it in staying for inode in it.inodes}
        kept = {id(it) for it in staying}
        out = []
        for item in self.items:
            if item.used_by or item.kind == "kept" or id(item) in kept:
                continue
            if item.group == "cache/evaluate-base" and linked & set(item.inodes):
                continue
            if item.kind == "run" and not checkpoints:
                states = _states(item.path)
                out += [states] if states.files else []
                continue
            out.append(item)
        return out

    def _goes(self, item: Item, checkpoints: bool) -> bool:
        """Whether gc removes an evaluation: unused, and its run goes too or its eval key
        is one no config uses."""
        if item.used_by:
            return False
        run_stays = not checkpoints and (self.root / "train" / item.name).is_dir()
        return not (run_stays and item.path.parent.name in self.ekeys)


def check_workspace(configs: dict[str, PipelineConfig]) -> Workspace:
    """The one workspace every config writes to.

    Raises:
        DiskError: no config, or a config of another workspace (naming it and both paths).
    """
    if not configs:
        raise DiskError("give at least one config")
    (first, cfg), *rest = configs.items()
    root = Workspace(cfg.workspace).root
    for label, other in rest:
        if Workspace(other.workspace).root != root:
            raise DiskError(
                f"{label}: its workspace {Workspace(other.workspace).root} is not {root}"
                f" ({first}'s); give configs of one workspace"
            )
    if not root.is_dir():
        raise DiskError(f"{first}: workspace {root} does not exist (nothing written yet)")
    return Workspace(root)


def collect(configs: dict[str, PipelineConfig]) -> Usage:
    """Every item of the workspace, its size and which configs use it (a base video: the
    configs whose evaluations link it).

    Raises:
        DiskError: see `check_workspace`; a config's keys cannot be computed (its
            source is missing or unreadable).
    """
    ws = check_workspace(configs)
    refs = _References()
    keys = {label: refs.add(ws, label, cfg) for label, cfg in configs.items()}
    items = _scan(ws)
    for item in items:
        item.used_by = sorted(refs.users(item))
    linked: dict[tuple[int, int], set[str]] = defaultdict(set)
    for it in items:
        if it.kind == "evaluation":
            for inode in it.inodes:
                linked[inode] |= set(it.used_by)
    for item in items:
        if item.group == "cache/evaluate-base":
            users = set(item.used_by).union(*(linked.get(i, set()) for i in item.inodes))
            item.used_by = sorted(users)
    ekeys: dict[str, set[str]] = defaultdict(set)  # eval key -> the configs evaluating there
    for path, labels in refs.paths.items():
        if path.parent.parent == ws.root / "evaluate":
            ekeys[path.parent.name] |= labels
    for item in items:
        if item.group == "evaluate" and item.kind == "output":  # a file of an eval key
            item.used_by = sorted(ekeys.get(item.path.parent.name, ()))
    return Usage(ws.root, items, keys, set(ekeys))


class _References:
    """The paths and cache entries the configs use, with who uses them."""

    def __init__(self) -> None:
        self.paths: dict[Path, set[str]] = defaultdict(set)
        self.entries: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))

    def add(self, ws: Workspace, label: str, cfg: PipelineConfig) -> dict[str, str]:
        """Record what one config uses; returns its keys."""
        try:
            keys = stage_keys(cfg)
        except (OSError, ValueError) as e:  # no source, a bad layout (SourceError)
            raise DiskError(f"{label}: cannot compute its keys: {e}") from None
        for stage, key in keys.items():
            inputs = {up: keys[up] for up in UPSTREAM[stage]}
            self.paths[stage_path(ws, cfg, stage, key, inputs)].add(label)
        for store, names in _cache_entries(ws, cfg, keys).items():
            for name in names:
                self.entries[store][name].add(label)
        init = getattr(cfg.train, "init_from", None)
        if init is not None:  # the run a config starts from stays whole
            self._init_run(ws, label, Path(init).resolve())
        return keys

    def _init_run(self, ws: Workspace, label: str, init: Path) -> None:
        runs = ws.root / "train"
        if runs in init.parents:
            self.paths[runs / init.relative_to(runs).parts[0]].add(f"{label} (init_from)")

    def users(self, item: Item) -> set[str]:
        if item.group.startswith("cache/"):
            return set(self.entries[item.group.removeprefix("cache/")].get(item.name, ()))
        return set(self.paths.get(item.path, ()))


# --------------------------------------------------------------------------- references


def _cache_entries(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> dict[str, set[str]]:
    """The cache entries (by item name: `<key>.safetensors`, `<key>`, pass folder) a config
    uses, as far as its finished stages tell."""
    found: dict[str, set[str]] = defaultdict(set)
    plan = _precompute_plan(ws, cfg, keys)
    if plan is not None:
        for column in LATENT_COLUMNS:
            if column in plan:
                found["latents"] |= {f"{k}.safetensors" for k in plan[column].dropna()}
        found["text"] |= {f"{k}.safetensors" for k in plan.embeds_cache.dropna()}
    found["recaption"] |= _recaption_passes(ws, cfg, keys)
    found["evaluate-base"] |= _base_keys(cfg)
    return found


def _finished(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str], stage: str):
    return finished(ws, cfg, stage, keys[stage], {u: keys[u] for u in UPSTREAM[stage]})


def _precompute_plan(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]):
    """The precompute rows with their cache keys: its index, or its plan once filter is done."""
    index = ws.stage_dir("precompute", keys["precompute"]) / "index.parquet"
    if index.is_file():
        return read_table(index)
    ups = {s: _finished(ws, cfg, keys, s) for s in ("filter", "check")}
    if None in ups.values():
        return None
    from cogpipe import precompute as pc

    return pc.sample_table(cfg, ups)


def _recaption_passes(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> set[str]:
    """The `cache/recaption/<pass>` folders of a config's rounds: round 1 of the clips its
    gate rejects, then each shard's later rounds of what the round before left rejected,
    as far as their committed parts go (`recaption.run_rounds`, replayed without a model)."""
    from cogpipe.caption import merge_parts, shard_batches
    from cogpipe.filter import judge_captions, token_counter
    from cogpipe.recaption import pass_dir, rejected_ids, retry_config, shard_rows

    caption, check = (_finished(ws, cfg, keys, s) for s in ("caption", "check"))
    if caption is None or check is None or not cfg.filter.retries or cfg.caption.existing == "use":
        return set()
    count = token_counter(cfg)
    captions = read_table(Path(caption.path) / "captions.parquet")
    rejected = rejected_ids(captions, judge_captions(captions, cfg.filter, count))
    if not rejected:
        return set()
    cc = retry_config(cfg, 1)
    first = pass_dir(ws, cc, 1, rejected)
    passes, clips = {first.name}, read_table(Path(check.path) / "clips.parquet")
    todo = clips[clips.clip_id.isin(rejected)]
    for s in range(cc.shards):
        ids = [c for batch in shard_batches(todo, cc, s) for c in batch.clip_id]
        try:
            rows = shard_rows(first, s, ids) if ids else None
            for round_ in range(2, cfg.filter.retries + 1):
                still = rows is not None and rejected_ids(
                    rows, judge_captions(rows, cfg.filter, count)
                )
                if not still:
                    break
                rc = retry_config(cfg, round_).model_copy(update={"shards": 1})
                folder = pass_dir(ws, rc, round_, still)
                passes.add(folder.name)
                rows = merge_parts(folder, clips[clips.clip_id.isin(still)])
        except RuntimeError:  # a round not (fully) committed yet: no later round exists
            continue
    return passes


def _base_keys(cfg: PipelineConfig) -> set[str]:
    """The base-store videos of a prompt-list suite (`base_suite.base_key`); a held-out or
    image-to-video suite's are known from the evaluations that link them (`collect`)."""
    from cogpipe.base_suite import base_key
    from cogpipe.models import cogvideox

    prompts = cfg.evaluate.prompts
    if not isinstance(prompts, list):
        return set()
    try:
        t, v = cogvideox.transformer_config(cfg.model), cogvideox.vae_config(cfg.model)
        if cogvideox.model_shape(t, v).image_to_video:
            return set()
    except Exception:  # a model this machine cannot read: its evaluations' links tell
        return set()
    requests = [
        SimpleNamespace(prompt=p, seed=s, image=None) for p in prompts for s in cfg.evaluate.seeds
    ]
    return {base_key(cfg, r) for r in requests}


# --------------------------------------------------------------------------- scan


def _measure(item: Item, path: Path) -> Item:
    """Add a file or folder's files and bytes to `item`, walking no symlink."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        item.files += 1
        seen = item.inodes.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])
        item.bytes += st.st_size if not seen[2] else 0  # a hard link counts once
        seen[2] += 1
        return item
    for folder, dirs, files in os.walk(path):  # followlinks=False: a linked folder is a file
        for name in files + [d for d in dirs if Path(folder, d).is_symlink()]:
            _measure(item, Path(folder, name))
    return item


def _children(folder: Path) -> list[Path]:
    """Entries of a folder, sorted; none when it is missing or a symlink (never followed)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(folder.iterdir())


def _scan(ws: Workspace) -> list[Item]:
    """Every item of the workspace, measured."""
    items: list[Item] = []
    known = {*KEYED, "train", "evaluate", "cache"}
    for stage in KEYED:
        items += [_item(stage, p, "output") for p in _children(ws.root / stage)]
    items += [_item("train", p, "run") for p in _children(ws.root / "train")]
    for ekey in _children(ws.root / "evaluate"):
        if ekey.is_dir() and not ekey.is_symlink() and not ekey.name.startswith(TMP_PREFIX):
            for p in _children(ekey):  # run folders; files of the eval key (real features)
                run = p.is_dir() and not p.is_symlink()
                items.append(_item("evaluate", p, "evaluation" if run else "output"))
        else:
            items.append(_item("evaluate", ekey, "kept"))  # index.parquet, ratings.parquet
    for store in _children(ws.root / "cache"):
        items += _store_items(store)
    items += [_item("other", p, "kept") for p in _children(ws.root) if p.name not in known]
    return items


def _item(group: str, path: Path, kind: str) -> Item:
    """One item; a stale temporary (a killed writer's) is removable whatever it was. A
    link is an item like the others: measured and removed as a link, never followed."""
    if path.name.startswith(TMP_PREFIX):
        kind = "temporary" if is_stale_tmp(path) else "kept"
    return _measure(Item(group, path, kind=kind), path)


def _store_items(store: Path) -> list[Item]:
    """A cache store's entries: files of `<xx>/` (latents, text), `<key>.mp4` + `.json`
    (evaluate-base), pass folders (recaption); a store gc never prunes is one item."""
    group = f"cache/{store.name}"
    if store.name in KEPT_ALWAYS or store.is_symlink() or not store.is_dir():
        return [_item(group, store, "kept")]
    if store.name in ENTRY_STORES:
        return [_item(group, f, "entry") for sub in _children(store) for f in _children(sub)]
    if store.name == "evaluate-base":
        items: dict[str, Item] = {}
        for f in _children(store):
            stem = f.name.split(".")[0] if not f.name.startswith(TMP_PREFIX) else f.name
            item = items.setdefault(stem, Item(group, store / stem, kind="entry"))
            if f.name.startswith(TMP_PREFIX):
                item.kind = "temporary" if is_stale_tmp(f) else "kept"
            _measure(item, f)
        return list(items.values())
    if store.name == "recaption":
        return [_item(group, p, "entry") for p in _children(store)]
    return [_item(group, store, "kept")]  # a store this version does not know


def _states(run: Path) -> Item:
    """The training states of a run's checkpoints (`training_state.pt`), as one item."""
    from cogpipe.train import STATE_FILE

    item = Item("train", run / STATE_FILE, kind="states")
    for ckpt in _children(run):
        state = ckpt / STATE_FILE
        if ckpt.name.startswith("checkpoint-") and state.is_file() and not state.is_symlink():
            _measure(item, state)
    return item


# --------------------------------------------------------------------------- gc


@dataclass
class Freed:
    """What gc removed (or, dry, would remove)."""

    root: Path
    items: list[Item]
    bytes: int  # freed on disk: files whose every hard link went
    dry_run: bool


def gc(
    configs: dict[str, PipelineConfig], dry_run: bool = False, checkpoints: bool = False
) -> Freed:
    """Remove what no config uses (see the module docstring); `dry_run` only says what.

    Raises:
        DiskError: see `collect`; a stage is running (a workspace lock is held), another
            gc is running, or a path to remove resolves outside the workspace.
    """
    ws = check_workspace(configs)
    if dry_run:
        items = collect(configs).removals(checkpoints)
        return Freed(ws.root, items, freed_bytes(items), True)
    try:
        with ws.hold(RUN_LOCK, wait=False):  # no run holds the workspace (`in_use`), no gc
            _check_locks(ws)
            items = collect(configs).removals(checkpoints)
            for item in items:
                _remove(ws, item)
            _tidy(ws, items)
    except Busy as holder:
        raise DiskError(
            f"{ws.lock_path(RUN_LOCK)}: a run or another gc is using {ws.root} ({holder});"
            " run gc when it ends"
        ) from None
    return Freed(ws.root, items, freed_bytes(items), False)


@contextlib.contextmanager
def in_use(ws: Workspace) -> Iterator[None]:
    """Hold the workspace for a run: a shared lock on `.locks/workspace.lock` (runs go on
    side by side) that gc takes exclusively, so gc refuses while any run holds it and a
    run starting during a gc waits for it. Freed when the holder dies, as every lock."""
    import fcntl

    path = ws.lock_path(RUN_LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def freed_bytes(items: list[Item]) -> int:
    """Bytes freed by removing `items`: each file whose hard links all go, once."""
    seen: dict[tuple[int, int], list[int]] = {}
    for item in items:
        for inode, (size, links, here) in item.inodes.items():
            seen.setdefault(inode, [size, links, 0])[2] += here
    return sum(size for size, links, gone in seen.values() if gone >= links)


def _check_locks(ws: Workspace) -> None:
    """Refuse while a stage runs: every workspace lock must be free (taken and let go)."""
    for lock in sorted((ws.root / ".locks").glob("*.lock")):
        if lock.name == f"{RUN_LOCK}.lock":
            continue
        try:
            with hold_lock(lock, wait=False):
                pass
        except Busy as holder:
            raise DiskError(
                f"{lock}: held by {holder}; run gc when no stage runs in {ws.root}"
            ) from None


def _inside(root: Path, path: Path) -> None:
    """Refuse a path whose folder resolves outside the workspace (a linked parent)."""
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise DiskError(f"{path}: resolves outside the workspace {root}; not removed")


def _remove(ws: Workspace, item: Item) -> None:
    """Remove one item: a folder renamed aside first (gone at once; a kill leaves a
    temporary the next run sweeps), a base video's mp4 before its record, a file or
    link unlinked (never followed)."""
    from cogpipe.train import STATE_FILE

    if item.kind == "states":
        for ckpt in _children(item.path.parent):
            state = ckpt / STATE_FILE
            if ckpt.name.startswith("checkpoint-") and state.is_file() and not state.is_symlink():
                _inside(ws.root, state)
                state.unlink()
        return
    paths = [item.path]
    if item.group == "cache/evaluate-base" and item.kind == "entry":
        paths = [item.path.with_suffix(".mp4"), item.path.with_suffix(".json")]
    for path in paths:
        _inside(ws.root, path)
        if path.is_dir() and not path.is_symlink():
            aside = tmp_name(path)
            os.replace(path, aside)
            shutil.rmtree(aside)
        elif path.is_symlink() or path.exists():
            path.unlink()


def _tidy(ws: Workspace, items: list[Item]) -> None:
    """After removing: the evaluation index's rows of removed evaluations go (nightly
    evaluates those checkpoints again if their runs stay), and emptied folders."""
    gone = {(it.path.parent.name, it.name) for it in items if it.kind == "evaluation"}
    _drop_index_rows(ws, gone)
    deep = {it.path.parent for it in items if ws.root in it.path.parent.parents}
    for folder in deep - {ws.root / stage for stage in (*KEYED, "train")}:
        with contextlib.suppress(OSError):  # not empty
            folder.rmdir()  # an emptied cache/<store>/<xx>/ or evaluate/<ekey>/


def _drop_index_rows(ws: Workspace, gone: set[tuple[str, str]]) -> None:
    from cogpipe.evaluate import index_path

    path = index_path(ws)
    if not gone or not path.is_file():
        return
    with ws.hold("evaluate-index"):
        index = read_table(path)
        keep = [(e, r) not in gone for e, r in zip(index.ekey, index.run, strict=True)]
        if not all(keep):
            write_table(path, index[keep].reset_index(drop=True))


# --------------------------------------------------------------------------- printing


def size(n: float) -> str:
    """Bytes for people: 512 B, 12.3 KiB, 4.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def _label(root: Path, item: Item) -> str:
    rel = str(item.path.relative_to(root))
    if item.kind == "states":
        return f"{item.path.parent.relative_to(root)}/checkpoint-*/{item.name}"
    return rel


def rows(usage: Usage) -> list[tuple[str, str, int, int, str]]:
    """du's table: (group, item, files, bytes, used by); a cache store's entries as two
    rows, used and unused."""
    numbers = {label: str(i + 1) for i, label in enumerate(usage.keys)}
    out, entries = [], defaultdict(lambda: [0, 0, 0])  # (group, used) -> count, files, bytes
    for it in usage.items:
        users = " ".join(numbers.get(u, u) for u in it.used_by) or "-"
        if it.kind == "entry" and it.group in (
            "cache/latents",
            "cache/text",
            "cache/evaluate-base",
        ):
            tally = entries[(it.group, users != "-")]
            tally[0], tally[1], tally[2] = tally[0] + 1, tally[1] + it.files, tally[2] + it.bytes
            continue
        note = {"kept": " (kept)", "temporary": " (stale temporary)"}.get(it.kind, "")
        out.append((it.group, _label(usage.root, it) + note, it.files, it.bytes, users))
    for (group, used), (n, files, nbytes) in sorted(entries.items()):
        out.append(
            (
                group,
                f"{n} entries {'used' if used else 'unused'}",
                files,
                nbytes,
                "yes" if used else "-",
            )
        )
    order = [*KEYED, "train", "evaluate"]
    return sorted(
        out, key=lambda r: order.index(r[0]) if r[0] in order else len(order) + (r[0] == "other")
    )


def format_usage(usage: Usage) -> str:
    """What `cogpipe du` prints."""
    lines = [f"workspace {usage.root}"]
    lines += [f"  [{i + 1}] {label}" for i, label in enumerate(usage.keys)]
    lines.append(f"{'GROUP':<20} {'ITEM':<48} {'FILES':>6} {'SIZE':>10}  USED BY")
    for group, name, files, nbytes, users in rows(usage):
        lines.append(f"{group:<20} {name:<48} {files:>6} {size(nbytes):>10}  {users}")
    total = freed_bytes([Item("all", usage.root, inodes=_union(usage.items))]) if usage.items else 0
    lines.append(
        f"total {size(total)}; gc frees {size(freed_bytes(usage.removals(False)))}"
        f" ({size(freed_bytes(usage.removals(True)))} with --checkpoints)"
    )
    return "\n".join(lines)


def _union(items: list[Item]) -> dict[tuple[int, int], list[int]]:
    """Every file of `items` once, as if all of it went (for the total)."""
    return {inode: [size, 1, 1] for it in items for inode, (size, _, _) in it.inodes.items()}


def usage_json(usage: Usage) -> dict:
    """What `cogpipe du --json` prints."""
    items = [
        {
            "group": it.group,
            "path": _label(usage.root, it),
            "kind": it.kind,
            "files": it.files,
            "bytes": it.bytes,
            "used_by": it.used_by,
        }
        for it in usage.items
    ]
    return {
        "workspace": str(usage.root),
        "configs": usage.keys,
        "items": items,
        "gc_bytes": freed_bytes(usage.removals(False)),
        "gc_checkpoints_bytes": freed_bytes(usage.removals(True)),
    }


def format_freed(freed: Freed) -> str:
    """What `cogpipe gc` prints: each item removed, then the total."""
    verb = "would remove" if freed.dry_run else "removed"
    lines = []
    entries = defaultdict(lambda: [0, 0])
    for it in freed.items:
        if it.kind == "entry" and it.group in ("cache/latents", "cache/text"):
            entries[it.group][0] += 1
            entries[it.group][1] += it.bytes
            continue
        lines.append(
            f"gc: {verb} {_label(freed.root, it)} ({_count(it.files, 'file')}, {size(it.bytes)})"
        )
    for group, (n, nbytes) in sorted(entries.items()):
        lines.append(f"gc: {verb} {n} entries of {group} ({size(nbytes)})")
    done = "would free" if freed.dry_run else "freed"
    lines.append(
        f"gc: {done} {size(freed.bytes)} in {_count(len(freed.items), 'item')} of {freed.root}"
    )
    return "\n".join(lines)
