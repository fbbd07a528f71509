"""Production on Prefect: work pools, one job per GPU, deployments, stuck-run detection and
the worker processes.

    cogpipe serve [--port 4200] [--expose]    server, pools, limits, deployments, workers
    cogpipe worker --pool gpu                 one worker; its GPUs are its CUDA_VISIBLE_DEVICES

Layout (deployments/prefect.yaml):

- pool `cpu` runs the full pipeline flow (ingest, check and filter in-process);
- pool `gpu` runs `cogpipe-stage/gpu`: caption, recaption, precompute, train and evaluate,
  started by the pipeline with `run_deployment` (one run per caption shard), and the nightly
  `evaluate-checkpoints`.

One job per GPU: every GPU worker names its GPUs from its own CUDA_VISIBLE_DEVICES (never
from deployment variables) as global concurrency limits of one slot,
`gpu:<host>:<device>`, and a GPU flow run holds all of its worker's slots with
`strict=True` for as long as it runs. The slots are leases the run renews: when its worker
dies, they free themselves a minute later (cogpipe_tasks.gpu); a run waiting for a slot
logs which one. A worker with no GPU serves the `gpu` pool on the CPU under one slot
`gpu:<host>:cpu`. The GPU workers `cogpipe serve` starts split the host's CPUs between them
as torch threads (cpu_threads).

Server restarts: the server `cogpipe serve` starts keeps its leases on disk beside its
database (cogpipe_tasks.lease_storage; Prefect's default keeps them in memory, so a restarted
server forgot them while its database kept their slots taken). A restart then neither frees
a slot a live run holds nor keeps one whose run died: that lease expires a minute after its
last renewal. At start, `cogpipe serve` also frees the GPU slots the database counts but no
stored lease holds, taken under a server that kept its leases in memory
(cogpipe_tasks.lease_storage.reconcile_gpu_slots).

Schedules: deployments/prefect.yaml ships them off; `serve` (and `setup`) turns one on only
when its run would find its config file and workspace, and turns off, deleting the runs it
had scheduled, any whose config or workspace is gone (arm_schedules). `cogpipe serve` keeps that database in its
own Prefect home, `<logs>/prefect`, unless PREFECT_HOME is set.

Stuck runs: flow runs send a heartbeat every `HEARTBEAT_S` seconds; the automation Prefect
documents for self-hosted servers marks a run that stops sending them (its worker died)
Crashed after `ZOMBIE_WITHIN_S`, so it can be retried.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cogpipe.errors import UserError
from cogpipe.gpus import SLOTS_ENV, gpu_devices, slot_names
from cogpipe.interrupt import descendants
from cogpipe.net import free_port as free_port  # tests and benches import it from here

CPU_POOL, GPU_POOL = "cpu", "gpu"
HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_WITHIN_S = 90
ZOMBIE_AUTOMATION = "cogpipe: crash flow runs that stopped sending heartbeats"
ROOT = (
    Path(__file__).resolve().parent.parent
)  # the checkout: deployments/, flows/ (editable install)


class ServeError(UserError, RuntimeError):
    """The server, a deployment or a worker could not be started."""


def ensure_pools(client, pools: list[str]) -> None:
    """Create the process work pools that do not exist yet."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    for pool in pools:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def ensure_limits(client, names: list[str]) -> None:
    """Create the one-slot GPU limits that do not exist yet (an existing one is kept)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    for name in names:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )


def ensure_zombie_automation(client, within_s: float = ZOMBIE_WITHIN_S) -> None:
    """The automation that marks a flow run Crashed when its heartbeats stop for `within_s`
    (replaced when its window differs)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={
            "prefect.flow-run.heartbeat",
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed",
        },
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=within_s),
    )
    for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
        if old.trigger.within == trigger.within:
            return
        client.delete_automation(old.id)
    action = ChangeFlowRunState(
        state=StateType.CRASHED,
        message=f"No heartbeat for {within_s:.0f}s: its worker stopped. Retry to resume.",
    )
    client.create_automation(
        AutomationCore(name=ZOMBIE_AUTOMATION, trigger=trigger, actions=[action])
    )


def deploy(api_url: str, prefect_file: Path = ROOT / "deployments" / "prefect.yaml") -> None:
    """`prefect deploy --all` from the checkout (entrypoints are relative to it).

    Raises:
        ServeError: the deploy command failed (its output is in the message).
    """
    env = os.environ | {"PREFECT_API_URL": api_url, "COGPIPE_ROOT": str(ROOT)}
    cmd = [_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ServeError(f"{prefect_file}: prefect deploy failed:\n{proc.stdout}\n{proc.stderr}")


def setup(
    api_url: str,
    gpu_groups: list[list[str]],
    zombie_within_s: float = ZOMBIE_WITHIN_S,
    leases: Path | None = None,
) -> dict[str, int]:
    """Pools, every worker's GPU limits, the stuck-run automation, then the deployments.

    `leases`: the server's lease folder, when this process can read it (the server
    `cogpipe serve` started): its forgotten GPU slots are freed (reconcile_gpu_slots).
    Another server's leases cannot be read through its API, so nothing is freed there.
    Returns {limit: slots freed}.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    freed = {}
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        ensure_pools(client, [CPU_POOL, GPU_POOL])
        ensure_limits(client, [n for devices in gpu_groups for n in slot_names(devices)])
        if leases is not None:
            from cogpipe_tasks.lease_storage import reconcile_gpu_slots

            freed = reconcile_gpu_slots(client, leases)
        ensure_zombie_automation(client, zombie_within_s)
    deploy(api_url)
    return freed


def worker_env(pool: str, api_url: str, devices: list[str] | None) -> dict[str, str]:
    """The environment of a worker (and so of the flow runs it starts)."""
    env = os.environ | {
        "PREFECT_API_URL": api_url,
        "COGPIPE_ROOT": str(ROOT),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get(
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S)
        ),
        "PYTHONUNBUFFERED": "1",
        # cogpipe's own warnings ("waiting for shard ..., held by ...") in the run's log
        "PREFECT_LOGGING_EXTRA_LOGGERS": os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "cogpipe"),
    }
    if devices is not None:  # a GPU worker: these GPUs only
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        env[SLOTS_ENV] = ",".join(slot_names(devices))
    return env


def worker_command(pool: str, name: str, limit: int | None) -> list[str]:
    cmd = [_prefect(), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    return [*cmd, "--limit", str(limit)] if limit else cmd


def run_worker(pool: str, api_url: str | None = None, name: str | None = None) -> int:
    """`cogpipe worker`: create this worker's GPU limits, then become the Prefect worker.

    A `gpu` worker takes one job at a time with all its GPUs (a multi-GPU worker serves
    multi-GPU training); a `cpu` worker takes any number.
    """
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ServeError("cogpipe worker: set PREFECT_API_URL or pass --api (the server's /api)")
    devices = gpu_devices() if pool != CPU_POOL else None
    env = worker_env(pool, api_url, devices)
    if devices is not None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
            ensure_limits(c, slot_names(devices))
    name = name or f"{pool}-{socket.gethostname()}" + (f"-{'-'.join(devices)}" if devices else "")
    cmd = worker_command(pool, name, 1 if devices is not None else None)
    os.execvpe(cmd[0], cmd, env)  # SIGTERM now reaches the Prefect worker itself
    return 0  # not reached


def cpu_threads(gpu_workers: int) -> int:
    """A GPU worker's share of this host's CPUs: its flow runs' torch threads
    (OMP_NUM_THREADS, unless set), so N workers' runs do not each start a thread per CPU."""
    return max(1, len(os.sched_getaffinity(0)) // max(gpu_workers, 1))


@dataclass
class Server:
    """A running `cogpipe serve`: the Prefect server and its workers (process groups)."""

    url: str
    server: subprocess.Popen | None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every worker
    gpu_workers: int = 1  # GPU workers on this host: they share its CPUs (cpu_threads)
    leases: Path | None = None  # the server's lease folder (None: leases it keeps elsewhere)
    freed: dict[str, int] = field(default_factory=dict)  # GPU slots freed at start
    schedules: list[str] = field(default_factory=list)  # per scheduled deployment: on or why off

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start_worker(self, pool: str, devices: list[str] | None = None, name: str | None = None):
        """Start `cogpipe worker` for `pool` in its own process group (so stopping it stops
        the flow runs it started); `devices` are a GPU worker's CUDA_VISIBLE_DEVICES."""
        name = name or (pool if devices is None else f"{pool}-{'-'.join(devices) or 'cpu'}")
        env = os.environ | self.env | {"PREFECT_API_URL": self.api_url}
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            env.setdefault("OMP_NUM_THREADS", str(cpu_threads(self.gpu_workers)))
        cmd = [sys.executable, "-m", "cogpipe.cli", "worker", "--pool", pool, "--name", name]
        out = open(self.logs / f"worker-{name}.log", "ab") if self.logs else subprocess.DEVNULL
        self.workers[name] = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.workers[name]

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a worker and every process below it (Prefect starts each flow run in a
        session of its own), then reap it: SIGKILL is what a dead GPU host looks like."""
        proc = self.workers.pop(name)
        signal_tree(proc.pid, sig)
        proc.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM the workers and their flow runs (SIGKILL after 20 s), then the server."""
        trees = {name: [p.pid, *descendants(p.pid)] for name, p in self.workers.items()}
        for pids in trees.values():
            _signal(pids, signal.SIGTERM)
        deadline = time.time() + 20
        for name, pids in trees.items():
            try:
                self.workers[name].wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal(pids, signal.SIGKILL)  # whatever is left of it, runs included
            self.workers.pop(name).wait()
        if self.server is not None and self.server.poll() is None:
            signal_tree(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                signal_tree(self.server.pid, signal.SIGKILL)
                self.server.wait()


@contextlib.contextmanager
def using(api_url: str, retries: int | None = None):
    """A sync Prefect client of `api_url` (`retries`: of a failed request, else Prefect's)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    changes = {PREFECT_API_URL: api_url}
    changes |= {PREFECT_CLIENT_MAX_RETRIES: retries} if retries is not None else {}
    with temporary_settings(changes), get_client(sync_client=True) as client:
        yield client


def schedule_problem(parameters: dict) -> str | None:
    """Why a scheduled run with these deployment parameters would fail now (no config, a
    config file or workspace that does not exist), or None. Relative paths: the checkout."""
    from cogpipe.config import ConfigError, PipelineConfig
    from cogpipe_flows.submit import run_config

    try:
        full = parameters.get("config")
        config = PipelineConfig.model_validate(full) if full else None
        cfg = run_config(parameters.get("config_file"), config, root=ROOT)
    except (ConfigError, ValueError) as e:
        return str(e).splitlines()[0]
    if not cfg.workspace.is_dir():
        return f"workspace {cfg.workspace} does not exist"
    return None


def arm_schedules(client) -> list[str]:
    """Turn on the schedule of each deployment whose runs would find their config and
    workspace, and keep the others off (deployments/prefect.yaml ships them off); returns
    one line per scheduled deployment saying which and why."""
    lines = []
    for deployment in client.read_deployments():
        if not deployment.schedules:
            continue
        problem = schedule_problem(deployment.parameters)
        for schedule in deployment.schedules:
            client.update_deployment_schedule(deployment.id, schedule.id, active=not problem)
        if problem:
            _drop_scheduled_runs(client, [deployment.id])
            lines.append(
                f"schedule of {deployment.name} paused: {problem}; set its config_file "
                "in deployments/prefect.yaml, then serve (or set up) again"
            )
        else:
            lines.append(
                f"schedule of {deployment.name} on: {deployment.parameters.get('config_file')}"
            )
    return lines


def disarm_schedules(client) -> int:
    """Pause every deployment schedule and delete the runs they scheduled that have not
    started; returns how many were deleted."""
    ids = []
    for deployment in client.read_deployments():
        for schedule in deployment.schedules:
            if schedule.active:
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        ids += [deployment.id] if deployment.schedules else []
    return _drop_scheduled_runs(client, ids) if ids else 0


def _drop_scheduled_runs(client, deployment_ids: list) -> int:
    """Delete the not yet started runs that schedules made for these deployments."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=deployment_ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
    )
    runs = [r for r in client.read_flow_runs(flow_run_filter=flt) if r.auto_scheduled]
    for run in runs:
        client.delete_flow_run(run.id)
    return len(runs)


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and everything below it."""
    _signal([pid, *descendants(pid)], sig)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def start_server(
    host: str,
    port: int,
    logs: Path | None = None,
    timeout: float = 180,
    database: Path | None = None,
) -> Server:
    """Start `prefect server start` bound to host:port, its leases on disk (lease_env),
    and wait until its API answers.

    Raises:
        ServeError: it exited or did not answer within `timeout` seconds.
    """
    from cogpipe_tasks.lease_storage import lease_env

    leases, folder = lease_env(database)
    env = os.environ | {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **leases,
    }
    env.pop("PREFECT_API_URL", None)
    if database is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
    out = open(logs / "server.log", "ab") if logs else subprocess.DEVNULL
    proc = subprocess.Popen(
        [_prefect(), "server", "start", "--host", host, "--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            where = f"; see {logs / 'server.log'}" if logs else ""
            raise ServeError(f"prefect server exited with {proc.returncode}{where}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                if r.status == 200:
                    return Server(url, proc, logs=logs, leases=folder)
        except OSError:
            time.sleep(0.5)
    signal_tree(proc.pid, signal.SIGKILL)
    raise ServeError(f"prefect server did not answer on {url} within {timeout:.0f}s")


def serve(
    host: str = "127.0.0.1",
    port: int = 4200,
    logs: Path | None = None,
    gpus: list[str] | None = None,
    zombie_within_s: float = ZOMBIE_WITHIN_S,
    database: Path | None = None,
    worker_env: dict[str, str] | None = None,
) -> Server:
    """Start the server, set it up (freeing the GPU slots it forgot), deploy, and start one
    CPU worker and one GPU worker per GPU (one CPU-backed `gpu` worker when there is none).
    The caller stops it.

    `database`: a SQLite file for the server (default: Prefect's, under PREFECT_HOME);
    `worker_env`: extra environment for the workers and their flow runs.
    """
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    server = start_server(host, port, logs, database=database)
    server.env = dict(worker_env or {})
    try:
        gpus = gpu_devices() if gpus is None else gpus
        groups = [[g] for g in gpus] or [[]]
        server.gpu_workers = len(groups)
        server.freed = setup(server.api_url, groups, zombie_within_s, server.leases)
        with using(server.api_url) as client:
            server.schedules = arm_schedules(client)
        server.start_worker(CPU_POOL)
        for devices in groups:
            server.start_worker(GPU_POOL, devices)
    except BaseException:
        server.stop()
        raise
    return server


def serve_forever(host: str, port: int, logs: Path) -> int:
    """`cogpipe serve`: print the UI address, then wait; Ctrl-C (or SIGTERM) stops all."""
    server = serve(host, port, logs)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"cogpipe: Prefect UI at {server.url}  (workers: {', '.join(server.workers)})")
    for name, slots in server.freed.items():
        print(
            f"cogpipe: freed GPU slot {name} ({slots} taken by no run: the server had forgotten it)"
        )
    for line in server.schedules:
        print(f"cogpipe: {line}")
    print(
        f"cogpipe: Prefect home {os.environ.get('PREFECT_HOME', '~/.prefect')}; logs in {logs}\n"
        "cogpipe: run the pipeline from the UI (Deployments > pipeline > Run > Custom run,"
        " config_file: demo/demo.yaml) or, in another terminal:\n"
        f"  export PREFECT_API_URL={server.api_url}\n"
        "  cogpipe submit demo/demo.yaml --wait\n"
        "cogpipe: Ctrl-C stops the workers and the server",
        flush=True,
    )
    try:
        while True:
            for name, proc in list(server.workers.items()):
                if proc.poll() is not None:
                    print(f"cogpipe: worker {name} exited ({proc.returncode}); restarting")
                    server.workers.pop(name)
                    devices = None if name == CPU_POOL else _devices_of(name)
                    server.start_worker(CPU_POOL if devices is None else GPU_POOL, devices, name)
            if server.server.poll() is not None:
                print(f"cogpipe: the server exited ({server.server.returncode})", file=sys.stderr)
                return 1
            time.sleep(2)
    except KeyboardInterrupt:
        print("cogpipe: stopping workers and server", flush=True)
    finally:
        server.stop()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _devices_of(worker_name: str) -> list[str]:
    rest = worker_name.removeprefix(f"{GPU_POOL}-")
    return [] if rest == "cpu" else rest.split("-")


def _prefect() -> str:
    """The `prefect` executable of this interpreter's environment."""
    local = Path(sys.executable).parent / "prefect"
    return str(local) if local.exists() else (shutil.which("prefect") or "prefect")
