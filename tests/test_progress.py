"""Progress a person can watch: the shared rate/ETA, `cogpipe run` under a terminal and in a
log (a pipe), and per-step progress of `cogpipe generate` and sweeps."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from cli_support import cogpipe_command, run_cogpipe, tiny_video_args

from cogpipe.cli import main
from cogpipe.config import ConfigError
from cogpipe.progress import PlainDisplay, Rate, format_eta, format_rate, show, unit_of

pytestmark = pytest.mark.prefect

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEPS = 30  # training steps of the terminal run: several bar updates while train runs


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- rate and text


def test_rate_counts_only_this_runs_work_from_the_first_report():
    clock = Clock()
    rate = Rate(clock)
    # A resumed run finds 2,900 of 2,982 committed: that is its baseline, not its speed.
    assert rate.line("caption", 2900, 2982) == "caption: 2,900/2,982 (97%), ETA ?"
    clock.now += 60
    assert rate.line("caption", 2930, 2982, "shard 0 part 9") == (
        "caption: 2,930/2,982 (98%), 1,800 clips/h, ETA 1m44s, shard 0 part 9"
    )
    clock.now += 30
    assert rate.measure(2982, 2982) == (pytest.approx(82 / 90), 0.0)


def test_eta_and_rate_read_as_a_person_reads_them():
    assert [format_eta(s) for s in (0, 45, 200, 7500, 100_000)] == [
        "0s",
        "45s",
        "3m20s",
        "2h05m",
        "1d03h",
    ]
    assert format_eta(None) == format_eta(float("inf")) == "?"
    assert format_rate(0.5, "clips") == "1,800 clips/h"
    assert format_rate(2.5, "steps") == "2.5 steps/s"
    assert unit_of("train") == "steps" and unit_of("caption-shard-3") == "clips"
    assert unit_of("something-else") == ""


def test_plain_lines_first_every_n_seconds_and_last_and_waiting_whole():
    clock, out = Clock(), io.StringIO()
    display = PlainDisplay(out, every=30, clock=clock)
    train = display.stage("train")
    for step in range(0, 11):  # a step every 10 s
        train(step, 10, f"loss {1 / (step + 1):.4f}")
        clock.now += 10
    train(5, 10, "waiting for lock train-abc, held by host:12")
    lines = out.getvalue().splitlines()
    steps = [int(re.match(r"train: (\d+)/10 ", line).group(1)) for line in lines[:-1]]
    assert steps == [0, 3, 6, 9, 10], lines  # first, one per 30 s, the last
    assert lines[2] == "train: 6/10 (60%), 360 steps/h, ETA 40s, loss 0.1429"
    assert lines[-1] == "train: waiting for lock train-abc, held by host:12"


def test_every_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("COGPIPE_PROGRESS_EVERY", "0")
    out = io.StringIO()
    stage = PlainDisplay(out).stage("check")
    for done in range(4):
        stage(done, 3, "")
    assert len(out.getvalue().splitlines()) == 4
    monkeypatch.setenv("COGPIPE_PROGRESS_EVERY", "soon")
    with pytest.raises(ConfigError, match="COGPIPE_PROGRESS_EVERY='soon': not a number"):
        PlainDisplay(out)


def test_the_installed_display_hears_the_tasks_reports():
    """What `tasks.common.ProgressArtifact` calls reaches the display the CLI shows."""
    from cogpipe import progress

    out = io.StringIO()
    progress.report("caption", 1, 2)  # nothing installed: nothing happens
    with show(PlainDisplay(out, every=0)):
        progress.report("caption", 1, 2, "shard 0 part 1")
    progress.report("caption", 2, 2)
    assert out.getvalue() == "caption: 1/2 (50%), ETA ?, shard 0 part 1\n"


# --------------------------------------------------------------------------- cogpipe run


def write_config(folder: Path, sample_videos, tiny_models, steps: int) -> Path:
    """The demo's config on `folder/workspace`, training `steps` steps (one checkpoint)."""
    from cogpipe.demo import DEMO_CONFIG

    raw = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))  # a deep copy
    raw |= {
        "workspace": str(folder / "workspace"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(sample_videos["notes.txt"].parent)},
    }
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    raw["train"] |= {"max_steps": steps, "checkpoint_every": steps}
    path = folder / f"config-{steps}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def environment(folder: Path, **extra: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run `args` with stdout and stderr on a pseudo-terminal (120 columns); returns all it
    wrote, in order."""
    import fcntl
    import struct
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=env,
        start_new_session=True,
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the other end is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory, sample_videos, tiny_models) -> tuple[Path, str]:
    """`cogpipe run --until train` on a fresh workspace, on a pseudo-terminal: (folder, what
    it wrote). The workspace is shared: the run without a terminal trains again only."""
    folder = tmp_path_factory.mktemp("progress")
    config = write_config(folder, sample_videos, tiny_models, STEPS)
    env = environment(folder, TERM="xterm-256color", COLUMNS="120")
    return folder, run_in_terminal(cogpipe_command("run", str(config), "--until", "train"), env)


def test_run_on_a_terminal_shows_bars_while_caption_and_train_run(terminal_run):
    said = terminal_run[1]
    screens = [ANSI.sub("", s) for s in re.split(r"\r|\n", said)]
    table = next(i for i, s in enumerate(screens) if s.startswith("stage ") and "counts" in s)
    bar = r"^{} .*?(\d+)/{}\b"  # a drawn bar: the stage, then done/total
    caption = [i for i, s in enumerate(screens) if re.search(bar.format("caption", 6), s)]
    train = [
        (i, int(m.group(1)))
        for i, s in enumerate(screens)
        if (m := re.search(bar.format("train", STEPS) + r".*loss \d\.\d{4}", s))
    ]
    assert caption and train, said[-3000:]
    # While they ran: caption's bar before train's, and train's partway, all before the table.
    assert caption[0] < train[0][0] and train[-1][0] < table
    assert any(0 < done < STEPS for _, done in train), [d for _, d in train]
    assert re.search(r"\d+(\.\d)? steps/[sh]", said) and "ETA" in said
    assert any(s.startswith("train ") and "computed" in s for s in screens[table:])


def test_run_without_a_terminal_prints_plain_periodic_lines(
    terminal_run, sample_videos, tiny_models
):
    folder = terminal_run[0]
    steps = STEPS // 2  # a new training run; the stages before it are reused
    config = write_config(folder, sample_videos, tiny_models, steps)
    env = environment(folder, COGPIPE_PROGRESS_EVERY="0")
    proc = run_cogpipe("run", str(config), "--until", "train", env=env, timeout=300)
    assert "\r" not in proc.stdout + proc.stderr and "\x1b" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    train = [
        (int(m.group(1)), m.group(2))
        for line in lines
        if (m := re.match(rf"train: (\d+)/{steps} \(\d+%\), (.*)loss \d\.\d{{4}}$", line))
    ]
    assert len(train) >= 3 and [d for d, _ in train] == sorted(d for d, _ in train), lines
    assert train[-1][0] == steps
    assert all(re.fullmatch(r"([\d.,]+ steps/[sh], )?ETA (\?|(\d+[smhd])+), ", r) for _, r in train)
    assert re.search(r"^train +\w+ +computed", proc.stdout, re.M), proc.stdout


# --------------------------------------------------------------------------- generate, sweep


def test_generate_and_sweep_report_every_denoising_step(tmp_path, tiny_models, monkeypatch, capsys):
    from cogpipe.generate import GenerateOptions
    from cogpipe.sweep import run_sweep

    monkeypatch.setenv("COGPIPE_PROGRESS_EVERY", "0")
    tiny = tiny_video_args(tiny_models["cogvideox"], steps=3)
    out = tmp_path / "slap.mp4"
    assert main(["generate", "--prompt", "A slap.", "--output", str(out), *tiny]) == 0
    said = capsys.readouterr()
    steps = [
        int(m.group(1))
        for line in said.err.splitlines()
        if (m := re.match(r"a-slap: (\d)/3 \(\d+%\)", line))
    ]
    assert steps == [0, 1, 2, 3], said.err
    assert re.search(r"a-slap: 3/3 \(100%\), [\d.,]+ steps/[sh], ETA 0s", said.err)
    assert said.out.split()[0] == str(out)  # stdout keeps one line per video

    heard = []
    options = GenerateOptions(
        model=str(tiny_models["cogvideox"]), steps=2, frames=9, height=32, width=32, device="cpu"
    )
    run_sweep(
        {"slap": "A slap."},
        options,
        {"seed": [1, 2]},
        tmp_path / "sw",
        "seed",
        on_step=lambda done, steps, name: heard.append((name, done, steps)),
    )
    assert heard == [(f"seed={s}/slap", d, 2) for s in (1, 2) for d in range(3)]
