"""Shared fixtures: sample videos and tiny models built once per session, Prefect offline;
and the tiny settings the tests import (`from conftest import tiny_train`).

Prefect reads its settings at import time, so the environment is set here, before any
test module imports it: a temporary PREFECT_HOME (its SQLite database and result store),
no analytics (there is no network), a generous ephemeral-server start-up timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="cogpipe-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A shell without job control starts background commands with SIGINT ignored, and an
# ignored signal stays ignored in every child: a suite launched that way (`make test &`,
# some CI runners) would see the Ctrl-C tests' processes shrug off their SIGINT. Python's
# own handler here is reset to the default in each child, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` runs the suite on two xdist workers (`-n 2 --dist loadgroup`), then the
# `serial` tests alone. Each worker takes whole modules, so a module's fixtures are built
# once. The slow Prefect modules (the `served` server's, and those that start their own
# server and workers) share one worker: one such stack at a time, so no heartbeat starves
# beside another. A worker's torch keeps to one thread: two workers on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """A module's tests run on one xdist worker, the slow Prefect modules all on one; GPU
    tests only where CUDA is present."""
    import torch

    def module(item) -> str:
        return item.module.__name__

    servers = {module(i) for i in items if "served" in i.fixturenames}
    servers |= {module(i) for i in items if "slow" in i.keywords and "prefect" in i.keywords}
    for item in items:
        group = "prefect-servers" if module(item) in servers else module(item)
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- tiny settings
# What makes a stage fast on the tiny CogVideoX, shared by the tests that train, sample or
# evaluate it. A test states on top the values it is about: `tiny_train(max_steps=2)`.

TINY_TRAIN = dict(rank=4, alpha=8, lr_warmup_steps=0)  # a rank-4, alpha-8 LoRA, no warm-up
TINY_TRAIN |= dict(mixed_precision="no", gradient_checkpointing="off", device="cpu")  # fp32
TINY_VIDEO = dict(steps=2, frames=9, height=64, width=64, device="cpu")  # 9 x 64 x 64 px


def tiny_train(**changes) -> dict:
    """`TrainConfig` fields of a fast CPU run (`TINY_TRAIN`); `changes` add or replace fields."""
    return TINY_TRAIN | changes


def tiny_run_config(workspace: Path, model: Path, name: str | None, **train_fields):
    """The `PipelineConfig` of a training run of `model` named `name` (None: its key) in
    `workspace`, with `TrainConfig(**train_fields)`."""
    from cogpipe.config import PipelineConfig, TrainConfig

    train = TrainConfig(**train_fields)
    return PipelineConfig(workspace=workspace, name=name, model=str(model), train=train)


def tiny_sampling(**changes) -> dict:
    """Sampler fields (`EvaluateConfig`, `GenerateOptions`) of a 2-step 9 x 64 x 64 video on
    the CPU (`TINY_VIDEO`); `changes` add or replace fields."""
    return TINY_VIDEO | changes


def tiny_pipe_call(**changes) -> dict:
    """A diffusers pipeline's arguments for a fast generation on a tiny model: 2 steps,
    9 frames of 64 x 64, 16 prompt tokens; `changes` add or replace arguments."""
    fast = dict(num_frames=9, height=64, width=64, num_inference_steps=2, max_sequence_length=16)
    return fast | changes


def cli_flags(**values) -> list[str]:
    """Settings as command-line flags: `cli_flags(steps=2, device="cpu")` is
    `["--steps", "2", "--device", "cpu"]`."""
    return [arg for name, value in values.items() for arg in (f"--{name}", str(value))]


def seeded_loss(transformer, scheduler, latents, embeds, seed: int, **inputs):
    """`train.diffusion_loss` without rotary embeddings (the tiny models' kind) and with its
    timestep and noise drawn from a generator seeded `seed`; `inputs`: reference, tic_ft,
    image."""
    import torch

    from cogpipe import train

    g = torch.Generator().manual_seed(seed)
    return train.diffusion_loss(transformer, scheduler, latents, embeds, None, g, **inputs)


def fake_precompute(
    folder: Path,
    clips: int = 2,
    latent_frames: int = 3,
    references: bool = False,
    shard_size: int | None = None,
    rejected: bool = False,
    key: str = "p1",
):
    """A precompute output in the real shard and index format, written by the test so that
    training's numbers do not depend on video decoding.

    Samples clip0, clip1, ... hold seeded random latents [latent_frames, 4, 8, 8] (64 x 64 px),
    prompt embeddings [16, 32] and, with `references`, reference latents shaped like the
    latents; `shard_size` of them to a shard (default: all in one). `rejected` adds a row
    rejected as too short after them.

    Returns:
        The `StageResult` of precompute `key` at `folder`.
    """
    import pandas as pd
    import torch

    from cogpipe.precompute import shard_name, write_shard
    from cogpipe.workspace import StageResult, write_table

    g = torch.Generator().manual_seed(0)
    shard_size = shard_size or clips
    rows = []
    for first in range(0, clips, shard_size):
        shard, tensors = shard_name(first // shard_size), {}
        for j in range(first, min(first + shard_size, clips)):
            tensors[f"clip{j}.latents"] = torch.randn(latent_frames, 4, 8, 8, generator=g)
            tensors[f"clip{j}.prompt_embeds"] = torch.randn(16, 32, generator=g)
            keys = dict(latents_key=f"clip{j}.latents", embeds_key=f"clip{j}.prompt_embeds")
            row = dict(clip_id=f"clip{j}", caption=f"caption {j}", shard=shard, **keys)
            rows.append(row | {"status": "ok", "reason": ""})
            if references:
                reference = torch.randn(latent_frames, 4, 8, 8, generator=g)
                tensors[f"clip{j}.reference_latents"] = reference
                rows[-1]["reference_key"] = f"clip{j}.reference_latents"
        write_shard(folder / shard, tensors, {})
    if rejected:
        short = dict(clip_id="short", caption="c", shard=None, latents_key=None, embeds_key=None)
        rows.append(short | {"status": "rejected", "reason": "too short"})
    index = pd.DataFrame(rows).assign(
        frames=4 * (latent_frames - 1) + 1, height=64, width=64, latent_frames=latent_frames
    )
    write_table(folder / "index.parquet", index)
    return StageResult("precompute", key, str(folder))


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> dict[str, Path]:
    """The demo's sample videos (good clips, black, frozen, near duplicate, corrupt, text)."""
    from cogpipe.samples import write_sample_videos

    return write_sample_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CogVideoX, LLaVA and CLIP saved in their real on-disk layouts."""
    from cogpipe.samples import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CogVideoX of every generation: {"1.5", "i2v", "1.5-i2v"} -> folder
    (the 2B-shaped one is `tiny_models["cogvideox"]`); see `samples.TINY_VARIANTS`."""
    from cogpipe.samples import write_tiny_cogvideox

    root = tmp_path_factory.mktemp("family")
    return {v: write_tiny_cogvideox(root / v, v) for v in ("1.5", "i2v", "1.5-i2v")}


@pytest.fixture
def demo_config(tmp_path, sample_videos, tiny_models):
    """A factory for the demo config on a fresh workspace; keyword overrides per section."""
    from cogpipe.config import PipelineConfig
    from cogpipe.demo import DEMO_CONFIG

    def make(workspace: Path | None = None, **sections) -> PipelineConfig:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
        raw |= {
            "workspace": str(workspace or tmp_path / "workspace"),
            "model": str(tiny_models["cogvideox"]),
            "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
        }
        raw["caption"]["model"] = str(tiny_models["llava"])
        raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
        for section, values in sections.items():
            raw[section] = raw[section] | values if isinstance(values, dict) else values
        return PipelineConfig.model_validate(raw)

    return make


# A real Prefect server with real workers, shared by the production tests (test_serve.py,
# test_ui.py): started once, on 127.0.0.1 and a free port, by the code `cogpipe serve` runs.
# Stuck-run window for tests. Heartbeats come every 30 s (Prefect's minimum); on a loaded
# 2-core host the server can process one 20 s late, so 50 s crashed a live run in CI.
ZOMBIE_WITHIN_S = 75


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """`cogpipe serve` without GPUs: server, pools, limits, automation, deployments, one cpu
    worker and one CPU-backed gpu worker (named 'gpu-cpu'). Logs under the fixture's tmp."""
    from cogpipe_flows.serve import free_port, serve

    logs = tmp_path_factory.mktemp("serve-logs")
    server = serve(
        port=free_port(),
        logs=logs,
        gpus=[],
        zombie_within_s=ZOMBIE_WITHIN_S,
        database=logs
        / "prefect.db",  # its own: the ephemeral API of other tests has PREFECT_HOME's
        worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def served_demo_file(tmp_path_factory) -> Path:
    """The demo's videos, tiny models and `demo.yaml`, as `cogpipe demo` writes them: the
    file a user gives the Run form's `config_file` (the deployment itself is left as
    `cogpipe serve` deploys it)."""
    from cogpipe.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("served-demo"))


@pytest.fixture(scope="session")
def served_demo(served_demo_file):
    """The config of `served_demo_file`, loaded."""
    from cogpipe.config import load_config

    return load_config(served_demo_file)


@contextlib.contextmanager
def prefect_client(server):
    """A sync client of `server`; this process's own settings point nowhere else after."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as c:
        yield c


@pytest.fixture
def api(served):
    """A client of the served server for one test."""
    with prefect_client(served) as client:
        yield client
