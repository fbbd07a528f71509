"""The command line explains itself: every command and option has help, `cogpipe --help`
lists every command, every command in the README parses; `generate --config` samples as
the config's evaluation; a CPU asked for full-size video is warned; `sweep-train` and
`evaluate-checkpoints` call their flows in-process (the flows themselves are tested in
test_train_sweep.py and test_nightly.py)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cogpipe import cli, cli_generate, generate_config
from cogpipe.cli import build_parser, main
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.models.cogvideox import FULL_FOLDER, LORA_FILE

README = Path(__file__).resolve().parent.parent / "README.md"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


def test_every_command_and_option_has_help_and_a_description():
    sub = subcommands()
    lines = {a.dest: a.help for a in sub._choices_actions}
    assert set(lines) == set(sub.choices)
    for name, parser in sub.choices.items():
        assert lines[name] and len(lines[name]) > 15, f"{name}: no one-line help"
        assert parser.description and len(parser.description) > 60, f"{name}: no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{name} {what}: no help text"
            assert "None" not in action.help, f"{name} {what}: help says None: {action.help}"


def test_top_level_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cogpipe [-h] [--debug] COMMAND ...")
    sub = subcommands()
    for action in sub._choices_actions:  # "    name    help text", on one line
        assert re.search(
            rf"^    {re.escape(action.dest)} +{re.escape(action.help[:40])}", out, re.M
        ), action.dest
    assert "cogpipe COMMAND --help" in out
    assert main([]) == 2  # `cogpipe` alone: the same list
    assert "sweep-train" in capsys.readouterr().out


def test_every_example_in_the_help_parses():
    parser = build_parser()
    texts = [parser.epilog] + [p.description for p in subcommands().choices.values()]
    examples = [line for text in texts for line in text.splitlines() if " cogpipe " in f" {line}"]
    assert len(examples) >= 25
    for line in examples:
        args = cogpipe_args(line)
        if args is None:
            continue  # prose that names a command
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"help example does not parse: {line.strip()}")


def test_command_help_has_an_example(capsys):
    for name in ("generate", "sweep-train", "evaluate-checkpoints", "train"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert re.search(rf"^  cogpipe {name} ", out, re.M), f"{name}: no example"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sampler steps; default: 50 (--config: its evaluate.steps)" in out
    assert "decode in tiles (less memory at 480x720); default: on" in out


# --------------------------------------------------------------------------- README


def readme_commands() -> tuple[list[list[str]], list[list[str]]]:
    """(command lines of ```bash blocks, inline `cogpipe ...` mentions) as argument lists
    after `cogpipe`, with prefixes (.venv/bin/), env assignments and comments dropped."""
    text = README.read_text()
    blocks = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        blocks += block.replace("\\\n", " ").splitlines()
    inline = [" ".join(m.split()) for m in re.findall(r"`((?:[\w./-]*/)?cogpipe [^`]+)`", text)]
    return [a for a in map(cogpipe_args, blocks) if a], [a for a in map(cogpipe_args, inline) if a]


def cogpipe_args(line: str) -> list[str] | None:
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    if not words or Path(words[0]).name != "cogpipe":
        return None
    return words[1:]


def test_every_readme_command_line_parses():
    blocks, inline = readme_commands()
    assert len(blocks) >= 15 and len(inline) >= 20  # the extraction finds them
    assert ["sweep-train", "slaps.yaml"] in blocks
    parser = build_parser()
    for args in blocks:  # whole commands: they must parse as written
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"README command does not parse: cogpipe {shlex.join(args)}")
    sub = subcommands()
    for args in inline:  # mentions in prose (`cogpipe rate`, `--shard K`): names must exist
        command = next((a for a in args if not a.startswith("-")), None)
        assert command in sub.choices, f"README: cogpipe {' '.join(args)}: no command {command}"
        options = {o: a for a in sub.choices[command]._actions for o in a.option_strings}
        for k, word in enumerate(args):
            flag = word.split("=", 1)[0]
            if not word.startswith("--") or flag == "--debug":
                continue
            assert flag in options, f"README: cogpipe {' '.join(args)}: {command} has no {flag}"
            choices = options[flag].choices
            value = word.split("=", 1)[1] if "=" in word else (args[k + 1 :] or [""])[0]
            if choices and value and not value.isupper():  # CONFIG-style placeholders pass
                assert set(value.split("|")) <= set(choices), f"README: {flag} {value}"


# --------------------------------------------------------------------------- generate --config


def config_file(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))  # order is keyed
    return path


def options_of(*argv: str) -> GenerateOptions:
    return cli_generate.generate_options(build_parser().parse_args(list(argv)))


def add_checkpoint(run: Path, step: int, full: bool = False) -> Path:
    folder = run / f"checkpoint-{step:06d}"
    if full:
        (folder / FULL_FOLDER).mkdir(parents=True)
        (folder / FULL_FOLDER / "config.json").write_text("{}")
    else:
        folder.mkdir(parents=True)
        (folder / LORA_FILE).write_bytes(b"")
    return folder


def test_generate_config_takes_the_evaluate_settings_and_flags_win(demo_config, tmp_path):
    cfg = demo_config(
        evaluate={
            "steps": 3,
            "frames": 17,
            "height": 48,
            "width": 80,
            "guidance": 2.5,
            "fps": 6,
            "seeds": [7, 8],
        }
    )
    path = config_file(tmp_path, cfg)
    options = options_of("generate", "--config", str(path), "--prompt", "a slap")
    assert (options.model, options.steps, options.frames, options.height, options.width) == (
        cfg.model,
        3,
        17,
        48,
        80,
    )
    assert (options.guidance, options.fps, options.seed, options.lora) == (2.5, 6, 7, None)
    flags = options_of(
        "sweep",
        "--config",
        str(path),
        "--prompt",
        "x",
        "--steps",
        "5",
        "--seed",
        "1",
        "--model",
        "2b",
    )
    assert (flags.steps, flags.seed, flags.model, flags.frames) == (5, 1, "2b", 17)

    run = generate_config.run_folder(cfg)  # train/<train key>/: the run `--latest` reads
    with pytest.raises(GenerateError, match="--latest: no checkpoint in .*cogpipe train"):
        options_of("generate", "--config", str(path), "--latest", "--prompt", "x")
    add_checkpoint(run, 2)
    newest = add_checkpoint(run, 10)
    (run / ".tmp-checkpoint-000012").mkdir()  # being written: not a checkpoint yet
    assert options_of("generate", "--config", str(path), "--latest", "--prompt", "x").lora == newest
    full = add_checkpoint(run, 20, full=True)
    latest = options_of("generate", "--config", str(path), "--latest", "--prompt", "x")
    assert (latest.transformer, latest.lora) == (full, None)

    with pytest.raises(GenerateError, match="--latest needs --config"):
        options_of("generate", "--latest", "--prompt", "x")
    with pytest.raises(GenerateError, match="not both"):
        options_of("generate", "--config", str(path), "--latest", "--lora", "x", "--prompt", "x")
    bad = config_file(tmp_path, demo_config(evaluate={"device": "cuda:1"}))  # evaluate takes it
    with pytest.raises(GenerateError, match=r"c\.yaml: evaluate\.device: Input should be 'auto'"):
        options_of("generate", "--config", str(bad), "--prompt", "x")
    assert options_of("generate", "--config", str(bad), "--device", "cpu", "--prompt", "x")
    with pytest.raises(GenerateError, match=r"^--height: must be a multiple of 16"):
        options_of("generate", "--config", str(path), "--height", "40", "--prompt", "x")


def test_cpu_warning_for_full_size_video_only(demo_config, tmp_path, capsys):
    full, demo = GenerateOptions(), GenerateOptions(frames=9, height=64, width=64, steps=2)
    assert "49x480x720 at 50 steps on a CPU" in generate_config.cpu_warning(full, "cpu")
    assert generate_config.cpu_warning(full, "cuda") is None
    assert generate_config.cpu_warning(demo, "cpu") is None
    grid = {"steps": ["2", "50"], "height": ["64", "480"], "width": ["720"], "frames": ["49"]}
    assert "49x480x720 at 50 steps" in generate_config.cpu_warning(demo, "cpu", grid)

    options_of("generate", "--prompt", "x", "--device", "cpu")  # the defaults: full size
    err = capsys.readouterr().err
    assert err.count("warning: 49x480x720 at 50 steps on a CPU takes hours") == 1
    path = config_file(tmp_path, demo_config())  # the demo's 9x64x64 at 2 steps
    options_of("generate", "--config", str(path), "--prompt", "x", "--device", "cpu")
    options_of(
        "sweep", "--config", str(path), "--prompt", "x", "--device", "cpu", "--grid", "steps=1,2"
    )
    assert "warning" not in capsys.readouterr().err
    options_of(
        "sweep",
        "--config",
        str(path),
        "--prompt",
        "x",
        "--device",
        "cpu",
        "--grid",
        "steps=2,50",
        "--height",
        "480",
        "--width",
        "720",
        "--frames",
        "49",
    )
    assert "49x480x720 at 50 steps" in capsys.readouterr().err


# --------------------------------------------------------------------------- flow commands


@pytest.fixture
def no_server(monkeypatch):
    """A PREFECT_API_URL: `_prefect_api` starts no server (the fake flows send nothing).

    Prefect is imported first: it reads its settings from the environment once, at import,
    and a dead URL read then would stay for every later test in this process."""
    import prefect.context  # noqa: F401

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")


def test_sweep_train_runs_the_flow_with_the_typed_grid_and_prints_the_ranking(
    demo_config, tmp_path, capsys, monkeypatch, no_server
):
    import cogpipe_flows.train_sweep as flow

    cfg = demo_config(name="tiny")
    calls = []

    def fake(config, grid, metric):
        calls.append((config, grid, metric))
        return [
            {
                "run": "tiny-learning_rate0.01-rank4",
                "train.learning_rate": 0.01,
                "train.rank": 4,
                "checkpoint": "checkpoint-000002",
                "dynamic_degree": 0.25,
                "dynamic_degree_low": 0.2,
                "dynamic_degree_high": 0.3,
            },
            {
                "run": "tiny-learning_rate0.001-rank4",
                "train.learning_rate": 0.001,
                "train.rank": 4,
                "checkpoint": None,
                "dynamic_degree": float("nan"),
            },
        ]

    monkeypatch.setattr(flow, "train_sweep", fake)
    path = config_file(tmp_path, cfg)
    argv = [
        "sweep-train",
        str(path),
        "--grid",
        "train.learning_rate=1e-3,0.01",
        "--grid",
        "train.rank=4",
        "--metric",
        "dynamic_degree",
    ]
    assert main(argv) == 0
    ((config, grid, metric),) = calls
    assert config == cfg
    assert grid == {"train.learning_rate": [0.001, 0.01], "train.rank": [4]}  # typed as YAML
    assert metric == "dynamic_degree"
    out = capsys.readouterr().out
    assert re.search(
        r"tiny-learning_rate0\.01-rank4 .*checkpoint-000002 .*0\.2500 \[0\.2000, 0\.3000\]", out
    )
    assert re.search(r"tiny-learning_rate0\.001-rank4 .* - ", out)
    assert f"report: {cfg.workspace / 'sweeps' / 'train' / 'tiny' / 'report.md'}" in out

    # Errors before anything runs, and a failed flow as one line naming the log.
    assert main(["sweep-train", str(path), "--grid", "train.ranks=4"]) == 2
    assert "'train.ranks' is not a config field" in capsys.readouterr().err
    assert main(["sweep-train", str(path), "--metric", "loss"]) == 2
    assert "--metric loss: not one of clip_score" in capsys.readouterr().err

    def broken(config, grid, metric):
        raise RuntimeError("cell tiny-rank4 failed: out of memory")

    monkeypatch.setattr(flow, "train_sweep", broken)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell tiny-rank4 failed: out of memory; log: " in err[0]
    assert "RuntimeError" in Path(err[0].rsplit("log: ", 1)[1]).read_text()  # the traceback


def test_sweep_train_ctrl_c_line_names_the_stage_it_stopped(demo_config):
    from cogpipe import train_sweep as sweeps

    cfg = demo_config(name="tiny")
    cells = sweeps.cells(cfg, {"train.rank": [4, 8]})
    assert cli._sweep_interrupted(cfg, cells).startswith("interrupted; ingest: nothing committed")


def test_evaluate_checkpoints_runs_the_nightly_flow_in_process(
    demo_config, tmp_path, capsys, monkeypatch, no_server
):
    import cogpipe_flows.evaluate_checkpoints as flow

    cfg = demo_config()
    calls = []

    def fake(config):
        calls.append(config)
        return {"run-a": 2, "run-b": 0}

    monkeypatch.setattr(flow, "evaluate_checkpoints", fake)
    assert main(["evaluate-checkpoints", str(config_file(tmp_path, cfg))]) == 0
    assert calls == [cfg]
    out = capsys.readouterr().out
    assert re.search(r"run-a +2", out) and re.search(r"run-b +0", out)
    assert f"index: {cfg.workspace / 'evaluate' / 'index.parquet'}" in out
    assert cli._nightly_interrupted(cfg).startswith("interrupted; evaluate-checkpoints: 0 of 0")
