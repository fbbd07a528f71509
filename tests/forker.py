"""A process that imports torch, diffusers and cogpipe once and then forks a child per
`cogpipe.cli.main(argv)` job: fault-injection tests kill and re-run stage commands many
times without paying a fresh interpreter's imports (6-20 s) each time. Every child is its
own pid, really SIGKILLed by a fault point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same floats everywhere

# argv: PARALLEL, then the imports to do once. Reads a JSON list of jobs {argv, env, log}
# per line; runs each in a forked child (PARALLEL at once), its output to `log`; answers
# their exit codes.
SCRIPT = textwrap.dedent(
    """
    import importlib, json, os, sys, traceback
    for name in sys.argv[2:]:
        importlib.import_module(name)
    import cogpipe.cli

    def start(job):
        pid = os.fork()
        if pid:
            return pid
        os.environ.update(job["env"])
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            code = cogpipe.cli.main(job["argv"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)

    print("ready", flush=True)
    for line in sys.stdin:
        jobs, running, codes = json.loads(line), {}, {}
        for i, job in enumerate(jobs):
            if len(running) >= int(sys.argv[1]):
                pid, status = os.wait()
                codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
            running[start(job)] = i
        while running:
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        print(json.dumps([codes[i] for i in range(len(jobs))]), flush=True)
    """
)


class Forker:
    """The forking process; it imports `preload` while the caller does other work."""

    def __init__(self, preload: list[str], parallel: int = 2):
        env = os.environ | {"PYTHONPATH": str(REPO)} | ONE_THREAD
        cmd = [sys.executable, "-c", SCRIPT, str(parallel), *preload]
        self.proc = subprocess.Popen(
            cmd, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.ready = False

    def run(self, jobs: list[dict]) -> list[int]:
        """Each job's exit code (-9: killed by SIGKILL)."""
        if not self.ready:
            assert self.proc.stdout.readline() == "ready\n"
            self.ready = True
        self.proc.stdin.write(json.dumps(jobs) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
