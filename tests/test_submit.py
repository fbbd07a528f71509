"""The run form's parameters and `cogpipe submit`'s checks, without a server: a config file
plus overrides becomes the run's config, the demo's own config validates against the
schema the UI and the server check, and every mistake is one line naming it before
anything is sent."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from cogpipe.cli import main
from cogpipe.config import ConfigError, PipelineConfig, parse_sets
from cogpipe.demo import DEMO_CONFIG
from cogpipe_flows.submit import run_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """The demo's config, as `cogpipe demo` writes it, with relative paths."""
    path = tmp_path / "cfg" / "demo.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(DEMO_CONFIG, sort_keys=False))
    return path


def test_overrides_apply_over_the_file_and_relative_paths_follow_the_file(config_file):
    cfg = run_config(
        str(config_file),
        overrides={"train.max_steps": 7, "ingest.source": "./clips", "name": None, "seed": "3"},
    )
    base = load(config_file)
    assert cfg.train.max_steps == 7 and base.train.max_steps != 7
    assert cfg.ingest.source == config_file.parent / "clips"  # as if written in the file
    assert cfg.seed == 3 and cfg.name == base.name  # None: an empty form field changes nothing
    assert cfg.workspace == base.workspace


def test_a_relative_config_file_is_looked_up_in_the_checkout(config_file, monkeypatch):
    monkeypatch.setenv("COGPIPE_ROOT", str(config_file.parent.parent))
    assert run_config("cfg/demo.yaml") == load(config_file)
    with pytest.raises(ConfigError, match=r"config_file cfg/nope.yaml: no such file \(.*cfg/nope"):
        run_config("cfg/nope.yaml")


def test_config_file_or_config_is_required_and_not_both(config_file):
    with pytest.raises(ConfigError, match="config_file is required"):
        run_config(None)
    with pytest.raises(ConfigError, match="not both"):
        run_config(str(config_file), load(config_file))
    whole = load(config_file)
    assert run_config(None, whole, {"train.rank": 4}).train.rank == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.max_step": 5}, "override: 'train.max_step' is not a config field"),
        ({"nosuch.field": 5}, "override: 'nosuch.field' is not a config field"),
        ({"train.max_steps": "many"}, "train.max_steps: Input should be a valid integer"),
        ({"train.learning_rate": 5}, "train.learning_rate: Input should be less than or equal"),
    ],
)
def test_a_bad_override_names_the_field_and_why(config_file, override, message):
    with pytest.raises(ConfigError) as e:
        run_config(str(config_file), overrides=override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_set_values_are_read_as_yaml():
    sets = parse_sets(["train.max_steps=500", "train.target_modules=[to_q, to_v]", "name=a=b"])
    assert sets == {"train.max_steps": 500, "train.target_modules": ["to_q", "to_v"], "name": "a=b"}
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        parse_sets(["train.max_steps"])


def test_the_demo_config_with_its_legacy_boolean_validates_against_the_form_schema():
    """What the UI and the server check a run's parameters against: the flow's parameter
    schema. The demo's own config (gradient_checkpointing: false) is accepted; a wrong
    value is refused naming the field."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from cogpipe_flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    pasted = json.loads(json.dumps(DEMO_CONFIG))  # as pasted into the form's JSON
    validate({"config": pasted, "config_file": ""}, schema, raise_on_error=True)
    for legacy, current in ((False, "off"), (True, "full")):
        pasted["train"]["gradient_checkpointing"] = legacy
        validate({"config": pasted}, schema, raise_on_error=True)
        assert PipelineConfig.model_validate(pasted).train.gradient_checkpointing == current
    wrong = copy.deepcopy(pasted)
    wrong["train"]["gradient_checkpointing"] = "sometimes"
    with pytest.raises(ValidationError, match="config.train.gradient_checkpointing"):
        validate({"config": wrong}, schema, raise_on_error=True)


def test_no_deployment_default_names_a_path_of_its_own():
    """The forms `cogpipe serve` deploys start empty where a path goes: no /data/... that
    does not exist on the user's machine, and the nightly schedule ships off."""
    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        params = deployment.get("parameters") or {}
        assert "config" not in params and "config_file" not in params, deployment["name"]
        assert "/data/" not in json.dumps(params), deployment["name"]
        assert all(s.get("active") is False for s in deployment.get("schedules", []))


def test_submit_checks_the_config_and_the_server_before_sending(config_file, capsys):
    assert (
        main(
            [
                "submit",
                str(config_file),
                "--set",
                "train.rank=zero",
                "--api",
                "http://127.0.0.1:9/api",
            ]
        )
        == 2
    )
    assert "train.rank: Input should be a valid integer" in capsys.readouterr().err
    assert main(["submit", str(config_file), "--api", "http://127.0.0.1:9/api"]) == 2
    err = capsys.readouterr().err
    assert "no Prefect server answers at http://127.0.0.1:9/api" in err and "cogpipe serve" in err
    assert err.count("\n") == 1


def load(path: Path) -> PipelineConfig:
    from cogpipe.config import load_config

    return load_config(path)


def test_run_takes_the_same_sets_and_checks_them_before_starting(config_file, capsys):
    assert main(["run", str(config_file), "--set", "train.nosuch=1"]) == 2
    assert "override: 'train.nosuch' is not a config field" in capsys.readouterr().err
    assert not (config_file.parent / "workspace").exists()  # nothing started


def test_run_with_a_set_runs_the_overridden_config(demo_config, tmp_path):
    import subprocess
    import sys

    from cogpipe.config import dump_config

    path = tmp_path / "run.yaml"
    path.write_text(dump_config(demo_config()))
    other = tmp_path / "elsewhere"
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [
        sys.executable,
        "-m",
        "cogpipe.cli",
        "run",
        str(path),
        "--until",
        "ingest",
        "--set",
        f"workspace={other}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((other / "ingest").glob("*/_SUCCESS.json"))
    assert not (Path(demo_config().workspace) / "ingest").exists()
