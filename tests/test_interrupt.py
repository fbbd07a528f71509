"""Interrupting as a user does: kill -9 of `cogpipe run`, Ctrl-C of the whole process group
(what a terminal sends), and what the next run and `status` say about the work committed.

The stages up to precompute run once in-process (module fixture); each test works on a
copy of that workspace. Training runs long enough (STEPS steps, a checkpoint every 2) to
be interrupted after a checkpoint is committed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cogpipe.cli import main
from cogpipe.config import PipelineConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.pipeline import UPSTREAM, run_all, run_stage, stage_keys, stage_path
from cogpipe.workspace import Workspace, read_table

pytestmark = [pytest.mark.prefect, pytest.mark.serial]  # Ctrl-C must end a run within 10 s

STEPS = 12
STATE = "training_state.pt"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, sample_videos, tiny_models) -> tuple[dict, Path]:
    """The demo config (STEPS training steps, a checkpoint every 2) and a workspace where
    every stage up to precompute is done."""
    raw = copy.deepcopy(DEMO_CONFIG)
    raw |= {
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    raw["train"] |= {"max_steps": STEPS, "checkpoint_every": 2}
    workspace = tmp_path_factory.mktemp("upstream") / "workspace"
    run_all(PipelineConfig.model_validate(raw | {"workspace": str(workspace)}), "precompute")
    return raw, workspace


def copy_config(
    upstream: tuple[dict, Path], folder: Path, **changes
) -> tuple[Path, PipelineConfig]:
    """A copy of the upstream workspace under `folder` and its config as a YAML file."""
    raw, workspace = upstream
    raw = copy.deepcopy(raw) | {"workspace": str(folder / "workspace")} | changes
    shutil.copytree(workspace, folder / "workspace")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, PipelineConfig.model_validate(raw)


def output(cfg: PipelineConfig, stage: str) -> Path:
    keys = stage_keys(cfg, stage)
    inputs = {up: keys[up] for up in UPSTREAM[stage]}
    return stage_path(Workspace(cfg.workspace), cfg, stage, keys[stage], inputs)


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cogpipe ARGS` in a session of its own (signals to its group miss pytest), with `env`
    added to ours; its stdout and stderr go to files in `cwd` (read them with `outputs`)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    out, err = open(cwd / "stdout", "w"), open(cwd / "stderr", "w")  # noqa: SIM115
    with out, err:
        return subprocess.Popen(
            [sys.executable, "-m", "cogpipe.cli", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def outputs(cwd: Path) -> tuple[str, str]:
    return (cwd / "stdout").read_text(), (cwd / "stderr").read_text()


def resumable(run: Path) -> str | None:
    """The newest checkpoint holding a training state (where a run resumes), or None."""
    found = sorted(p.parent.name for p in run.glob("checkpoint-*/" + STATE))
    return found[-1] if found else None


def start_paused(path: Path, checkpoint: str, cwd: Path, home: Path) -> subprocess.Popen:
    """`cogpipe run PATH --until train`, held still (COGPIPE_PAUSE) where it is about to
    commit `checkpoint`, the one before committed: a tiny training run takes 0.05 s a
    step, so a signal sent once a checkpoint shows up on disk can land after the last."""
    paused = cwd / "paused"
    paused.unlink(missing_ok=True)
    env = {
        "PREFECT_HOME": str(home),
        "COGPIPE_PAUSE": f"1:/{checkpoint}",
        "COGPIPE_PAUSE_FILE": str(paused),
    }
    proc = start("run", str(path), "--until", "train", cwd=cwd, env=env)
    deadline = time.monotonic() + 120
    while not paused.exists():
        assert proc.poll() is None, f"cogpipe exited with {proc.returncode} before {checkpoint}"
        assert time.monotonic() < deadline, f"no {checkpoint} within 120 s"
        time.sleep(0.1)
    assert checkpoint in paused.read_text()
    return proc


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and everything below it, whatever their sessions (the Prefect server)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def left_over(tree: list[psutil.Process], within: float) -> list[str]:
    """What of `tree` still runs `within` seconds from now (zombies count as gone)."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in tree:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def safetensors_content(path: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes): the header as a dict, since safetensors writes its metadata
    keys in no fixed order (the tensors' bytes and offsets are deterministic)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def losses(run: Path) -> list[dict]:
    """losses.jsonl without its wall-clock seconds."""
    lines = (run / "losses.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_kill_9_then_ctrl_c_of_a_run_resume_to_the_uninterrupted_result(upstream, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path, cfg = copy_config(upstream, tmp_path / "run")
    run = output(cfg, "train")
    cwd = tmp_path / "run"
    home = tmp_path / "prefect"  # this test's Prefect database: its flow runs only

    # kill -9 of `cogpipe run` once training committed a checkpoint: its server goes too.
    proc = start_paused(path, "checkpoint-000006", cwd=cwd, home=home)
    tree = process_tree(proc.pid)
    assert any("local_server" in " ".join(p.cmdline()) for p in tree), "no Prefect server child"
    proc.kill()
    proc.wait()
    assert left_over(tree, within=5) == []

    # Ctrl-C of the process group: one line, exit 130 within 10 s, nothing left running.
    resumed = resumable(run)
    assert resumed == "checkpoint-000004"
    proc = start_paused(path, "checkpoint-000010", cwd=cwd, home=home)
    tree = process_tree(proc.pid)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    stopped = time.monotonic() - signalled
    assert left_over(tree, within=2) == []
    stdout, stderr = outputs(cwd)
    assert f"resuming train from {resumed} (step {int(resumed[11:])} of {STEPS})" in stdout
    assert "of a killed `cogpipe run` marked Crashed" in stdout  # the first run's flow run
    last = resumable(run)
    assert last == "checkpoint-000008"
    line = f"interrupted; train at step {int(last[11:])} ({last}); run again to resume"
    assert stderr.rstrip().splitlines()[-1] == line, stderr
    assert stderr.count("interrupted;") == 1 and "Traceback" not in stderr, stderr
    assert stopped < 10
    # Neither flow run is left Running: the killed one was marked Crashed by the second
    # run, the interrupted one by Prefect on its way out (its log line is INFO: not read).
    with sqlite3.connect(home / "prefect.db") as db:
        states = [row[0] for row in db.execute("SELECT state_type FROM flow_run")]
    assert states == ["CRASHED", "CRASHED"], states

    # `status` shows the partial training; the next run resumes and finishes.
    assert main(["status", str(path), "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert not train["done"] and train["partial"]["checkpoint"] == last
    proc = start("train", str(path), cwd=cwd)  # the stage command: no server to wait for
    assert proc.wait(timeout=300) == 0, outputs(cwd)[1]
    assert outputs(cwd)[0].startswith(f"resuming train from {last}")

    # ... equal to one uninterrupted run: losses and every checkpoint's LoRA.
    (tmp_path / "ref").mkdir()
    _, ref_cfg = copy_config(upstream, tmp_path / "ref")
    run_stage(ref_cfg, "train")
    ref = output(ref_cfg, "train")
    assert losses(run) == losses(ref) and len(losses(run)) == STEPS
    names = sorted(p.name for p in ref.glob("checkpoint-*"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == names
    for name in names:
        lora = f"{name}/pytorch_lora_weights.safetensors"
        assert safetensors_content(run / lora) == safetensors_content(ref / lora), name


GUARDED = """
import signal, subprocess, sys, threading, time
from cogpipe.interrupt import Guard

deaf = "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]; time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", deaf])
threading.Thread(target=time.sleep, args=(600,)).start()  # not a daemon: would hold the exit
print(child.pid, flush=True)
with Guard(lambda: "interrupted; test: 3 of 4 units committed; run again to resume", grace_s=1):
    while True:
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:  # swallowed, as some libraries do
            pass
"""


def test_ctrl_c_ends_even_code_that_swallows_it_and_children_that_ignore_it(tmp_path):
    """A stage command's guard: the watchdog ends a command that swallows KeyboardInterrupt,
    past a thread that never ends, and kills a child deaf to SIGINT and SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-c", GUARDED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = psutil.Process(int(proc.stdout.readline()))
    time.sleep(0.5)  # the child ignores the signals by now
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - signalled < 5
    assert proc.stderr.read() == "interrupted; test: 3 of 4 units committed; run again to resume\n"
    assert left_over([child], within=2) == []


def test_status_and_the_next_run_read_what_caption_and_precompute_committed(
    upstream, tmp_path, capsys
):
    """A caption stage with one of its 3 parts (2 clips each) missing, a precompute with one
    of its 3 shards missing (its latents still in the shared cache): what `status` shows
    and the stage command says before it finishes the stage."""
    path, cfg = copy_config(upstream, tmp_path)
    caption, precompute = output(cfg, "caption"), output(cfg, "precompute")
    for done in ("_SUCCESS.json", "captions.parquet", sorted(caption.glob("part-*"))[1].name):
        (caption / done).unlink()
    for done in ("_SUCCESS.json", "index.parquet", "shard-00001.safetensors"):
        (precompute / done).unlink()

    assert main(["status", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["caption"]["partial"]["text"] == "4 of 6 clips committed"
    assert report["precompute"]["partial"]["text"] == (
        "2 of 3 shards committed (latents of 2 more clips cached)"
    )
    assert report["train"]["partial"] is None and report["ingest"]["partial"] is None
    assert main(["status", str(path)]) == 0
    assert "not done  partial: 4 of 6 clips committed" in capsys.readouterr().out

    assert main(["caption", str(path)]) == 0
    assert capsys.readouterr().out.startswith("caption: 4 of 6 clips already committed\n")
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]["done"]


def test_a_stage_error_under_run_is_one_line_naming_the_log(upstream, tmp_path):
    """A run folder taken by another training run fails the train task: the console gets
    one error line naming the log file, which holds the traceback."""
    path, cfg = copy_config(upstream, tmp_path, name="taken")
    taken = Path(cfg.workspace) / "train" / "taken"
    taken.mkdir(parents=True)
    (taken / "run.json").write_text(json.dumps({"key": "another"}))
    proc = start("run", str(path), "--until", "train", cwd=tmp_path)
    assert proc.wait(timeout=300) == 1
    stdout, stderr = outputs(tmp_path)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"cogpipe: error: train: {taken} holds training run another")
    log = Path(errors[0].rsplit("; log: ", 1)[1])
    assert log.parent == Path(cfg.workspace) / "logs" and "Traceback" in log.read_text()


# Where each GPU stage is held still for the Ctrl-C: after its first unit is committed,
# before the next one's rename (COGPIPE_PAUSE), and what the interrupted and the next run say.
PAUSES = {
    "caption": (
        "1:/part-000-00001",
        "caption: 2 of 6 clips committed",
        "caption: 2 of 6 clips already committed",
    ),
    "precompute": (
        "1:/shard-00001",
        "precompute: 1 of 3 shards committed",
        "precompute: 1 of 3 shards already committed",
    ),
    "recaption": (
        "2:/cache/recaption/",
        "recaption: 2 of 6 clips (round 1) committed",
        "recaption: 2 of 6 clips (round 1) already committed",
    ),
    "evaluate": ("2:evaluate/index.parquet", "evaluate: 2 of 3 ", "evaluate: 2 of 3 "),
}
REJECT_ALL = {"min_words": 1000, "max_words": 2000}  # recaption: every caption goes again


def stage_outputs(cfg: PipelineConfig, stage: str) -> dict[str, bytes | list]:
    """A stage's committed files, its done marker and evaluate's index without wall times."""
    folder = output(cfg, stage)
    files = {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".mp4", ".png")
    }
    tables = {
        str(p.relative_to(folder)): read_table(p)
        .drop(columns=["seconds"], errors="ignore")
        .astype(str)
        .to_dict("records")
        for p in sorted(folder.rglob("*.parquet"))
    }
    if stage == "evaluate":
        index = read_table(Path(cfg.workspace) / "evaluate" / "index.parquet")
        tables["index"] = index.drop(columns=["evaluated_at"]).astype(str).to_dict("records")
    return files | tables


@pytest.mark.parametrize("stage", list(PAUSES))
def test_ctrl_c_in_each_gpu_stage_says_what_was_committed_and_resumes(stage, upstream, tmp_path):
    raw = copy.deepcopy(upstream[0]) | {"workspace": str(tmp_path / "run" / "workspace")}
    raw["train"] |= {"max_steps": 4}  # evaluate: the base and checkpoints 2 and 4
    if stage == "recaption":
        raw["filter"] |= REJECT_ALL
    cwd = tmp_path / "run"
    cwd.mkdir()
    path = cwd / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = PipelineConfig.model_validate(raw)
    if stage == "evaluate":  # the stages before it, done in-process (they are not the test)
        run_all(cfg, "train")
    pause, committed, resuming = PAUSES[stage]
    paused = cwd / "paused"
    os.environ |= {"COGPIPE_PAUSE": pause, "COGPIPE_PAUSE_FILE": str(paused)}
    try:
        proc = start("run", str(path), "--until", stage, cwd=cwd)
    finally:
        del os.environ["COGPIPE_PAUSE"], os.environ["COGPIPE_PAUSE_FILE"]
    deadline = time.monotonic() + 240
    while not paused.exists():
        assert proc.poll() is None and time.monotonic() < deadline, outputs(cwd)
        time.sleep(0.1)
    tree = process_tree(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert left_over(tree, within=2) == []
    stderr = outputs(cwd)[1]
    last = stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"interrupted; {committed}") and last.endswith("run again to resume")
    assert "Traceback" not in stderr, stderr

    proc = start("run", str(path), "--until", stage, cwd=cwd)
    assert proc.wait(timeout=300) == 0, outputs(cwd)
    assert resuming in outputs(cwd)[0]
    assert list(Path(cfg.workspace).rglob(".tmp-*")) == []

    ref = PipelineConfig.model_validate(raw | {"workspace": str(tmp_path / "ref" / "workspace")})
    run_all(ref, stage)
    assert stage_outputs(cfg, stage) == stage_outputs(ref, stage)
