"""`cogpipe serve` stopped while a GPU run holds its slot, started again on the same
database, and the run retried as the UI's Retry button does: the run says it waits for
the slot, gets it once the dead attempt's lease expires, and completes.

With Prefect's default lease storage (in the server's memory) the restarted server forgot
the lease while its database kept the slot taken: the retried run waited forever, silently.
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from cogpipe.gpus import slot_names
from cogpipe.pipeline import run_stage, status
from cogpipe_flows.serve import free_port, serve

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"}


@contextlib.contextmanager
def client_of(server):
    """A sync client of `server`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as c:
        yield c


def until(what: str, check, timeout: float, pause: float = 0.2):
    """`check()`'s value once it is truthy (fails the test after `timeout` seconds)."""
    deadline = time.time() + timeout
    while not (value := check()):
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(pause)
    return value


def logs(records) -> str:
    return "\n".join(record.message for record in records)


def test_a_gpu_run_retried_after_a_serve_restart_waits_for_its_slot_and_completes(
    demo_config, tmp_path, monkeypatch
):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.states import Scheduled

    config = demo_config(caption={"max_new_tokens": 8})  # a short run once it has the slot
    run_stage(config, "ingest")
    run_stage(config, "check")
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")  # default 15
    database, port = tmp_path / "prefect.db", free_port()
    options = dict(port=port, logs=tmp_path / "logs", gpus=[], database=database)
    (slot,) = slot_names([])  # the CPU-backed gpu worker's

    server = serve(**options, worker_env=WORKER_ENV)
    try:
        with client_of(server) as api:
            deployment = api.read_deployment_by_name("cogpipe-stage/gpu")
            params = {"config": config.model_dump(mode="json"), "stage": "caption"}
            run = api.create_flow_run_from_deployment(deployment.id, parameters=params)
            until(
                "the run took its GPU slot",
                lambda: api.read_global_concurrency_limit_by_name(slot).active_slots,
                timeout=120,
            )
        (lease,) = [p for p in server.leases.glob("*.json") if p.name != "expirations.json"]
        assert json.loads(lease.read_text())["metadata"]["holder"]["id"] == str(run.id)
    finally:
        server.stop()  # the run dies with its worker, holding the slot

    server = serve(**options, worker_env=WORKER_ENV)
    try:
        assert server.freed == {}  # its lease is on disk: nothing was forgotten
        with client_of(server) as api:
            assert api.read_global_concurrency_limit_by_name(slot).active_slots == 1
            retry = Scheduled(name="AwaitingRetry", message="Retry from the UI")
            answer = api.set_flow_run_state(run.id, retry, force=False)  # the UI's Retry
            assert answer.status.value == "ACCEPT", answer.details

            final = until(
                "the retried run finished",
                lambda: (r := api.read_flow_run(run.id)).state.is_final() and r,
                timeout=240,
                pause=1,
            )
            assert final.state.is_completed(), final.state.message
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            said = until(  # a run's last log lines can land after it is Completed
                "the run's log says it got its slot",
                lambda: "got GPU slot" in (t := logs(api.read_logs(log_filter=flt))) and t,
                timeout=60,
                pause=1,
            )
            assert f"waiting for GPU slot {slot} (1/1 taken): held by another run" in said
            assert f"got GPU slot {slot} after" in said
            assert api.read_global_concurrency_limit_by_name(slot).active_slots == 0
    finally:
        server.stop()
    assert status(config)["caption"]["done"]
