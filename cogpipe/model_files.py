"""Whether a model folder (or a hub id's cached snapshot) holds what a loader reads: the
configs and weights of a CogVideoX diffusers folder's components, or a transformers
model's config.json of the expected type. Each failure is one ConfigError naming the
config field and the missing or wrong file.

Two callers ask: `cogpipe.preflight` before a run starts, and the loaders
(`cogpipe.models.cogvideox.loading`, `cogpipe.vlm`) after a load failed, so their error
names the file too. It sits below both, reading only the config's ConfigError.

A hub id must be in the local hub cache (huggingface_hub's cache, read without the
network) or the hub must answer; offline (HF_HUB_OFFLINE) an id not in the cache fails
at once, instead of a minute of retries and a message about a missing config.json.

    check_cogvideox("model", "THUDM/CogVideoX-2b", {"transformer": True})
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

from cogpipe.config import ConfigError

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
