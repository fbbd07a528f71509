"""A config file to a run of the deployed pipeline, and the config a deployed run uses.

    cogpipe submit demo/demo.yaml --set train.max_steps=500 --wait

The deployment takes the path of a YAML file the workers see (`config_file`), a few
common overrides and any dotted field (`overrides`); `run_config` turns those into the
PipelineConfig, here before anything is sent (so a bad `--set` fails at once) and again
in the flow run. An override is read as if written in the file: a relative path in it is
relative to the config file, as the file's own paths are.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

from cogpipe.config import ConfigError, PipelineConfig, load_config, with_fields
from cogpipe.errors import UserError

DEPLOYMENT = "cogpipe-pipeline/pipeline"
# The run form's short fields -> the config field each sets.
COMMON = {
    "workspace": "workspace",
    "source": "ingest.source",
    "name": "name",
    "max_steps": "train.max_steps",
}


def checkout() -> Path:
    """Where a relative `config_file` is looked up: the checkout the deployments run from
    ($COGPIPE_ROOT, which `cogpipe worker` sets), else the current folder."""
    return Path(os.environ.get("COGPIPE_ROOT") or os.getcwd())


def config_path(config_file: str, root: Path | None = None) -> Path:
    """The absolute path of a `config_file` parameter (relative: to `root`, else the
    checkout).

    Raises:
        ConfigError: the file does not exist (the message names the path looked at).
    """
    path = Path(config_file).expanduser()
    path = path if path.is_absolute() else (root or checkout()) / path
    if not path.is_file():
        raise ConfigError(
            f"config_file {config_file}: no such file ({path}); give a YAML path "
            "every worker sees, absolute or relative to the checkout"
        )
    return path


def run_config(
    config_file: str | None,
    config: PipelineConfig | None = None,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> PipelineConfig:
    """The config of a run: the file (or the full `config`, not both) with `overrides`
    (dotted fields; None values are ignored, so a form's empty fields change nothing);
    relative paths are looked up under `root` (default: the checkout).

    Raises:
        ConfigError: neither or both given, a missing file, a bad field or value.
    """
    if config_file and config is not None:
        raise ConfigError("give config_file or config, not both (overrides set single fields)")
    if config_file:
        path = config_path(config_file, root)
        cfg, base = load_config(path), path.parent
    elif config is not None:
        cfg, base = config, root or checkout()
    else:
        raise ConfigError("config_file is required: a YAML config path every worker sees")
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    return with_fields(cfg, chosen, base)


class SubmitError(UserError, RuntimeError):
    """No server, no deployment, or a run that did not complete."""


def ui_url(api_url: str) -> str:
    """The UI's address from the API's (`http://host:port/api` -> `http://host:port`)."""
    return api_url.rstrip("/").removesuffix("/api")


def check_server(api_url: str) -> None:
    """Raises SubmitError when nothing answers at `api_url`."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=5):
            return
    except OSError:
        raise SubmitError(
            f"no Prefect server answers at {api_url}: start one with `cogpipe serve` "
            "(it prints the PREFECT_API_URL to export), or pass --api"
        ) from None


def submit(config_file: Path, sets: dict[str, Any], until: str, api_url: str) -> tuple[UUID, str]:
    """Start a run of the deployed pipeline on `config_file` (its absolute path: the
    workers share this filesystem) with `sets` as overrides; returns (run id, UI link).

    The config is loaded here with the overrides first, so a bad one is an error before
    anything is sent.

    Raises:
        ConfigError: the file or an override is wrong.
        SubmitError: no server answers, or the pipeline is not deployed on it.
    """
    path = Path(config_file).expanduser().resolve()
    run_config(str(path), overrides=sets)  # raises on a bad file or override
    check_server(api_url)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {"config_file": str(path), "until": until, "overrides": sets}
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            raise SubmitError(
                f"{DEPLOYMENT} is not deployed on {api_url}: run `cogpipe setup --api {api_url}`"
            ) from None
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
    return run.id, f"{ui_url(api_url)}/runs/flow-run/{run.id}"


def wait(run_id: UUID, api_url: str, poll_s: float = 2.0) -> tuple[str, str]:
    """Wait until the run's state is final; returns (state name, its message)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state.name, state.message or ""
            time.sleep(poll_s)
