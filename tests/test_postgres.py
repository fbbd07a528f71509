"""The Prefect server on a real PostgreSQL, as docker/compose.yaml runs it: Debian's
`postgresql` package started here in a temporary folder (a free port, its socket beside
its data), the server `cogpipe serve` starts pointed at it, the hand recipe of
deployments/prefect.yaml's header run as written (pools, deployments, a cpu and a
CPU-backed gpu worker), and the demo pipeline run from its deployment to the end.

Skipped only where the PostgreSQL binaries are absent; `.ci/run` installs them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_serve import children, wait_final

from cogpipe.pipeline import status

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def as_postgres(cmd: list[str]) -> list[str]:
    """`cmd` as the `postgres` user when this is root (initdb and postgres refuse root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    """A fresh PostgreSQL cluster on 127.0.0.1 and a free port, with a `prefect` database;
    yields its SQLAlchemy URL for Prefect, stops and removes the cluster after."""
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        pytest.skip(
            "PostgreSQL binaries absent (/usr/lib/postgresql/*/bin): apt-get install postgresql"
        )
    from cogpipe_flows.serve import free_port

    root = Path(tempfile.mkdtemp(prefix="cogpipe-pg-"))  # not under pytest's root-only tmp
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    initdb = [f"{PG_BIN}/initdb", "-D", str(data), "-U", "prefect", "-A", "trust"]
    initdb += ["-E", "UTF8", "--locale=C.UTF-8"]  # Prefect stores text as UTF-8
    subprocess.run(as_postgres(initdb), check=True, capture_output=True, timeout=120)
    log = root / "postgres.log"
    options = ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
    server = subprocess.Popen(
        as_postgres(
            [f"{PG_BIN}/postgres", "-D", str(data), "-p", str(port), "-k", str(root), *options]
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )
    try:
        _create_database(port, root, server, log)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        server.terminate()  # smart shutdown: the server waits for its clients to leave
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _create_database(port: int, sockets: Path, server: subprocess.Popen, log: Path) -> None:
    """`createdb prefect` once the new cluster accepts connections (fails the test, with the
    server's log, when it exits or does not within a minute)."""
    cmd = [f"{PG_BIN}/createdb", "-h", str(sockets), "-p", str(port), "-U", "prefect", "prefect"]
    deadline = time.time() + 60
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"postgres exited with {server.returncode}: {log.read_text()[-2000:]}")
        if subprocess.run(as_postgres(cmd), capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"postgres did not accept connections within 60 s: {log.read_text()[-2000:]}")


def header_commands() -> list[list[str]]:
    """The hand recipe of deployments/prefect.yaml's header, each line split as a shell
    would (its end-of-line comment dropped)."""
    header = (ROOT / "deployments" / "prefect.yaml").read_text().split("\nname:")[0]
    lines = re.findall(r"^#   ((?:prefect|cogpipe) .*)$", header, flags=re.M)
    return [shlex.split(line.split("  #")[0]) for line in lines]


def test_prefect_yaml_header_recipe_on_a_fresh_postgresql_server_runs_the_demo_pipeline(
    postgres, served_demo_file, tmp_path, monkeypatch
):
    """The header's lines, run as written against a fresh server on PostgreSQL, create what
    the deployments need and start the workers; the demo pipeline then runs from its
    deployment, GPU stages on the `gpu` worker, to the end."""
    from cogpipe.config import load_config
    from cogpipe_flows.serve import free_port, start_server, using

    commands = header_commands()
    assert [c[:2] for c in commands] == [["prefect", "work-pool"]] * 2 + [
        ["prefect", "--no-prompt"],
        ["cogpipe", "worker"],
        ["cogpipe", "worker"],
    ]
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", postgres)  # read by the server
    monkeypatch.delenv("COGPIPE_ROOT", raising=False)  # the recipe must not need it
    server = start_server("127.0.0.1", free_port(), tmp_path)
    env = os.environ | {"PREFECT_API_URL": server.api_url, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    bin_dir = Path(sys.executable).parent  # this environment's prefect and cogpipe
    try:
        for n, cmd in enumerate(commands):
            cmd = [str(bin_dir / cmd[0]), *cmd[1:]]
            if cmd[1] == "worker":  # runs until stopped
                out = open(tmp_path / f"worker-{n}.log", "ab")
                server.workers[str(n)] = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                continue
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{shlex.join(cmd)}:\n{done.stdout}\n{done.stderr}"
        config = load_config(served_demo_file).model_copy(update={"workspace": tmp_path / "ws"})
        with using(server.api_url) as api:
            deployment = api.read_deployment_by_name("cogpipe-pipeline/pipeline")
            params = {"config_file": str(served_demo_file), "workspace": str(config.workspace)}
            run = api.create_flow_run_from_deployment(deployment.id, parameters=params)
            run = wait_final(api, run.id, timeout=600)
            stage_runs = children(api, run.id)
    finally:
        server.stop()
    assert run.state.is_completed(), run.state.message
    assert {r.work_pool_name for r in stage_runs} == {"gpu"}
    assert stage_runs and all(r.state.is_completed() for r in stage_runs)
    assert all(s["done"] for s in status(config).values())
    # The server really kept its state in PostgreSQL: the run is a row of its database.
    assert str(run.id) in _flow_run_ids(postgres)


def _flow_run_ids(url: str) -> set[str]:
    """The flow run ids stored in the database at `url` (an asyncpg SQLAlchemy URL)."""
    import asyncio

    import asyncpg

    async def read() -> set[str]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            rows = await conn.fetch("select id from flow_run")
        finally:
            await conn.close()
        return {str(r["id"]) for r in rows}

    return asyncio.run(read())
