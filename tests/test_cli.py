"""The command line: stage commands, status, and clear errors."""

import json

import pytest
import yaml

from cogpipe.cli import main
from cogpipe.config import STAGES
from cogpipe.demo import DEMO_CONFIG


def write_config(tmp_path, sample_videos, **overrides):
    raw = DEMO_CONFIG | {"ingest": {"source": str(sample_videos["notes.txt"].parent)}} | overrides
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_status_before_anything_ran(tmp_path, sample_videos, capsys):
    path = write_config(tmp_path, sample_videos)
    assert main(["status", str(path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert list(status) == list(STAGES)  # every stage, in pipeline order
    assert not any(s["done"] for s in status.values())
    assert status["ingest"]["path"].startswith(str(tmp_path / "workspace" / "ingest"))


def test_stage_commands_run_in_order_and_report(tmp_path, sample_videos, capsys):
    path = write_config(tmp_path, sample_videos)
    assert main(["ingest", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ingest" in out and "computed" in out and "rejected 1: cannot open as video" in out
    assert main(["check", str(path)]) == 0
    assert main(["ingest", str(path)]) == 0
    assert "reused" in capsys.readouterr().out
    main(["status", str(path), "--json"])
    status = json.loads(capsys.readouterr().out)
    assert status["ingest"]["done"] and status["check"]["done"] and not status["caption"]["done"]
    assert status["check"]["counts"]["kept"] == 6


def test_stage_whose_input_is_not_done_is_a_clear_error(tmp_path, sample_videos, capsys):
    path = write_config(tmp_path, sample_videos)
    assert main(["filter", str(path)]) == 2
    err = capsys.readouterr().err
    assert "needs 'recaption'" in err and "cogpipe recaption" in err


def test_bad_config_and_missing_source_are_clear_errors(tmp_path, sample_videos, capsys):
    bad = write_config(tmp_path, sample_videos, train={"rank": 0})
    assert main(["status", str(bad)]) == 2
    assert "train.rank" in capsys.readouterr().err
    missing = write_config(tmp_path, sample_videos, ingest={"source": str(tmp_path / "nope")})
    assert main(["ingest", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_says_what_the_tool_is_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["--help"])
    assert ended.value.code == 0
    text = capsys.readouterr().out
    assert "a folder of videos to an evaluated CogVideoX fine-tune" in text
    for command in ("demo", "run CONFIG", "status CONFIG", "generate", "serve", "worker"):
        assert f"cogpipe {command}" in text, command
