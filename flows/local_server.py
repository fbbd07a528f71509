"""The Prefect API server of one `cogpipe run` (when PREFECT_API_URL names none).

Prefect's own ephemeral server is a child in the CLI's process group: a terminal's Ctrl-C
kills it with the CLI, which then hangs retrying its connection. This one runs in a
session of its own, so the terminal's SIGINT reaches only the CLI, which records the
interrupted run's state and then stops the server. It dies with the CLI however the CLI
ends, SIGKILL included: the kernel sends it SIGTERM when its parent dies
(PR_SET_PDEATHSIG), and a watchdog thread does the same where that is not available,
forcing the exit if a graceful stop hangs.

It serves Prefect's API as the ephemeral server does (no UI, no background services) on
127.0.0.1 and a free port, on the database of PREFECT_HOME (or
PREFECT_API_DATABASE_CONNECTION_URL): the runs stay visible to a later `prefect server
start` or `cogpipe serve` on the same home.

    server = LocalServer.start(log_file)   # returns at once: start-up overlaps the caller's imports
    server.wait()                           # until /api/health answers
    ...                                     # PREFECT_API_URL=server.api_url
    server.stop()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cogpipe.net import free_port
from cogpipe_flows.serve import ServeError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_S = 1.0  # how often the watchdog looks for its parent
FORCE_AFTER_S = 10.0  # a graceful stop that takes longer than this is cut short
START_ATTEMPTS = 3  # another process may take the free port before the server binds it


class LocalServer:
    """A started server process; `wait()` before the first API call, `stop()` at the end."""

    def __init__(self, port: int, proc: subprocess.Popen, log_file: Path | None):
        self.port, self.proc, self.log_file = port, proc, log_file

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls, log_file: Path | None = None) -> LocalServer:
        """Start the server process and return at once (from the main thread: the
        parent-death signal follows the thread that started the child)."""
        port = free_port()
        env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "0"}
        env.pop("PREFECT_API_URL", None)
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - the child's
        cmd = [sys.executable, "-m", "cogpipe_flows.local_server", str(os.getpid()), str(port)]
        try:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log_file:
                out.close()
        return cls(port, proc, log_file)

    def wait(self, timeout: float = 180) -> None:
        """Wait until the API answers; start again on another port if the process exited
        (its port was taken meanwhile).

        Raises:
            ServeError: it exited every time, or did not answer within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        attempts = 1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if attempts >= START_ATTEMPTS:
                    where = f"; see {self.log_file}" if self.log_file else ""
                    raise ServeError(
                        f"the Prefect server exited with {self.proc.returncode}{where}"
                    )
                restarted = LocalServer.start(self.log_file)
                self.port, self.proc, attempts = restarted.port, restarted.proc, attempts + 1
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop(grace_s=0)
        raise ServeError(
            f"the Prefect server did not answer on {self.api_url} within {timeout:.0f}s"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (a graceful stop closes the database), SIGKILL after `grace_s`."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


def die_with_parent(parent: int) -> None:
    """End this process when `parent` dies: SIGTERM from the kernel (Linux), and a watchdog
    thread that sends it too (other systems, or a parent gone before the prctl), then
    exits at once if the graceful stop has not ended FORCE_AFTER_S later."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(FORCE_AFTER_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cogpipe-parent-watch").start()


def main(parent: int, port: int) -> None:
    """The server process: Prefect's API app under uvicorn, as Prefect's ephemeral server
    runs it, until SIGTERM."""
    die_with_parent(parent)
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True, final=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
