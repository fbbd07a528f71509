"""A person's corrections: `cogpipe captions CONFIG --export FILE`, edited, fed back as
`filter.overrides`. Only filter onward recomputes, and the file round-trips unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cogpipe.cli import main
from cogpipe.config import ConfigError, dump_config
from cogpipe.pipeline import run_all, stage_keys
from cogpipe.workspace import read_table

UPTO = ("ingest", "check", "caption", "recaption", "filter")


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, sample_videos, tiny_models):
    """The demo config run up to filter once; a writer of configs with other overrides."""
    from cogpipe.config import PipelineConfig
    from cogpipe.demo import DEMO_CONFIG

    root = tmp_path_factory.mktemp("overrides")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
    raw |= {
        "workspace": str(root / "ws"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"] |= {"model": str(tiny_models["llava"])}
    raw["evaluate"] |= {"clip_model": str(tiny_models["clip"])}

    def config(overrides: Path | None = None) -> Path:
        cfg = PipelineConfig.model_validate(
            raw | {"filter": raw["filter"] | {"overrides": overrides}}
        )
        path = root / f"config-{overrides.stem if overrides else 'plain'}.yaml"
        path.write_text(dump_config(cfg))
        return path

    plain = config()
    from cogpipe.config import load_config

    run_all(load_config(plain), until="filter")
    return root, config


def _export(config: Path, out: Path) -> dict:
    assert main(["captions", str(config), "--export", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _curated(config: Path):
    from cogpipe.config import load_config

    cfg = load_config(config)
    results = {r.stage: r for r in run_all(cfg, until="filter")}
    return results, read_table(Path(results["filter"].path) / "curated.parquet")


def test_an_override_changes_one_caption_rejects_one_clip_and_round_trips(filtered):
    root, config = filtered
    plain = config()
    before, table = _curated(plain)
    exported = _export(plain, root / "captions.yaml")
    assert set(exported) == set(table.clip_id)
    accepted = table[table.accepted].clip_id.tolist()
    assert len(accepted) >= 2
    edited, dropped = accepted[0], accepted[1]
    exported[edited] = "A fighter winds up and slaps his opponent, whose head snaps to the side."
    exported[dropped] = {"reject": "the referee blocks the view"}
    edits = root / "edits.yaml"
    edits.write_text(yaml.safe_dump(exported, sort_keys=False))

    after, new = _curated(config(edits))
    assert [s for s in UPTO if after[s].reused] == ["ingest", "check", "caption", "recaption"]
    assert not after["filter"].reused and after["filter"].key != before["filter"].key
    row = new.set_index("clip_id")
    assert row.at[edited, "caption"] == exported[edited] and row.at[edited, "source"] == "override"
    assert row.at[edited, "accepted"] and not row.at[dropped, "accepted"]
    assert row.at[dropped, "reasons"] == "the referee blocks the view"
    assert sorted(new.clip_id[new.override]) == sorted([edited, dropped])
    report = (Path(after["filter"].path) / "report.md").read_text()
    assert "## Overrides" in report and edited in report and "the referee blocks the view" in report

    again = root / "captions-again.yaml"
    assert _export(config(edits), again) == exported
    fed_back, _ = _curated(config(again))  # the export fed back changes nothing more
    third = _export(config(again), root / "captions-third.yaml")
    assert (root / "captions-third.yaml").read_text() == again.read_text()
    assert third == exported


def test_an_unedited_export_fed_back_changes_nothing(filtered):
    root, config = filtered
    _, table = _curated(config())
    unedited = root / "unedited.yaml"
    _export(config(), unedited)
    _, same = _curated(config(unedited))
    cols = ["clip_id", "caption", "accepted", "selected", "reasons", "source"]
    assert same[cols].equals(table[cols]) and not same.override.any()


def test_an_override_for_an_unknown_clip_names_the_file_and_line(filtered):
    root, config = filtered
    bad = root / "bad.yaml"
    bad.write_text("# a comment\nnot-a-clip: some caption\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 2: 'not-a-clip' is no clip_id"):
        _curated(config(bad))
    bad.write_text("x: {reject: ''}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 1: expected"):
        _curated(config(bad))


def test_the_overrides_enter_the_filter_key_by_content(filtered):
    root, config = filtered
    from cogpipe.config import load_config

    a, b = root / "a" / "same.yaml", root / "b" / "same.yaml"
    for p in (a, b):
        p.parent.mkdir(exist_ok=True)
        p.write_text("x: caption\n")
    keys = [stage_keys(load_config(config(p)), "filter") for p in (a, b)]
    assert keys[0] == keys[1]
