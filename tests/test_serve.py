"""Production on Prefect, for real: a Prefect server, a `cpu` and a CPU-backed `gpu` process
worker on 127.0.0.1 (the `served` fixture runs what `cogpipe serve` runs), the deployments
of deployments/prefect.yaml, and the demo data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
from conftest import ZOMBIE_WITHIN_S

from cogpipe.config import STAGES
from cogpipe.pipeline import stage_keys, status
from cogpipe.workspace import read_table
from cogpipe_flows.serve import descendants
from cogpipe_tasks.secrets import SECRET_BLOCK

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

GPU_STAGES = ["caption", "recaption", "precompute", "train", "evaluate"]
TOKEN = "hf_cogpipe_test_token_4f1d"  # a Secret block's value that must never be shown


def wait_final(client, run_id: UUID, timeout: float):
    """The flow run once its state is final (fails the test after `timeout` seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} not final after {timeout:.0f}s (state {run.state.name})")


def children(client, parent: UUID) -> list:
    """Flow runs started by `parent` (run_deployment links them as subflows)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
    return client.read_flow_runs(flow_run_filter=flt)


def artifacts_of(client, runs: list[UUID]) -> dict[str, str]:
    """{artifact key: data} published by these flow runs."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs))
    return {a.key: a.data for a in client.read_artifacts(artifact_filter=flt) if a.key}


def test_full_pipeline_from_its_deployment_runs_gpu_stages_on_gpu_workers(
    served, served_demo, served_demo_file, api
):
    """Triggered through the API as the UI's Run button does, with the demo's config file;
    the hub token comes from a Secret block and shows up in no parameter, log or artifact."""
    from prefect.blocks.system import Secret
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: served.api_url}):
        Secret(value=TOKEN).save(SECRET_BLOCK, overwrite=True)
    deployment = api.read_deployment_by_name("cogpipe-pipeline/pipeline")
    params = {"config_file": str(served_demo_file)}
    run = api.create_flow_run_from_deployment(deployment.id, parameters=params)
    run = wait_final(api, run.id, timeout=1200)
    assert run.state.is_completed(), run.state.message
    assert run.work_pool_name == "cpu"

    stage_runs = children(api, run.id)
    # The demo's gate rejects no caption: recaption merged in the pipeline, with no GPU run.
    assert sorted(r.name for r in stage_runs) == sorted(set(GPU_STAGES) - {"recaption"})
    assert {r.work_pool_name for r in stage_runs} == {"gpu"}
    assert all(r.state.is_completed() for r in stage_runs)

    found = artifacts_of(api, [run.id, *(r.id for r in stage_runs)])
    wanted = {f"{stage}-summary" for stage in STAGES} | {"check-report", "evaluate-report"}
    assert wanted <= set(found), wanted - set(found)
    assert "checkpoint-000006" in found["evaluate-report"]

    runs = [run, *stage_runs]
    logs = api.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
    )
    said = "\n".join(log.message for log in logs)
    assert f"hub token: Prefect Secret block '{SECRET_BLOCK}'" in said
    for text in [said, *map(str, found.values()), *(str(r.parameters) for r in runs)]:
        assert TOKEN not in text

    # Every stage is done on disk for this config.
    assert all(s["done"] for s in status(served_demo).values())

    # A second run of the finished pipeline starts no GPU run: every stage is cached.
    again = api.create_flow_run_from_deployment(deployment.id, parameters=params)
    again = wait_final(api, again.id, timeout=600)
    assert again.state.is_completed(), again.state.message
    assert children(api, again.id) == []


def test_gpu_worker_killed_while_captioning_resumes_and_captions_every_clip_once(
    served, served_demo, api, tmp_path
):
    """The GPU worker dies mid-shard: the stuck run is marked Crashed by the heartbeat
    automation, the worker comes back, the pipeline's retry resumes the shard, and every
    clip is captioned exactly once (parts committed before the kill are never redone)."""
    config = served_demo.model_copy(
        update={
            "workspace": tmp_path / "ws",
            "caption": served_demo.caption.model_copy(update={"batch_size": 1, "shards": 2}),
        }
    )
    deployment = api.read_deployment_by_name("cogpipe-pipeline/pipeline")
    run = api.create_flow_run_from_deployment(
        deployment.id, parameters={"config": config.model_dump(mode="json"), "until": "caption"}
    )
    out = config.workspace / "caption" / stage_keys(config, "caption")["caption"]

    deadline = time.time() + 600
    while not list(out.glob("part-*.parquet")):  # the first committed part
        assert time.time() < deadline, "no caption part was committed within 600 s"
        time.sleep(0.1)
    served.kill_worker("gpu-cpu")  # SIGKILL to its process group: the worker and its run
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}

    deadline = time.time() + ZOMBIE_WITHIN_S + 120
    while True:
        crashed = [r for r in children(api, run.id) if r.state.type.value == "CRASHED"]
        if crashed:
            break
        assert time.time() < deadline, "the killed run was not marked Crashed"
        time.sleep(2)
    assert "heartbeat" in crashed[0].state.message

    served.start_worker("gpu", [])
    run = wait_final(api, run.id, timeout=900)
    assert run.state.is_completed(), run.state.message
    # Only the shards ran on the gpu pool: the pipeline's own process merged them.
    assert {r.name for r in children(api, run.id)} == {"caption-shard-0", "caption-shard-1"}

    clips = read_table(Path(plan_path(config, "check")) / "clips.parquet")
    kept = sorted(clips[clips.keep.astype(bool)].clip_id)
    captions = read_table(out / "captions.parquet")
    assert sorted(captions.clip_id) == kept  # every kept clip, each once
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == len(kept)  # batch_size 1: one part per clip, none written twice
    assert len(before) < len(parts), "the kill came after captioning had finished"
    for part in parts:
        if part.name in before:  # committed before the kill: not captioned again
            assert (part.stat().st_ino, part.stat().st_mtime_ns) == before[part.name]


def logs_of(client, runs: list) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
    return "\n".join(log.message for log in client.read_logs(log_filter=flt))


def logs_with(client, runs: list, text: str, timeout: float = 60) -> str:
    """The runs' logs once they hold `text`: a run's process ships its last log lines in a
    batch that can land after the run is Completed (seconds later on a loaded host)."""
    deadline = time.time() + timeout
    while text not in (said := logs_of(client, runs)) and time.time() < deadline:
        time.sleep(1)
    return said


def test_rejected_captions_are_recaptioned_on_gpu_workers_not_in_the_pipeline(
    served, served_demo, api
):
    """A gate that rejects every caption: the pipeline (on the cpu pool) starts one
    `recaption` run per caption shard on the gpu pool, merges their parts itself and loads
    no captioner (a load logs "captioner loaded on ...": the shard runs' logs hold it)."""
    config = served_demo.model_copy(
        update={
            "caption": served_demo.caption.model_copy(update={"shards": 2}),
            "filter": served_demo.filter.model_copy(update={"min_words": 1000, "max_words": 2000}),
        }
    )
    deployment = api.read_deployment_by_name("cogpipe-pipeline/pipeline")
    run = api.create_flow_run_from_deployment(
        deployment.id, parameters={"config": config.model_dump(mode="json"), "until": "filter"}
    )
    run = wait_final(api, run.id, timeout=600)
    # Every caption still fails the gate after its rounds: filter selects nothing, so it
    # fails naming why and is not recorded as done (the stages before it are).
    assert run.state.is_failed(), run.state.message
    assert "filter: no caption selected: 6 captions, every one rejected" in run.state.message

    stage_runs = {r.name: r for r in children(api, run.id)}
    shards = {f"{stage}-shard-{k}" for stage in ("caption", "recaption") for k in (0, 1)}
    assert set(stage_runs) == shards
    assert {r.work_pool_name for r in stage_runs.values()} == {"gpu"}
    for k in (0, 1):
        shard = [stage_runs[f"recaption-shard-{k}"]]
        assert "captioner loaded on" in logs_with(api, shard, "captioner loaded on")
    said = logs_with(api, [run], "recaption: 2 runs on gpu, merged here")
    assert "recaption: 2 runs on gpu, merged here" in said
    assert "captioner loaded" not in said and "loaded on" not in said

    report = status(config)
    assert report["recaption"]["done"] and not report["filter"]["done"]
    counts = report["recaption"]["counts"]
    assert counts["rejected_before"] == counts["round1"] == counts["clips"] > 0
    assert counts["parts_reused"] == counts["parts"]  # the merge found them all committed


def plan_path(config, stage: str) -> Path:
    return config.workspace / stage / stage_keys(config, stage)[stage]


def test_gpu_slots_are_strict_and_held_while_a_stage_runs(served, api, monkeypatch):
    """One job per GPU: a run holds its worker's slots; a slot whose limit was never
    created is an error, not a free pass."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cogpipe.gpus import SLOTS_ENV, slot_names
    from cogpipe_tasks.gpu import gpu_slots

    (name,) = slot_names([])  # the CPU-backed gpu worker's slot
    assert api.read_global_concurrency_limit_by_name(name).limit == 1
    with temporary_settings({PREFECT_API_URL: served.api_url}):
        monkeypatch.setenv(SLOTS_ENV, name)
        with gpu_slots() as held:
            assert held == [name]
            assert api.read_global_concurrency_limit_by_name(name).active_slots == 1
        assert api.read_global_concurrency_limit_by_name(name).active_slots == 0
        monkeypatch.setenv(SLOTS_ENV, "gpu:no-such-host:7")
        with pytest.raises(ConcurrencySlotAcquisitionError, match="gpu:no-such-host:7"):
            with gpu_slots():
                pass


def test_gpu_workers_split_the_hosts_cpus_as_torch_threads(served):
    from cogpipe_flows.serve import cpu_threads

    assert cpu_threads(1) == len(os.sched_getaffinity(0)) and cpu_threads(10**6) == 1

    def environ(worker: str) -> dict[str, str]:  # `cogpipe worker` exec'd the Prefect worker
        text = Path(f"/proc/{served.workers[worker].pid}/environ").read_text()
        return dict(item.split("=", 1) for item in text.split("\0") if "=" in item)

    expected = os.environ.get("OMP_NUM_THREADS", str(cpu_threads(served.gpu_workers)))
    assert environ("gpu-cpu")["OMP_NUM_THREADS"] == expected
    assert environ("cpu").get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")


def test_nightly_schedule_is_on_only_while_its_config_exists_and_runs_at_two_utc(
    api, served_demo, tmp_path
):
    """As deployed (no config_file) the nightly schedule is off and has no runs; given a
    config whose workspace exists it is turned on and scheduled once a night at 02:00 UTC;
    turned off (as serve does when it stops), its scheduled runs are gone."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from cogpipe.config import dump_config
    from cogpipe_flows.serve import arm_schedules, disarm_schedules

    deployment = api.read_deployment_by_name("evaluate-checkpoints/evaluate-checkpoints-nightly")
    assert deployment.work_pool_name == "gpu"
    assert [s.active for s in deployment.schedules] == [False]
    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
    assert api.read_flow_runs(flow_run_filter=flt) == []

    config = tmp_path / "nightly.yaml"
    config.write_text(dump_config(served_demo.model_copy(update={"workspace": tmp_path / "ws"})))
    (tmp_path / "ws").mkdir()
    params = {"config_file": str(config)}
    api.update_deployment(deployment.id, DeploymentUpdate(parameters=params))
    try:
        assert f"schedule of {deployment.name} on: {config}" in arm_schedules(api)
        deadline = time.time() + 120
        while not (runs := api.read_flow_runs(flow_run_filter=flt)):
            assert time.time() < deadline, "the scheduler made no runs for the nightly deployment"
            time.sleep(2)
        assert all(r.state.type.value == "SCHEDULED" for r in runs)
        assert all(r.parameters == params for r in runs)
        times = sorted(r.expected_start_time for r in runs)
        assert all(
            (t.hour, t.minute, t.tzinfo.utcoffset(t).total_seconds()) == (2, 0, 0) for t in times
        )
        assert len({t.date() for t in times}) == len(times)  # one a night
    finally:
        disarm_schedules(api)  # what serve does when it stops
        api.update_deployment(deployment.id, DeploymentUpdate(parameters={}))
    after = api.read_deployment(deployment.id)
    assert [s.active for s in after.schedules] == [False]
    assert api.read_flow_runs(flow_run_filter=flt) == []


def test_cogpipe_serve_prints_the_ui_address_and_stops_on_ctrl_c(tmp_path):
    from cogpipe_flows.serve import free_port

    port = free_port()
    env = os.environ | {
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "CUDA_VISIBLE_DEVICES": "",
        # its own database: the session's ephemeral API holds PREFECT_HOME's
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cogpipe.cli",
            "serve",
            "--port",
            str(port),
            "--logs",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"Prefect UI at http://127.0.0.1:{port}" in line, line
        assert "cpu" in line and "gpu-cpu" in line  # one cpu worker, one CPU-backed gpu worker
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            assert r.status == 200
        spawned = descendants(proc.pid)  # the server and the workers
        assert len(spawned) >= 3
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's foreground group
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    alive = [pid for pid in spawned if Path(f"/proc/{pid}").exists()]
    assert alive == [], "left running after Ctrl-C: " + ", ".join(map(str, alive))


@pytest.fixture
def test_slot(api):
    """A one-slot `gpu:*` limit of its own (the workers' slots stay untouched), deleted after."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = "gpu:cogpipe-test:0"
    api.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    yield name
    api.delete_global_concurrency_limit_by_name(name)


def lease(api, name: str):
    """Take `name`'s slot under a lease, as a run on any worker does (the lease's id)."""
    response = api.increment_concurrency_slots_with_lease(
        names=[name], slots=1, mode="concurrency", lease_duration=60
    )
    return UUID(response.json()["lease_id"])


def test_gpu_slots_no_stored_lease_holds_are_freed_and_held_ones_kept(served, api, test_slot):
    """What `cogpipe serve` does at start: a slot the database counts but no lease in the
    server's lease storage holds (a server keeping leases in memory forgot it on a restart)
    is freed; a slot a live run holds, on any worker, is kept."""
    from cogpipe_tasks.lease_storage import reconcile_gpu_slots

    def active() -> int:
        return api.read_global_concurrency_limit_by_name(test_slot).active_slots

    held = lease(api, test_slot)
    assert (served.leases / f"{held}.json").is_file()  # the server keeps its leases on disk
    assert reconcile_gpu_slots(api, served.leases, settle_s=0.1) == {}
    assert active() == 1
    api.release_concurrency_slots_with_lease(held)
    assert active() == 0

    api.increment_concurrency_slots(names=[test_slot], slots=1, mode="concurrency")  # no lease
    assert active() == 1
    freed = reconcile_gpu_slots(api, served.leases, settle_s=0.1)
    assert freed == {test_slot: 1} and active() == 0


def test_a_run_waiting_for_a_taken_gpu_slot_logs_which_and_why(
    served, api, test_slot, monkeypatch, caplog
):
    """Prefect waits for a taken slot silently; gpu_slots says which slot it waits for and
    what frees it, then takes the slot once it is freed."""
    import contextvars
    import logging
    import threading

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cogpipe.gpus import SLOTS_ENV
    from cogpipe_tasks.gpu import gpu_slots

    caplog.set_level(logging.INFO, logger="cogpipe_tasks.gpu")
    monkeypatch.setenv(SLOTS_ENV, test_slot)
    held, got = lease(api, test_slot), threading.Event()

    def run() -> None:
        with gpu_slots(first_log_s=0.2, log_every_s=0.5):
            got.set()

    with temporary_settings({PREFECT_API_URL: served.api_url}):
        waiting = threading.Thread(target=contextvars.copy_context().run, args=(run,))
        waiting.start()
    deadline = time.time() + 30
    while "still waiting" not in caplog.text and time.time() < deadline:
        time.sleep(0.1)
    assert not got.is_set()
    assert f"waiting for GPU slot {test_slot} (1/1 taken): held by another run" in caplog.text
    assert "still waiting after" in caplog.text  # said again while it waits

    api.release_concurrency_slots_with_lease(held)
    # Prefect's client asks again when the server's Retry-After says: up to 30 s x 1.3 by
    # default, the more denials the longer; on a loaded CI host 60 s was once not enough.
    waiting.join(timeout=150)
    assert got.is_set(), "the freed slot was not taken"
    assert f"got GPU slot {test_slot} after" in caplog.text
    assert api.read_global_concurrency_limit_by_name(test_slot).active_slots == 0
