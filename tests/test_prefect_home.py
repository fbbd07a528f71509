"""Self-contained runs: with PREFECT_HOME unset, `cogpipe run` keeps Prefect's database in
`<workspace>/.prefect` and `cogpipe serve` in `<logs>/prefect`, so `~/.prefect` is never
touched; serve's schedules are off unless their paths exist, and none is left on (nor any
run it scheduled) once serve stops."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import cogpipe_command, run_cogpipe

from cogpipe.config import dump_config
from cogpipe_flows.serve import free_port

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture
def home_env(tmp_path) -> dict[str, str]:
    """A child's environment with its own HOME and no Prefect home or server chosen."""
    home = tmp_path / "home"
    home.mkdir()
    env = os.environ | {"HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(name, None)
    return env


def test_run_keeps_its_prefect_database_in_the_workspace(demo_config, tmp_path, home_env):
    cfg = demo_config()
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    run_cogpipe("run", str(path), "--until", "ingest", env=home_env, timeout=600)
    assert (cfg.workspace / ".prefect" / "prefect.db").is_file()
    assert not (Path(home_env["HOME"]) / ".prefect").exists()


def test_serve_keeps_its_own_home_and_leaves_no_schedule_that_would_fail(tmp_path, home_env):
    logs = tmp_path / "serve"
    env = home_env | {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
    port = free_port()
    proc = subprocess.Popen(
        cogpipe_command("serve", "--port", str(port), "--logs", str(logs)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        said = read_until(proc, "cogpipe submit", timeout=300)
        api = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={api}" in said and f"UI at http://127.0.0.1:{port}" in said
        assert "schedule of evaluate-checkpoints-nightly paused: config_file is required" in said
        database = logs / "prefect" / "prefect.db"
        assert schedules(database) == {"evaluate-checkpoints-nightly": False}
        time.sleep(5)  # five passes of the scheduler: a paused schedule makes no run
        assert scheduled_runs(database) == 0
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, said + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert schedules(database) == {"evaluate-checkpoints-nightly": False}
    assert scheduled_runs(database) == 0
    assert not (Path(home_env["HOME"]) / ".prefect").exists()


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """The process's output up to the first line holding `text`."""
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        out.append(line)
        if text in line:
            return "".join(out)
    pytest.fail(f"no {text!r} from cogpipe serve:\n{''.join(out)}")


def schedules(database: Path) -> dict[str, bool]:
    """{deployment name: whether its schedule is active} from the server's database."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT d.name, s.active FROM deployment_schedule s JOIN deployment d"
            " ON d.id = s.deployment_id"
        ).fetchall()
    return {name: bool(active) for name, active in rows}


def scheduled_runs(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT count(*) FROM flow_run WHERE state_type = 'SCHEDULED'"
        ).fetchone()[0]
