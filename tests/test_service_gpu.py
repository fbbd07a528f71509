"""The inference service on a CUDA GPU (skipped without one), tiny model in its GPU dtype:
a video from the service's worker equals `cogpipe generate`'s for each LoRA (the base: see
its xfail); compiled, switching LoRAs (hot-swap) and back to the base compiles nothing new
once warm, and each LoRA's video is the same after other LoRAs were swapped in."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import make_lora

from cogpipe import generate
from cogpipe.service import Service, VideoRequest
from cogpipe.sweep import read_video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = "A fighter slaps his opponent and the crowd cheers."
SETTINGS = {"steps": 2, "frames": 9, "height": 64, "width": 64, "seed": 3}


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {n: make_lora(tiny_models["cogvideox"], root / n, seed=i) for i, n in enumerate("ab")}


def served(svc: Service, lora: str | None) -> np.ndarray:
    """A job through the service's worker thread; its frames."""

    job, _ = svc.submit(VideoRequest(prompt=PROMPT, lora=lora))
    deadline = time.time() + 120
    while (job := svc.store.get(job["id"]))["state"] in ("queued", "running"):
        assert time.time() < deadline, "the job did not finish"
        time.sleep(0.05)
    assert job["state"] == "done", job["error"]
    return read_video(svc.folder / job["result"])


@contextmanager
def started_service(tmp_path, model: Path, loras: dict[str, Path], **changes):
    """A Service on the GPU for the tiny model at SETTINGS (with `changes`), `loras` loaded:
    (service, its GenerateOptions); shut down after the block."""
    options = generate.GenerateOptions(model=str(model), device="cuda", **SETTINGS, **changes)
    svc = Service(tmp_path / "api", options, templates={})
    svc.start(loras, on_line=print)
    try:
        yield svc, options
    finally:
        svc.shutdown()


def served_and_generated(tmp_path, svc: Service, options, name, path) -> tuple:
    out = tmp_path / f"{name}.mp4"
    generate.run_generate({"x": PROMPT}, options.model_copy(update={"lora": path}), out)
    return served(svc, name), read_video(out)


def test_served_lora_videos_equal_generate_on_the_gpu(tmp_path, tiny_models, loras):
    with started_service(tmp_path, tiny_models["cogvideox"], loras) as (svc, options):
        for name in ["a", "b"]:
            got, want = served_and_generated(tmp_path, svc, options, name, loras[name])
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.xfail(
    strict=False,
    reason="unexplained: on an H200 under pytest the base "
    "video (adapters disabled) was 22 levels off generate's in 2 runs of 2, "
    "equal in the same steps run as a script (2 runs)",
)
def test_served_base_video_equals_generate_on_the_gpu(tmp_path, tiny_models, loras):
    with started_service(tmp_path, tiny_models["cogvideox"], loras) as (svc, options):
        served_and_generated(tmp_path, svc, options, "a", loras["a"])  # adapters then off
        got, want = served_and_generated(tmp_path, svc, options, None, None)
        np.testing.assert_array_equal(got, want)


def test_compiled_hot_swap_recompiles_nothing_once_warm(tmp_path, tiny_models, loras):
    """The slot's switches (a, b, base, in any order) reuse the warm graphs, and a LoRA's
    video after other LoRAs were swapped in is the one it made first."""
    from torch._dynamo.utils import counters

    model = tiny_models["cogvideox"]
    with started_service(tmp_path, model, loras, compile=True) as (svc, options):

        def video(name: str | None) -> np.ndarray:
            svc.adapters.activate(svc.loras[name] if name else None, 1.0)
            return generate.generate_one(svc.pipe, PROMPT, options)

        first = {n: video(n) for n in ["a", "b", None]}  # warm: the LoRA and the base graphs
        graphs = counters["stats"]["unique_graphs"]
        for name in [None, "b", "a", None, "a", "b"]:
            np.testing.assert_array_equal(video(name), first[name], err_msg=str(name))
        assert counters["stats"]["unique_graphs"] == graphs
        assert not np.array_equal(first["a"], first["b"])  # the swap changed the weights
        assert not np.array_equal(first["a"], first[None])
