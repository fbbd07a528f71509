"""The stage contract (`cogpipe.stages.STAGE_SPECS`) and `cogpipe explain-key`: what went
into a stage's key, recorded in its done marker, and which field changed since the last run.

The end-to-end case runs ingest, check and caption of the tiny demo (no Prefect server),
changes the caption prompt and asks explain-key why caption's key is new.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

from cogpipe.cli import main
from cogpipe.config import STAGES, dump_config
from cogpipe.pipeline import explain_key, explain_text, run_all, stage_keys
from cogpipe.stages import STAGE_SPECS, changed_fields, spec_of
from cogpipe.workspace import SUCCESS, Workspace

NEW_PROMPT = "Describe the slap in one sentence."


def test_every_stage_has_one_spec_naming_its_hooks():
    """The specs follow the pipeline order, read only earlier stages, and name exactly the
    optional hooks their modules define (a new hook must be written into the contract)."""
    assert tuple(STAGE_SPECS) == STAGES
    for k, (name, spec) in enumerate(STAGE_SPECS.items()):
        assert set(spec.upstream) <= set(STAGES[:k]), name
        mod = importlib.import_module(f"cogpipe.{name}")
        assert isinstance(spec.version, int) and spec.version == mod.VERSION
        assert callable(mod.key_of) and callable(getattr(mod, f"run_{name}"))
        assert hasattr(mod, "output_dir") == (spec.output_dir is not None), name
        assert hasattr(mod, "is_current") == (spec.is_current is not None), name
    with pytest.raises(ValueError, match="unknown stage 'polish'; stages are ingest, check"):
        spec_of("polish")


def test_every_stage_task_takes_its_upstream_records_by_name():
    """The flow gives each task (config, {stage: record}); nothing rests on argument order."""
    from cogpipe_flows.pipeline import STAGE_TASKS
    from cogpipe_tasks.common import stage_inputs

    assert set(STAGE_TASKS) == set(STAGES)
    for stage, task in STAGE_TASKS.items():
        assert list(inspect.signature(task.fn).parameters) == ["config", "upstream"], stage
    records = {"filter": {"key": "f"}, "train": {"key": "t"}, "check": {"key": "c"}}
    assert stage_inputs("evaluate", {"upstream": records}) == {
        "train": "t",
        "check": "c",
        "filter": "f",
    }


def test_key_inputs_name_config_fields_and_reproduce_the_key(demo_config):
    cfg = demo_config()
    keys = stage_keys(cfg, "train")
    key, train = STAGE_SPECS["train"].key_inputs(cfg, {"precompute": keys["precompute"]})
    assert key == keys["train"]
    assert train["version"] == STAGE_SPECS["train"].version
    assert train["upstream"] == {"precompute": keys["precompute"]}
    assert train["fields"]["seed"] == cfg.seed  # a top-level field keeps its own name
    assert train["fields"]["train.learning_rate"] == cfg.train.learning_rate
    assert "train.model_fp.files" in train["fields"]  # the model by fingerprint, not path
    key, caption = STAGE_SPECS["caption"].key_inputs(cfg, {"check": keys["check"]})
    assert caption["fields"]["caption.prompt"].startswith("sha256:")  # long: by its hash


def test_evaluate_names_its_settings_not_the_nested_eval_key(demo_config):
    cfg, other = demo_config(), demo_config(evaluate={"guidance": 3.5})
    inputs = {"train": "t" * 12, "check": "c" * 12, "filter": "f" * 12}
    key_a, a = STAGE_SPECS["evaluate"].key_inputs(cfg, inputs)
    key_b, b = STAGE_SPECS["evaluate"].key_inputs(other, inputs)
    assert key_a != key_b and "evaluate.ekey" not in a["fields"]
    assert changed_fields(a, b) == {"evaluate.guidance": {"was": cfg.evaluate.guidance, "now": 3.5}}


def test_explain_key_says_caption_changed_by_its_prompt_and_upstream_did_not(
    demo_config, tmp_path, capsys
):
    cfg = demo_config()
    first = {r.stage: r for r in run_all(cfg, until="caption")}
    marker = Workspace(cfg.workspace).read_success(Path(first["caption"].path))
    _, recorded = STAGE_SPECS["caption"].key_inputs(cfg, {"check": first["check"].key})
    assert marker["key_inputs"] == recorded  # what went into the key, in the done marker

    changed = tmp_path / "changed.yaml"
    changed.write_text(dump_config(demo_config(caption={"prompt": NEW_PROMPT})))
    assert main(["explain-key", str(changed), "caption", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["key"] != first["caption"].key and not report["done"]
    assert report["last_run"]["key"] == first["caption"].key
    assert list(report["last_run"]["changed"]) == ["caption.prompt"]
    for up in ("ingest", "check"):
        assert report["upstream"][up] == {
            "key": first[up].key,
            "done": True,
            "was": first[up].key,
            "changed": False,
        }

    assert main(["explain-key", str(changed), "caption"]) == 0
    text = capsys.readouterr().out
    assert "changed since the last run: caption.prompt\n" in text
    assert f"   ingest     {first['ingest'].key}  done      unchanged" in text
    assert f"  *check      {first['check'].key}  done      unchanged" in text


def test_a_marker_without_key_inputs_says_so(demo_config, tmp_path):
    """Done markers written before key inputs were recorded stay readable."""
    cfg = demo_config()
    ingest = run_all(cfg, until="ingest")[0]
    path = cfg.workspace / "ingest" / ingest.key / SUCCESS
    record = json.loads(path.read_text())
    record.pop("key_inputs")
    path.write_text(json.dumps(record))
    other = demo_config(ingest={"extensions": [".mp4"]})
    report = explain_key(other, "ingest")
    assert report["last_run"]["recorded"] is False and report["last_run"]["changed"] is None
    assert report["upstream"] == {}
    assert "the last run did not record its key inputs" in explain_text(report)
