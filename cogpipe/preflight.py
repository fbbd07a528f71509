"""What `cogpipe run` checks at load, before any server or model starts: everything that
can be known without running a stage. Each failure is one ConfigError naming the field.

Checked, for the stages up to `until` that are not done yet for this config:

- `workspace`: writable (a probe file is created and removed; a read-only file system or
  a folder this user may not write fails here, not after the first stage's retries).
- `ingest.source`: exists, reads as its layout, and lists at least one readable file with
  a video extension (whether it decodes is ingest's question).
- models: a local folder holds the configs and weights its stage loads, of the expected
  type (`model`: a CogVideoX diffusers folder, model_index.json, transformer/, vae/,
  text_encoder/, tokenizer/, scheduler/; `caption.model`: a LLaVA-family config.json;
  `evaluate.clip_model`: CLIP; `evaluate.video_features`: VideoMAE). A hub id must be in
  the local hub cache (huggingface_hub's cache, read without the network) or the hub must
  answer; offline (HF_HUB_OFFLINE) an id not in the cache fails at once, instead of a
  minute of retries and a message about a missing config.json.

The model checks are also what the loaders (`cogpipe.vlm`, `cogpipe.models.cogvideox`)
run when a load fails, so their error names the field and the missing file too.

    preflight(load_config("demo/demo.yaml"), until="train")
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cogpipe.config import STAGES, ConfigError, PipelineConfig
from cogpipe.vlm import ARCHITECTURES
from cogpipe.workspace import Workspace

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "THUDM/CogVideoX-2b", "gpt2"
REACH_S = 5.0  # seconds the hub may take to accept a connection
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# A CogVideoX folder's components: (config file, key, expected value or None, weight files).
COMPONENTS: dict[str, tuple[str, str | None, str | None, tuple[str, ...]]] = {
    "transformer": ("config.json", "_class_name", "CogVideoXTransformer3DModel", DIFFUSERS_WEIGHTS),
    "vae": ("config.json", "_class_name", "AutoencoderKLCogVideoX", DIFFUSERS_WEIGHTS),
    "text_encoder": ("config.json", "model_type", "t5", TRANSFORMERS_WEIGHTS),
    "tokenizer": ("tokenizer_config.json", None, None, ()),
    "scheduler": ("scheduler_config.json", None, None, ()),
}
# What each stage loads of `model`: component -> whether its weights are read.
FULL_PIPELINE = {
    "transformer": True,
    "vae": True,
    "text_encoder": True,
    "tokenizer": False,
    "scheduler": False,
}
STAGE_COMPONENTS: dict[str, dict[str, bool]] = {
    "recaption": {"tokenizer": False},  # the gate's token count
    "filter": {"tokenizer": False},
    "precompute": {"transformer": False, "vae": True, "text_encoder": True, "tokenizer": False},
    "train": {"transformer": True, "scheduler": False},
    "evaluate": FULL_PIPELINE,
}
CAPTIONERS = tuple(sorted(ARCHITECTURES))


def preflight(cfg: PipelineConfig, until: str = "evaluate") -> None:
    """Raise ConfigError naming the first config field that cannot work for the stages up
    to `until`; stages already done for this config are not asked for their models (so a
    stage command whose inputs are done is asked for its own fields alone).

    Raises:
        ConfigError: one line naming the field (workspace, ingest.source, model,
            caption.model, evaluate.clip_model, ...) and why.
    """
    check_workspace(cfg.workspace)
    listing = check_source(cfg)
    _, todo = stage_keys(cfg, until, listing)
    for stage in todo:
        check_stage_models(cfg, stage)


# --------------------------------------------------------------------------- workspace


def check_workspace(root: Path) -> None:
    """The workspace (or the folder it will be created in) takes a new file."""
    folder = Path(root)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"workspace: {folder} is a file, not a folder")
    probe = folder / f".tmp-preflight-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as e:
        reason = (e.strerror or type(e).__name__).lower()
        raise ConfigError(f"workspace: {root} is not writable ({reason})") from None
    probe.unlink(missing_ok=True)


# --------------------------------------------------------------------------- source


def check_source(cfg: PipelineConfig) -> list:
    """The source's listing (as `cogpipe.sources.list_source`), holding at least one
    readable file with a video extension."""
    from cogpipe.sources import SourceError, list_source

    source = cfg.ingest.source
    try:
        listing = list_source(cfg)
    except (OSError, SourceError) as e:
        from cogpipe.errors import describe

        text = describe(e) if isinstance(e, OSError) and e.filename else str(e)
        raise ConfigError(
            text if text.startswith("ingest.source") else f"ingest.source: {text}"
        ) from e
    extensions = {e.lower() for e in cfg.ingest.extensions}
    videos = [
        e for e in listing if not e[4] and e[1] > 0 and Path(e[0]).suffix.lower() in extensions
    ]
    if not videos:
        n = len(listing)
        raise ConfigError(
            f"ingest.source {source} holds no video: {n} file{'s' * (n != 1)}, none a readable"
            f" {'/'.join(sorted(extensions))} file"
        )
    return listing


def stage_keys(cfg: PipelineConfig, until: str, listing: list) -> tuple[dict[str, str], list[str]]:
    """Every stage's key up to `until` (as `cogpipe.pipeline.stage_keys`, from the listing
    already read) and the stages not done for them."""
    from cogpipe import ingest
    from cogpipe.errors import describe
    from cogpipe.pipeline import UPSTREAM, finished
    from cogpipe.stages import STAGE_SPECS

    ws, keys, todo = Workspace(cfg.workspace), {}, []
    for stage in STAGES[: STAGES.index(until) + 1]:
        inputs = {up: keys[up] for up in UPSTREAM[stage]}
        try:
            keys[stage] = (
                ingest.key_of(cfg, listing=listing)
                if stage == "ingest"
                else STAGE_SPECS[stage].key(cfg, inputs)
            )
        except ConfigError:
            raise
        except (OSError, ValueError) as e:  # a reference function that does not import, ...
            raise ConfigError(describe(e)) from e
        if finished(ws, cfg, stage, keys[stage], inputs) is None:
            todo.append(stage)
    return keys, todo


# --------------------------------------------------------------------------- models


def check_stage_models(cfg: PipelineConfig, stage: str) -> None:
    """The models `stage` loads, each named by its field."""
    if stage == "caption" and cfg.caption.existing != "use":
        check_transformers_model(
            "caption.model",
            cfg.caption.model,
            cfg.caption.revision,
            CAPTIONERS,
            "a supported captioner",
        )
    components = dict(STAGE_COMPONENTS.get(stage, {}))
    if stage in ("recaption", "filter") and not cfg.filter.max_tokens:
        components = {}
    if stage == "train" and cfg.train.validation_every:
        components |= FULL_PIPELINE
    if components:
        check_cogvideox("model", cfg.model, components)
    if stage == "evaluate":
        check_transformers_model(
            "evaluate.clip_model", cfg.evaluate.clip_model, None, ("clip",), "a CLIP model"
        )
        if cfg.evaluate.video_features is not None:
            check_transformers_model(
                "evaluate.video_features",
                cfg.evaluate.video_features,
                None,
                ("videomae",),
                "a VideoMAE model",
            )


def check_cogvideox(
    field: str, model: str, components: dict[str, bool], pipeline: bool = True
) -> None:
    """A CogVideoX diffusers folder (or cached hub id) with `components` ({subfolder:
    weights needed}); `pipeline`: also its model_index.json, as CogVideoXPipeline reads."""
    name = next(iter(components))
    first = "model_index.json" if pipeline else f"{name}/{COMPONENTS[name][0]}"
    folder = locate(field, model, None, first)
    if folder is None:  # not cached, the hub answers: the loader downloads it
        return
    if pipeline:
        folder.expect(
            "model_index.json",
            "_class_name",
            lambda v: str(v).startswith("CogVideoX"),
            "a CogVideoX pipeline",
        )
    for name, weights in components.items():
        config, key, expected, files = COMPONENTS[name]
        if key is None:
            folder.json(f"{name}/{config}", f"the {name}")
        else:
            folder.expect(f"{name}/{config}", key, lambda v, e=expected: v == e, expected)
        if weights:
            folder.weights(name, files, f"the {name} weights")


def check_transformers_model(
    field: str, model: str, revision: str | None, types: tuple[str, ...], what: str
) -> None:
    """A transformers folder (or cached hub id) whose config.json has one of `types`."""
    folder = locate(field, model, revision, "config.json")
    if folder is None:
        return
    folder.expect("config.json", "model_type", lambda v: v in types, f"{what} ({', '.join(types)})")
    folder.weights("", TRANSFORMERS_WEIGHTS, "the weights")


@dataclass
class Folder:
    """A model folder, or the cached snapshot of a hub id (`repo`), as the checks see it."""

    field: str
    root: Path
    repo: str | None = None

    def show(self, rel: str) -> str:
        return str(self.root / rel) if self.repo is None else f"{self.repo}: {rel}"

    def missing(self, rel: str, what: str) -> ConfigError | None:
        """The error of a missing file; None where the hub can still send it."""
        if self.repo is None:
            return ConfigError(f"{self.field}: {self.root / rel} is missing ({what})")
        why = hub_unavailable()
        if not why:
            return None
        return ConfigError(
            f"{self.field}: {self.repo} has no {rel} in the local hub cache ({what}), and {why}"
        )

    def json(self, rel: str, what: str) -> dict[str, Any] | None:
        """A JSON file of the folder; None where it is missing but can be downloaded."""
        path = self.root / rel
        if not path.is_file():
            if (error := self.missing(rel, what)) is not None:
                raise error
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.field}: {self.show(rel)} cannot be read ({e})") from None

    def expect(self, rel: str, key: str, ok: Callable[[Any], bool], what: str) -> None:
        """The config `rel` has `key` for which `ok` holds (a class name, a model type)."""
        config = self.json(rel, f"the config of {what}")
        if config is None:
            return
        found = config.get(key)
        if not ok(found):
            label = "class" if key == "_class_name" else key.replace("_", " ")
            raise ConfigError(f"{self.field}: {self.show(rel)} has {label} {found!r}, not {what}")

    def weights(self, sub: str, names: tuple[str, ...], what: str) -> None:
        """One of the weight files `names` in `sub`, or a sharded index with every shard."""
        folder = self.root / sub
        if any((folder / name).is_file() for name in names):
            return
        for name in names:
            index = folder / f"{name}.index.json"
            if index.is_file():
                return self._shards(sub, index, what)
        rel = f"{sub}/{names[0]}" if sub else names[0]
        if (error := self.missing(rel, what)) is not None:
            raise error

    def _shards(self, sub: str, index: Path, what: str) -> None:
        shards = sorted(
            set(
                (self.json(str(index.relative_to(self.root)), what) or {})
                .get("weight_map", {})
                .values()
            )
        )
        for shard in shards:
            rel = f"{sub}/{shard}" if sub else shard
            if not (self.root / rel).is_file():
                error = self.missing(rel, f"{what}, listed in {index.name}")
                if error is not None:
                    raise error


def locate(field: str, model: str, revision: str | None, first: str) -> Folder | None:
    """The folder `model` names, or the local hub cache's snapshot of it (found by its
    file `first`); None for a hub id not cached while the hub answers (the loader will
    download it).

    Raises:
        ConfigError: neither a folder nor a hub id; or not cached and the hub unavailable.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return Folder(field, path)
    if path.exists():
        raise ConfigError(f"{field}: {model} is a file, not a model folder or a hub id")
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise ConfigError(f"{field}: {model} does not exist (neither a folder nor a hub id)")
    snapshot = cached_snapshot(model, revision, first)
    if snapshot is not None:
        return Folder(field, snapshot, model)
    if why := hub_unavailable():
        raise ConfigError(
            f"{field}: {model} is neither a folder nor in the local hub cache ({hub_cache()}),"
            f" and {why}"
        )
    return None


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo: str, revision: str | None, first: str) -> Path | None:
    """The snapshot folder of `repo` in the local hub cache holding `first`, read without
    the network (huggingface_hub.try_to_load_from_cache); None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, first, revision=revision)
    if not isinstance(found, str):
        return None
    return Path(found).parents[len(Path(first).parts) - 1]


def hub_unavailable() -> str:
    """Why files cannot come from the hub now ("" when they can): HF_HUB_OFFLINE, or the
    endpoint does not accept a connection within REACH_S seconds."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if flag or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    reason = _connect(endpoint)
    return f"the hub ({endpoint}) cannot be reached: {reason}" if reason else ""


@functools.cache
def _connect(endpoint: str) -> str:
    """'' when `endpoint` accepts a TCP connection within REACH_S seconds, else why not
    (in a thread, so a name lookup that hangs costs REACH_S too)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str] = []

    def attempt() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=REACH_S).close()
            result.append("")
        except OSError as e:
            result.append((e.strerror or str(e) or type(e).__name__).lower())

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(REACH_S + 1)
    return result[0] if result else f"no answer in {REACH_S:g} s"
