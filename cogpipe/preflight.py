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

The model checks live in `cogpipe.model_files`, which the loaders (`cogpipe.vlm`,
`cogpipe.models.cogvideox`) also run when a load fails, so their error names the field
and the missing file too.

    preflight(load_config("demo/demo.yaml"), until="train")
"""

from __future__ import annotations

import os
from pathlib import Path

from cogpipe.config import STAGES, ConfigError, PipelineConfig
from cogpipe.model_files import check_cogvideox, check_transformers_model
from cogpipe.stages import STAGE_SPECS, UPSTREAM, finished
from cogpipe.vlm import CAPTIONERS
from cogpipe.workspace import Workspace

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
    """Every stage's key up to `until` (as `cogpipe.stages.stage_keys`, from the listing
    already read) and the stages not done for them."""
    from cogpipe import ingest
    from cogpipe.errors import describe

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
