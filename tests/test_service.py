"""`cogpipe serve-api` as a real process on the tiny CogVideoX, over real HTTP: LoRAs
hot-swapped per job with videos equal to `cogpipe generate`'s, a LoRA added without a
restart, stored results, the queue across a restart, the API key and refused inputs."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_evaluate import make_lora

from cogpipe import generate
from cogpipe.sweep import read_video

PROMPT = "A fighter slaps his opponent and the crowd cheers."
SETTINGS = {"steps": 2, "frames": 9, "height": 64, "width": 64}
TEMPLATES = """
strike:
  description: a slap
  text: "{striker} slaps {receiver} in a ring. {angle}"
  defaults:
    angle: A steady side shot.
"""


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA checkpoint folders of the tiny model (different non-zero weights)."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for seed, name in enumerate("abc"):
        out[name] = root / name / "checkpoint-000002"
        make_lora(tiny_models["cogvideox"], out[name], seed=seed)
    return out


@contextmanager
def service(tmp_path: Path, model: Path, *flags: str, env: dict | None = None):
    """`cogpipe serve-api` on a free port until the block ends (SIGTERM); yields (url, proc)."""
    templates = tmp_path / "templates.yaml"
    templates.write_text(TEMPLATES)
    cmd = [
        sys.executable,
        "-m",
        "cogpipe.cli",
        "serve-api",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--port",
        "0",
        "--folder",
        str(tmp_path / "api"),
        "--templates",
        str(templates),
        *flags,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url, seen = None, []
        while url is None:
            try:
                seen.append(lines.get(timeout=120))
            except queue.Empty:
                pytest.fail(f"no URL from serve-api within 120 s: {seen}")
            url = seen[-1].split()[1] if seen[-1].startswith("serve-api: http://") else None
        yield url.rstrip("/"), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_done(client: httpx.Client, ids: list[str], timeout: float = 90) -> dict[str, dict]:
    """Poll the jobs until none is queued or running; their last views by id."""
    deadline = time.time() + timeout
    while True:
        views = {i: client.get(f"/v1/videos/{i}").json() for i in ids}
        if all(v["state"] not in ("queued", "running") for v in views.values()):
            return views
        if time.time() > deadline:
            pytest.fail(f"jobs not done in {timeout} s: {views}")
        time.sleep(0.2)


def frames_of(client: httpx.Client, job_id: str, path: Path) -> np.ndarray:
    reply = client.get(f"/v1/videos/{job_id}/content")
    assert reply.status_code == 200 and reply.headers["content-type"] == "video/mp4"
    path.write_bytes(reply.content)
    return read_video(path)


def generated(tiny_models, tmp_path: Path, lora: Path | None, seed: int) -> np.ndarray:
    """The video `cogpipe generate` writes for these settings (its run_generate, in-process)."""
    options = generate.GenerateOptions(
        model=str(tiny_models["cogvideox"]), device="cpu", lora=lora, seed=seed, **SETTINGS
    )
    out = tmp_path / f"generate-{lora.parent.name if lora else 'base'}-{seed}.mp4"
    generate.run_generate({"x": PROMPT}, options, out)
    return read_video(out)


def test_loras_interleaved_equal_generate_added_lora_stored_results_bad_input(
    tmp_path, tiny_models, loras
):
    model = tiny_models["cogvideox"]
    flags = ["--lora", f"a={loras['a']}", "--lora", f"b={loras['b']}", "--paused"]
    with service(tmp_path, model, *flags) as (url, _), httpx.Client(base_url=url) as client:
        asked = [("a", 1), (None, 1), ("b", 1), ("a", 2)]
        ids = []
        for lora, seed in asked:
            reply = client.post(
                "/v1/videos", json={"prompt": PROMPT, "lora": lora, "seed": seed, **SETTINGS}
            )
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
        same = client.post(
            "/v1/videos", json={"prompt": PROMPT, "lora": "a", "seed": 1, **SETTINGS}
        )
        assert (same.status_code, same.json()["id"]) == (202, ids[0])  # already queued: that job
        # Paused: all queued; the worker will take a's jobs back to back, then base, then b.
        positions = [client.get(f"/v1/videos/{i}").json()["position"] for i in ids]
        assert positions == [1, 3, 4, 2]
        assert client.post("/v1/queue", json={"paused": False}).json()["paused"] is False
        views = wait_done(client, ids)
        assert [v["state"] for v in views.values()] == ["done"] * 4, views
        ran = sorted(ids, key=lambda i: views[i]["started"])
        assert ran == [ids[0], ids[3], ids[1], ids[2]]
        assert all(v["step"] == v["steps"] == 2 and v["seconds"] > 0 for v in views.values())

        videos = {}
        for job_id, (lora, seed) in zip(ids, asked, strict=True):
            videos[lora, seed] = frames_of(client, job_id, tmp_path / f"{job_id}.mp4")
            ref = generated(tiny_models, tmp_path, loras[lora] if lora else None, seed)
            np.testing.assert_array_equal(videos[lora, seed], ref)
        assert np.abs(videos["a", 1].astype(int) - videos[None, 1]).mean() > 1.0
        assert np.abs(videos["a", 1].astype(int) - videos["b", 1]).mean() > 1.0

        # A LoRA added through the API is used at once, without a restart.
        added = client.post("/v1/loras", json={"name": "c", "path": str(loras["c"])})
        assert added.status_code == 201, added.text
        assert [x["name"] for x in client.get("/v1/loras").json()] == ["a", "b", "c"]
        reply = client.post(
            "/v1/videos", json={"prompt": PROMPT, "lora": "c", "seed": 1, **SETTINGS}
        )
        job_c = reply.json()["id"]
        assert wait_done(client, [job_c])[job_c]["state"] == "done"
        np.testing.assert_array_equal(
            frames_of(client, job_c, tmp_path / "c.mp4"),
            generated(tiny_models, tmp_path, loras["c"], 1),
        )

        # The same request again is the stored video, at once: nothing is generated.
        again = client.post(
            "/v1/videos", json={"prompt": PROMPT, "lora": "a", "seed": 1, **SETTINGS}
        )
        assert again.status_code == 200, again.text
        view = again.json()
        assert (view["state"], view["cached"], view["seconds"]) == ("done", True, 0)
        assert view["id"] not in ids
        first = client.get(f"/v1/videos/{ids[0]}/content").content
        assert client.get(f"/v1/videos/{view['id']}/content").content == first
        counts = client.get("/v1/queue").json()["counts"]
        assert counts["done"] == 6 and counts["queued"] == counts["running"] == 0

        # A queued job cancels; a done one does not; an unknown one is 404.
        client.post("/v1/queue", json={"paused": True})
        slots = {"striker": "a bald fighter", "receiver": "a tall man"}
        reply = client.post("/v1/videos", json={"template": "strike", "slots": slots, **SETTINGS})
        assert reply.status_code == 202, reply.text
        assert (
            reply.json()["prompt"]
            == "a bald fighter slaps a tall man in a ring. A steady side shot."
        )
        queued = reply.json()["id"]
        assert client.delete(f"/v1/videos/{queued}").json()["state"] == "cancelled"
        assert client.get(f"/v1/videos/{queued}/content").status_code == 409
        assert client.delete(f"/v1/videos/{ids[0]}").status_code == 409
        assert client.get("/v1/videos/nope").status_code == 404
        assert [t["name"] for t in client.get("/v1/templates").json()] == ["strike"]
        assert_refused(client, tmp_path)


def assert_refused(client: httpx.Client, tmp_path: Path) -> None:
    """Bad requests get a 4xx whose detail names the field and the reason."""
    bad = {
        "unknown LoRA 'zz'": {"prompt": PROMPT, "lora": "zz"},
        "missing slot(s) receiver": {"template": "strike", "slots": {"striker": "a man"}},
        "unknown template 'kick'": {"template": "kick", "slots": {}},
        "frames: must be 8k+1": {"prompt": PROMPT, **SETTINGS, "frames": 10},
        "size 2048x2048: at most 1044480 pixels": {
            "prompt": PROMPT,
            "height": 2048,
            "width": 2048,
        },
        "steps 500: at most 100": {"prompt": PROMPT, "steps": 500},
        "give prompt, or template": {"prompt": PROMPT, "template": "strike"},
        "image: model": {"prompt": PROMPT, **SETTINGS, "image": _png()},
    }
    for reason, body in bad.items():
        reply = client.post("/v1/videos", json=body)
        assert reply.status_code == 422 and reason in reply.json()["detail"], (reason, reply.text)
    missing = tmp_path / "nowhere"
    reply = client.post("/v1/loras", json={"name": "d", "path": str(missing)})
    assert reply.status_code == 422 and f"{missing}: no such file" in reply.json()["detail"]
    assert client.post("/v1/loras", json={"name": "a", "path": str(tmp_path)}).status_code == 422
    assert client.post("/v1/videos", json={"prompt": PROMPT, "frobs": 1}).status_code == 422


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_restart_keeps_queue_results_and_loras_and_api_key_guards(tmp_path, tiny_models, loras):
    model = tiny_models["cogvideox"]
    body = {"prompt": PROMPT, **SETTINGS}
    with service(tmp_path, model, "--lora", f"a={loras['a']}") as (url, proc):
        with httpx.Client(base_url=url) as client:
            first = client.post("/v1/videos", json=body | {"seed": 5}).json()["id"]
            assert wait_done(client, [first])[first]["state"] == "done"
            before = client.get(f"/v1/videos/{first}/content").content
            client.post("/v1/queue", json={"paused": True})
            waiting = [
                client.post("/v1/videos", json=body | {"lora": "a", "seed": 6}).json()["id"],
                client.post("/v1/videos", json=body | {"seed": 7}).json()["id"],
            ]
            assert [client.get(f"/v1/videos/{i}").json()["state"] for i in waiting] == [
                "queued"
            ] * 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    key = {"Authorization": "Bearer s3cret"}
    with service(tmp_path, model, env={"COGPIPE_API_KEY": "s3cret"}) as (url, _):
        with httpx.Client(base_url=url) as client:
            assert client.get(f"/v1/videos/{first}").status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert client.post("/v1/videos", json=body, headers=wrong).status_code == 401
            assert client.get("/health").status_code == 200  # a load balancer's probe: open
            assert "/v1/videos" in client.get("/openapi.json").json()["paths"]  # /docs reads it
            client.headers.update(key)
            assert [x["name"] for x in client.get("/v1/loras").json()] == ["a"]  # kept
            views = wait_done(client, waiting)
            assert [v["state"] for v in views.values()] == ["done", "done"], views
            assert client.get(f"/v1/videos/{first}/content").content == before
            assert client.get(f"/v1/videos/{waiting[0]}").json()["lora"] == "a"


def test_job_order_groups_a_loras_jobs_but_lets_no_lora_wait_for_ever():
    from cogpipe.service import STREAK, job_order

    jobs = [{"id": i, "lora": lora} for i, lora in enumerate(["a", None, "b", "a", None, "a"])]
    assert [j["id"] for j in job_order(jobs, "", 0)] == [0, 3, 5, 1, 4, 2]
    assert [j["id"] for j in job_order(jobs, None, 1)] == [1, 4, 0, 3, 5, 2]  # base ran last
    many = [{"id": i, "lora": "a"} for i in range(STREAK + 2)] + [{"id": "b", "lora": "b"}]
    order = [j["id"] for j in job_order(many[1:], "a", 1)]  # one a ran already
    assert order.index("b") == STREAK - 1  # after STREAK a's in a row, b's turn


def test_store_requeues_a_running_job_on_open_and_cancels_only_queued(tmp_path):
    from cogpipe.service_jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    running, waiting = store.add("k1", "a", {"x": 1}), store.add("k2", None, {"x": 2})
    assert store.claim(running["id"]) and not store.claim(running["id"])
    assert not store.cancel(running["id"])  # running: it cannot be cancelled
    reopened = JobStore(tmp_path / "jobs.sqlite")  # a process that died mid-video
    assert reopened.get(running["id"])["state"] == "queued"
    assert [j["id"] for j in reopened.queued()] == [running["id"], waiting["id"]]
    assert reopened.cancel(waiting["id"]) and not reopened.claim(waiting["id"])
    reopened.claim(running["id"])
    reopened.finish(running["id"], "videos/k1.mp4", 1.5)
    cached = reopened.add("k1", "a", {"x": 1}, done_as=reopened.find("k1", ("done",)))
    assert (cached["state"], cached["cached"], cached["result"]) == ("done", True, "videos/k1.mp4")
    assert reopened.counts() == {"queued": 0, "running": 0, "done": 2, "failed": 0, "cancelled": 1}


def test_serve_api_bad_flags_are_one_line_errors(tiny_models, tmp_path, capsys):
    from cogpipe.cli import main

    model = str(tiny_models["cogvideox"])
    assert main(["serve-api", "--model", model, "--lora", "no-equals-sign"]) == 2
    assert "--lora no-equals-sign: expected NAME=PATH" in capsys.readouterr().err
    assert main(["serve-api"]) == 2
    assert "give a CONFIG or --model" in capsys.readouterr().err
    assert main(["serve-api", "--model", model, "--templates", str(tmp_path / "t.yaml")]) == 2
    assert "t.yaml: cannot read" in capsys.readouterr().err
    for flags, message in [  # refused before anything loads or listens
        (["--fp8-linears"], "--fp8-linears needs a CUDA GPU (--device cpu)"),
        (["--compile", "--step-cache", "pab"], "serve-api: step_cache: pab with compile"),
        (["--step-cache-threshold", "-1"], "--step-cache-threshold: Input should be greater"),
    ]:
        assert main(["serve-api", "--model", model, "--device", "cpu", *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_speed_flags_are_the_services_defaults_and_keyed_only_when_on(
    tiny_models, tmp_path, monkeypatch
):
    from cogpipe import service_http
    from cogpipe.cli import main
    from cogpipe.service import speed_key

    started = []
    monkeypatch.setattr(service_http, "serve", lambda svc, *a, **k: started.append(svc))
    flags = ["--folder", str(tmp_path), "--step-cache", "first_block"]
    flags += ["--step-cache-threshold", "0.2"]
    assert main(["serve-api", "--model", str(tiny_models["cogvideox"]), *flags]) == 0
    defaults = started[0].defaults
    assert (defaults.step_cache, defaults.step_cache_threshold, defaults.fp8_linears) == (
        "first_block",
        0.2,
        False,
    )
    exact = generate.GenerateOptions(step_cache_threshold=0.5)  # read by first_block only
    assert speed_key(exact) == {}
    assert speed_key(exact.model_copy(update={"step_cache": "pab"})) == {"step_cache": "pab"}
    assert speed_key(defaults) == {"step_cache": "first_block", "step_cache_threshold": 0.2}
    assert speed_key(exact.model_copy(update={"fp8_linears": True})) == {"fp8_linears": True}


def test_a_cached_video_is_its_own_job_and_equals_generate_with_the_cache(tmp_path, tiny_models):
    """In-process: a service started with first_block (at a threshold that reuses every step
    after the first) makes generate's cached video; a request for the exact path is another
    job and video, and each is then served from the store as itself. A compiled service
    refuses a request for pab; a job queued under FP8 linears fails on a service without."""
    from fastapi.testclient import TestClient

    from cogpipe.service import Service
    from cogpipe.service_adapters import RequestError
    from cogpipe.service_http import create_app

    settings = SETTINGS | {"steps": 3, "seed": 4}
    cache = {"step_cache": "first_block", "step_cache_threshold": 1e6}
    options = generate.GenerateOptions(model=str(tiny_models["cogvideox"]), device="cpu", **cache)
    svc = Service(tmp_path / "api", options, templates={})
    svc.start({}, on_line=lambda x: None)
    try:
        client = TestClient(create_app(svc))
        asked = {"cached": {}, "exact": {"step_cache": "none"}}
        ids = {}
        for name, extra in asked.items():
            reply = client.post("/v1/videos", json={"prompt": PROMPT, **settings, **extra})
            assert reply.status_code == 202, reply.text
            ids[name] = reply.json()["id"]
        assert ids["cached"] != ids["exact"]
        views = wait_done(client, list(ids.values()))
        assert all(v["state"] == "done" for v in views.values()), views
        videos = {k: frames_of(client, i, tmp_path / f"{k}.mp4") for k, i in ids.items()}
        for name, extra in asked.items():
            again = client.post("/v1/videos", json={"prompt": PROMPT, **settings, **extra})
            assert (again.status_code, again.json()["cached"]) == (200, True), again.text
            stored = client.get(f"/v1/videos/{again.json()['id']}/content").content
            assert stored == client.get(f"/v1/videos/{ids[name]}/content").content, name
        spec = {"prompt": PROMPT, "lora_sha256": None}
        fp8 = options.model_copy(update={"fp8_linears": True}).model_dump(mode="json")
        with pytest.raises(RequestError, match="queued with fp8_linears on; the service now"):
            svc._generate({"id": "x", "lora": None, "spec": spec | {"options": fp8}})
    finally:
        svc.shutdown()
    assert not np.array_equal(videos["cached"], videos["exact"])
    for name, extra in asked.items():
        out = tmp_path / f"generate-{name}.mp4"
        wanted = options.model_copy(update=settings | extra)
        generate.run_generate({"x": PROMPT}, wanted, out)
        np.testing.assert_array_equal(videos[name], read_video(out), err_msg=name)

    compiled = options.model_copy(update={"compile": True, "step_cache": "none"})
    client = TestClient(create_app(Service(tmp_path / "compiled", compiled, {})))  # not started
    reply = client.post("/v1/videos", json={"prompt": PROMPT, "step_cache": "pab"})
    assert reply.status_code == 422 and "pab with compile re-traces" in reply.json()["detail"]


def test_image_to_video_job_equals_generate_and_15_takes_16k_plus_1(tmp_path, tiny_family):
    """In-process (the same app and worker the process serves): an image-to-video job with a
    base64 PNG equals `generate --image` of that PNG; CogVideoX 1.5 refuses 25 frames."""
    import base64

    from fastapi.testclient import TestClient

    from cogpipe.service import Limits, Service
    from cogpipe.service_http import create_app

    png = _png()
    image = tmp_path / "first.png"
    image.write_bytes(base64.b64decode(png))
    options = generate.GenerateOptions(model=str(tiny_family["i2v"]), device="cpu", steps=2)
    svc = Service(tmp_path / "api", options, templates={})
    svc.start({})
    try:
        client = TestClient(create_app(svc))
        assert client.post("/v1/videos", json={"prompt": PROMPT}).status_code == 422  # no image
        reply = client.post("/v1/videos", json={"prompt": PROMPT, "image": png, "seed": 3})
        assert reply.status_code == 202, reply.text
        job = reply.json()["id"]
        assert wait_done(client, [job])[job]["state"] == "done"
        got = frames_of(client, job, tmp_path / "service.mp4")
    finally:
        svc.shutdown()
    out = tmp_path / "generate.mp4"
    generate.run_generate(
        {"x": PROMPT}, options.model_copy(update={"image": image, "seed": 3}), out
    )
    np.testing.assert_array_equal(got, read_video(out))
    assert got.shape == (9, 64, 64, 3)

    # Requests are checked before anything loads: a service never started (no worker).
    model15 = options.model_copy(update={"model": str(tiny_family["1.5"])})
    client = TestClient(create_app(Service(tmp_path / "a15", model15, {}, Limits(queue=1))))
    reply = client.post("/v1/videos", json={"prompt": PROMPT, "frames": 25})
    assert reply.status_code == 422 and "takes 16k+1 frames" in reply.json()["detail"]
    assert client.post("/v1/videos", json={"prompt": PROMPT, "frames": 17}).status_code == 202
    reply = client.post("/v1/videos", json={"prompt": PROMPT, "frames": 33})
    assert reply.status_code == 429 and "queue is full (1 jobs)" in reply.json()["detail"]


def test_worker_fails_a_raising_job_alone_and_requeues_the_one_in_flight_on_stop(
    tmp_path, tiny_models, monkeypatch
):
    """The worker with generation stubbed (no model): a job that raises is `failed` with its
    reason and the next one runs; stopping mid-video puts that job back in the queue."""
    from fastapi.testclient import TestClient

    from cogpipe.service import Service
    from cogpipe.service_http import create_app

    calls = []

    def fake(pipe, prompt, options, on_step=None):
        calls.append(prompt)
        if prompt == "boom":
            raise FloatingPointError("non-finite pixels")
        while prompt == "slow":  # until the service stops: on_step raises then
            on_step(0, options.steps)
            time.sleep(0.01)
        return np.zeros((9, 64, 64, 3), np.uint8)

    monkeypatch.setattr(generate, "generate_one", fake)
    options = generate.GenerateOptions(
        model=str(tiny_models["cogvideox"]), device="cpu", **SETTINGS
    )
    svc = Service(tmp_path / "api", options, templates={})
    svc.adapters = SimpleNamespace(activate=lambda *a: None)  # no pipeline: never started
    svc.worker.start()  # the pipeline is never touched: generation is the stub
    client = TestClient(create_app(svc))
    ids = [client.post("/v1/videos", json={"prompt": p}).json()["id"] for p in ("boom", "ok")]
    views = wait_done(client, ids, timeout=30)
    assert views[ids[0]]["state"] == "failed"
    assert views[ids[0]]["error"] == "FloatingPointError: non-finite pixels"
    assert views[ids[1]]["state"] == "done"
    slow = client.post("/v1/videos", json={"prompt": "slow"}).json()["id"]
    deadline = time.time() + 30
    while client.get(f"/v1/videos/{slow}").json()["state"] != "running":
        assert time.time() < deadline, "the slow job never started"
        time.sleep(0.05)
    svc.shutdown()
    assert not svc.worker.is_alive()
    assert client.get(f"/v1/videos/{slow}").json()["state"] == "queued"
    assert calls == ["boom", "ok", "slow"]


def test_hot_swap_slot_videos_equal_generate_and_misfits_are_refused(tmp_path, tiny_models, loras):
    """A compiled service's LoRA slot (here eager on the CPU: the swap logic is the same):
    LoRAs of another rank and alpha/rank, a subset of the modules, scales and the base,
    interleaved, each video equal to `generate`'s loading that LoRA alone (a LoRA of a lower
    rank than the slot's to rounding: ±1 in a few pixels); a LoRA of a larger rank or of
    modules the slot lacks is a 422 and leaves the slot serving."""
    from cogpipe.service import Service
    from cogpipe.service_adapters import RequestError, Slot

    model = tiny_models["cogvideox"]
    small = make_lora(model, tmp_path / "small", seed=7, rank=2, targets=("to_q", "to_v"))
    options = generate.GenerateOptions(model=str(model), device="cpu", **SETTINGS, seed=5)
    svc = Service(tmp_path / "api", options, templates={}, hotswap=True)
    svc.start({"a": loras["a"], "small": small, "b": loras["b"]}, on_line=lambda x: None)
    try:
        assert isinstance(svc.adapters, Slot) and svc.max_rank == 4
        for name, scale in [("a", 1.0), ("small", 0.5), (None, 1.0), ("b", 1.0), ("a", 0.5)]:
            lora = svc.loras[name] if name else None
            svc.adapters.activate(lora, scale)
            got = generate.generate_one(svc.pipe, PROMPT, options)
            ref = options.model_copy(
                update={"lora": lora.path if lora else None, "lora_scale": scale}
            )
            want = generate.generate_one(generate.load(ref), PROMPT, ref)
            if name != "small":
                np.testing.assert_array_equal(got, want, err_msg=f"{name} at {scale}")
            else:  # padded to rank 4 with zeros: a matmul of another shape rounds apart
                diff = np.abs(got.astype(int) - want.astype(int))
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), diff.mean())
        big = make_lora(model, tmp_path / "big", seed=8, rank=8, targets=("to_q",))
        with pytest.raises(RequestError, match="rank 8 is over this service's --max-rank 4"):
            svc.add_lora("big", str(big))
        wide = make_lora(model, tmp_path / "wide", seed=9, rank=2, targets=("to_q", "proj_out"))
        with pytest.raises(RequestError, match="adapts proj_out .* that the first LoRA does not"):
            svc.add_lora("wide", str(wide))
        assert sorted(svc.loras) == ["a", "b", "small"]
    finally:
        svc.shutdown()
