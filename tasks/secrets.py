"""The model hub token: from the environment or a Prefect Secret block, never from flow
parameters, logs or artifacts.

    export HF_TOKEN=hf_...                                  # on each worker, or:
    prefect block create secret   # name it `cogpipe-hub-token`, once per server

Flows call `use_hub_token()` first: a token found in the Secret block is put into this
process's HF_TOKEN, where huggingface_hub reads it; only where it came from is logged.
"""

from __future__ import annotations

import os

TOKEN_ENV = "HF_TOKEN"
SECRET_BLOCK = "cogpipe-hub-token"


def hub_token() -> tuple[str | None, str]:
    """(the token or None, where it came from): HF_TOKEN, else the Secret block on the
    Prefect server this process talks to, else none."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"environment ({TOKEN_ENV})"
    from prefect.blocks.system import Secret

    try:
        return Secret.load(SECRET_BLOCK).get(), f"Prefect Secret block {SECRET_BLOCK!r}"
    except ValueError:  # no such block
        return None, "none (public models only)"


def use_hub_token() -> str:
    """Make the hub token visible to huggingface_hub in this process; returns where it came
    from (safe to log), never the token."""
    token, source = hub_token()
    if token:
        os.environ[TOKEN_ENV] = token
    return source
