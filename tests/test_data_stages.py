"""Ingest, check and filter on generated footage: every file accounted for, reasons exact."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cogpipe.check import near_pairs, phash
from cogpipe.config import FilterConfig, PipelineConfig
from cogpipe.filter import category_of, curate, judge, motion_groups, repetition
from cogpipe.pipeline import run_stage, stage_keys
from cogpipe.workspace import read_table


@pytest.fixture
def checked(demo_config):
    cfg = demo_config()
    ingest = run_stage(cfg, "ingest")
    check = run_stage(cfg, "check")
    return cfg, ingest, check


def test_every_file_is_a_row_and_bad_files_have_reasons(checked, sample_videos):
    cfg, ingest, _ = checked
    videos = read_table(ws_file(ingest, "videos.parquet")).set_index("path")
    assert sorted(videos.index) == sorted(str(p) for p in sample_videos.values())
    assert videos.loc[str(sample_videos["corrupt.mp4"]), "status"] == "rejected"
    assert "cannot open as video" in videos.loc[str(sample_videos["corrupt.mp4"]), "reason"]
    assert (
        videos.loc[str(sample_videos["notes.txt"]), "reason"]
        == "not a video file (extension '.txt')"
    )
    ok = videos[videos.status == "ok"]
    assert (ok.frames == 24).all() or set(ok.frames) >= {24}
    assert ingest.counts["files"] == len(sample_videos)


def test_black_frozen_and_duplicates_are_rejected_with_reasons(checked, sample_videos):
    _, _, check = checked
    clips = read_table(ws_file(check, "clips.parquet")).set_index("path")
    reason = lambda name: clips.loc[str(sample_videos[name + ".mp4"]), "reasons"]  # noqa: E731
    assert reason("black").startswith("black frames")
    assert reason("frozen").startswith("frozen")
    # The larger re-encode is kept; the original becomes its near duplicate.
    original, reencoded = (
        str(sample_videos["shapes_00.mp4"]),
        str(sample_videos["shapes_00_reencoded.mp4"]),
    )
    kept, dropped = (reencoded, original) if clips.loc[reencoded, "keep"] else (original, reencoded)
    assert clips.loc[kept, "keep"] and not clips.loc[dropped, "keep"]
    assert clips.loc[dropped, "dup_of"] == clips.loc[kept, "clip_id"]
    kept_id = clips.loc[kept, "clip_id"]
    assert clips.loc[dropped, "reasons"] == f"near duplicate of {kept_id} ({kept})"
    good = [f"shapes_{i:02d}" for i in range(1, 6)]
    assert all(clips.loc[str(sample_videos[g + ".mp4"]), "keep"] for g in good)
    assert set(clips.split) <= {"train", "heldout"}
    assert clips.clip_id.is_unique


def test_exact_copy_shares_video_id_and_one_is_kept(demo_config, sample_videos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_videos["shapes_01.mp4"].parent, src)
    shutil.copy(src / "shapes_01.mp4", src / "copy of shapes_01.mp4")
    cfg = demo_config(ingest={"source": str(src)})
    run_stage(cfg, "ingest")
    clips = read_table(ws_file(run_stage(cfg, "check"), "clips.parquet")).set_index("path")
    pair = clips.loc[[str(src / "shapes_01.mp4"), str(src / "copy of shapes_01.mp4")]]
    assert pair.video_id.nunique() == 1
    assert pair.keep.sum() == 1
    assert pair[~pair.keep].reasons.iloc[0].startswith("exact duplicate of")


def test_second_ingest_probes_nothing_and_new_file_gives_new_key(
    demo_config, sample_videos, tmp_path
):
    src = tmp_path / "src"
    shutil.copytree(sample_videos["shapes_01.mp4"].parent, src)
    cfg = demo_config(ingest={"source": str(src)})
    first = run_stage(cfg, "ingest")
    assert first.counts["probed"] == len(sample_videos)
    assert run_stage(cfg, "ingest").reused
    shutil.copy(src / "shapes_02.mp4", src / "new.mp4")
    os.utime(src / "new.mp4", ns=(1, 1))
    third = run_stage(cfg, "ingest")
    assert third.key != first.key and not third.reused
    assert third.counts["probed"] == 1  # only the new file is read; the rest come from cache


def test_config_change_downstream_keeps_upstream_keys(demo_config):
    a = stage_keys(demo_config())
    b = stage_keys(demo_config(caption={"prompt": "Describe the slap."}))
    assert a["ingest"] == b["ingest"] and a["check"] == b["check"]
    for stage in ("caption", "recaption", "filter", "precompute", "train", "evaluate"):
        assert a[stage] != b[stage], stage


GOOD = (
    "A tall fighter in black shorts plants his feet in a wide stance at the table, winds up "
    "with a long swing of his right arm and slaps his opponent flush on the cheek. The "
    "impact snaps the opponent's head sideways; he staggers back two steps, flinches, and "
    "the referee steps in while the crowd behind the stage rises. The camera holds a wide "
    "shot from the side."
)


def test_filter_accepts_a_good_caption_and_scores_it_high():
    score, reasons = judge(GOOD, FilterConfig(max_tokens=0))
    assert reasons == [] and score > 0.9


@pytest.mark.parametrize(
    ("caption", "truncated", "reason"),
    [
        ("", False, "empty caption"),
        (
            "A fighter slaps his opponent on the cheek at the table.",
            False,
            "too few words (11 < 40)",
        ),
        (GOOD + " He then" + " slaps again" * 40 + ".", False, "too many words"),
        (GOOD, True, "truncated (hit the token limit)"),
        (GOOD[:-1] + " and then the", False, "truncated (no closing punctuation)"),
        (GOOD + " He slaps him hard and" * 12 + " done.", False, "repetitive"),
        ("I'm sorry, but I cannot help with that. " + GOOD, False, 'refusal phrase ("i\'m sorry")'),
        ("As an AI, I watched it: " + GOOD, False, 'refusal phrase ("as an ai")'),
        ("Certainly! Here is what happens. " + GOOD, False, 'assistant phrase ("certainly!")'),
        (GOOD + " I hope this helps.", False, 'assistant phrase ("i hope this helps")'),
        (
            "The image shows two men at a table. " + GOOD,
            False,
            'still-image phrase ("the image shows")',
        ),
        ("In this picture, " + GOOD, False, 'still-image phrase ("in this picture")'),
        (
            "Un luchador alto con pantalones negros se coloca frente a la mesa, levanta el brazo "
            "derecho y abofetea a su rival en la mejilla; el golpe le gira la cabeza, retrocede dos "
            "pasos, el juez interviene y el publico se levanta mientras la camara mantiene un plano "
            "general desde un lado de la sala llena.",
            False,
            "not English",
        ),
        ("\u4e00\u540d\u9ad8\u5927\u7684\u62f3\u624b " * 12 + GOOD, False, "not English"),
        (
            "A woman in a red coat walks along a quiet beach at sunset while gulls circle above "
            "the water and small waves roll in over the sand; she stops, looks out at the horizon, "
            "smiles, and keeps walking as the sky turns orange and the light slowly fades into a "
            "soft purple evening over the sea.",
            False,
            "off-domain (0 of 2 domain terms)",
        ),
    ],
)
def test_filter_rejects_each_kind_with_its_reason(caption, truncated, reason):
    score, reasons = judge(caption, FilterConfig(max_tokens=0), truncated=truncated)
    assert any(r.startswith(reason) for r in reasons), reasons


def test_filter_counts_tokens_with_the_video_models_tokenizer():
    fc = FilterConfig(max_tokens=60)
    words = lambda text: len(text.split()) + 1  # noqa: E731  (a counter like T5's: + </s>)
    assert judge(GOOD, fc, count_tokens=words)[1] == [f"too many tokens ({words(GOOD)} > 60)"]
    assert judge(GOOD, fc.model_copy(update={"max_tokens": 226}), count_tokens=words)[1] == []


def test_filter_blocks_refusals_and_repetition_in_the_score():
    fc = FilterConfig(max_tokens=0)
    assert judge("I'm sorry, I cannot describe this. " + GOOD, fc)[0] == 0
    assert repetition("a b c a b c a b c".split()) == pytest.approx(4 / 7)


def test_phash_matches_a_rescaled_frame_and_not_another_picture():
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (8, 12, 3)).astype(np.uint8).repeat(16, 0).repeat(16, 1)
    small = img[::2, ::2]
    other = rng.integers(0, 255, img.shape).astype(np.uint8)
    as_int = lambda frame: int(phash(frame), 16)  # noqa: E731
    hashes = np.array([[as_int(img)], [as_int(small)], [as_int(other)]], dtype=np.uint64)
    pairs = near_pairs(hashes, np.array([3.0, 3.0, 3.0]), max_bits=8)
    assert pairs == [(0, 1)]


def ws_file(result, name):
    from pathlib import Path

    return Path(result.path) / name


def test_stage_tables_have_the_documented_columns(checked):
    _, ingest, check = checked
    videos = read_table(ws_file(ingest, "videos.parquet"))
    assert {"video_id", "path", "status", "reason"} <= set(videos.columns)
    clips = read_table(ws_file(check, "clips.parquet"))
    assert {
        "clip_id",
        "video_id",
        "path",
        "start",
        "end",
        "split",
        "keep",
        "reasons",
        "dup_group",
        "dup_of",
    } <= set(clips.columns)
    assert isinstance(clips, pd.DataFrame)


def test_filter_carries_caption_failures_and_missing_captions(tmp_path):
    from cogpipe.config import PipelineConfig
    from cogpipe.filter import run_filter
    from cogpipe.workspace import StageResult, Workspace, write_table

    ws = Workspace(tmp_path)
    cap = tmp_path / "caption" / "k"
    write_table(
        cap / "captions.parquet",
        pd.DataFrame(
            {
                "clip_id": ["a", "b", "c"],
                "caption": ["A fighter winds up and slaps his opponent hard.", None, None],
                "error": [None, "cannot decode frames: truncated", None],
            }
        ),
    )
    cfg = PipelineConfig(workspace=tmp_path, filter={"min_words": 3, "max_tokens": 0})
    result = run_filter(ws, cfg, {"recaption": StageResult("recaption", "k", str(cap))})
    table = read_table(ws_file(result, "curated.parquet")).set_index("clip_id")
    assert table.selected.tolist() == [True, False, False]
    assert table.loc["b", "reasons"] == "caption failed: cannot decode frames: truncated"
    assert table.loc["c", "reasons"] == "empty caption"
    assert result.counts == {
        "captions": 3,
        "accepted": 1,
        "selected": 1,
        "rejected": 2,
        "recaptioned": 0,
        "overrides": 0,
    }


# Curation: one hand-written caption per category, each accepted by the default gate.
KNOCKOUT = (
    "A heavyset fighter in red shorts takes an open-hand slap flush on the jaw at the table. "
    "His knees buckle, his eyes roll back and he collapses face first onto the floor of the "
    "stage, unconscious, while medics rush in from the side and his opponent walks back to "
    "his mark with both arms raised above his head."
)
BLOCK = (
    "The defender stands at the table with his hands at his sides, then braces and flinches "
    "early as his opponent winds up; he ducks his chin and leans away from the incoming palm, "
    "so the slap only grazes his ear. The two fighters argue, and both men step back to "
    "their marks to reset their stance for another attempt."
)
REACTION = (
    "Hit flush on the cheek, the young fighter recoils and his head jerks to the left; he "
    "winces, grimaces and shakes his head twice, rubbing his jaw with one hand as he tries "
    "to stay on his mark at the table, blinking hard while his eyes water and his face turns "
    "red under the bright lights."
)
REFEREE = (
    "Before the round, the referee stands between the two fighters at the table, points at "
    "the chalk line on the stage and explains the rules to both men, while an official "
    "checks the hand of the striker for tape and the judges at ringside write on their cards; "
    "the announcer then calls the name of each fighter in turn."
)
SCENE = (
    "A wide shot of the packed arena shows the crowd on its feet: the audience cheers, fans "
    "wave signs and phones above their heads, and the lights sweep across the stage. The "
    "camera zooms in slowly on the table, where one fighter lands a heavy slap on the face "
    "of his opponent, and the noise of the spectators grows louder."
)
# 116 words: still accepted (<= 120) but far from the ideal 50-100, so it scores 0.2.
LONG = GOOD + (
    " He wears white tape on both wrists and a black mouthguard, and his short beard is "
    "trimmed close; behind him a banner with sponsor logos hangs from a metal rig, and a "
    "bright white light shines down from directly above the two men onto the scuffed wooden top."
)


@pytest.mark.parametrize(
    ("caption", "category"),
    [
        (GOOD, "strike"),
        (KNOCKOUT, "knockout"),
        (BLOCK, "block"),
        (REACTION, "reaction"),
        (REFEREE, "referee"),
        (SCENE, "scene"),
        ("A quiet beach at sunset.", "other"),
        (None, "other"),
    ],
)
def test_filter_gives_each_caption_its_dominant_category(caption, category):
    assert category_of(caption, FilterConfig()) == category


def test_filter_category_ties_go_to_the_earlier_category_and_terms_match_prefixes():
    caption = "He slaps the opponent's cheek."
    a = FilterConfig(categories={"strike": ["slap"], "face": ["cheek"]})
    b = FilterConfig(categories={"face": ["cheek"], "strike": ["slap"]})
    assert category_of(caption, a) == "strike" and category_of(caption, b) == "face"
    assert category_of("Slapping and slapped.", a) == "strike"  # one term, matched twice


def test_filter_config_rejects_bad_curation_fields():
    from pydantic import ValidationError

    for bad in (
        {"select_top": -1},
        {"categories": {"other": ["slap"]}},
        {"categories": {" ": ["slap"]}},
        {"categories": {"strike": []}},
        {"categories": {"strike": ["Slap"]}},
        {"categories": {"strike": ["open hand"]}},
    ):
        with pytest.raises(ValidationError):
            FilterConfig(**bad)


def test_filter_key_covers_select_top_and_the_order_of_categories():
    from cogpipe.filter import key_of

    base = PipelineConfig()
    top = PipelineConfig(filter={"select_top": 100})
    cats = dict(reversed(list(base.filter.categories.items())))
    reordered = PipelineConfig(filter={"categories": cats})
    keys = {key_of(c, {"caption": "k"}) for c in (base, top, reordered)}
    assert len(keys) == 3


def judged_table(rows: list[tuple[str, float, str, bool]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["clip_id", "score", "category", "accepted"])


def test_curate_selects_every_accepted_caption_without_a_limit():
    table = judged_table(
        [("a", 0.9, "strike", True), ("b", 1.0, "strike", False), ("c", 0.1, "referee", True)]
    )
    for n in (0, 2, 3, 50):
        assert curate(table, n).tolist() == [True, False, True], n


def test_curate_keeps_every_category_and_prefers_higher_scores_inside_one():
    # Strike scores highest everywhere; plain top-4 by score would be four strikes.
    table = judged_table(
        [(f"s{i}", 1.0 - i / 100, "strike", True) for i in range(6)]
        + [
            ("k1", 0.5, "knockout", True),
            ("k2", 0.6, "knockout", True),
            ("r1", 0.3, "referee", True),
            ("o1", 0.2, "other", True),
            ("x1", 1.0, "referee", False),
        ]  # rejected: never selected, whatever its score
    )
    chosen = set(table.clip_id[curate(table, 4)])
    assert chosen == {"s0", "k2", "r1", "o1"}
    # Fewer slots than categories: the categories whose best scores highest.
    assert set(table.clip_id[curate(table, 2)]) == {"s0", "k2"}
    # Deterministic: the row order does not matter.
    shuffled = table.sample(frac=1, random_state=0)
    assert set(shuffled.clip_id[curate(shuffled, 4)]) == chosen


def test_curate_shares_slots_in_proportion_to_each_category():
    table = judged_table(
        [(f"s{i}", 0.9, "strike", True) for i in range(8)]
        + [("r0", 0.5, "referee", True), ("r1", 0.4, "referee", True)]
    )
    chosen = table.clip_id[curate(table, 5)].tolist()
    assert chosen == ["s0", "s1", "s2", "s3", "r0"]  # 8:2 of 5 slots; ties by clip_id


def test_curate_spreads_picks_over_motion_groups():
    # One category; the best scores all belong to the calmest clips.
    table = judged_table([(f"c{i}", 1.0 - i / 100, "strike", True) for i in range(9)])
    table["motion"] = [0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 20.0, 30.0, 40.0]
    assert table.clip_id[curate(table, 3)].tolist() == ["c0", "c1", "c2"]  # categories alone
    assert table.clip_id[curate(table, 3, groups=3)].tolist() == ["c0", "c3", "c6"]
    assert curate(table, 9, groups=3).all()
    assert motion_groups(table.motion, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def write_captions(root, captions: dict[str, str | None]):
    from cogpipe.workspace import StageResult, write_table

    cap = root / "caption" / "k"
    table = pd.DataFrame({"clip_id": list(captions), "caption": list(captions.values())})
    write_table(cap / "captions.parquet", table)
    return {"recaption": StageResult("recaption", "k", str(cap))}


def test_filter_of_no_caption_at_all_fails_and_is_not_done(tmp_path):
    """An empty captions table, even one written with no columns at all, is judged without
    a crash; the stage writes its (empty) set and report for a look, fails naming why and
    records no done marker."""
    from cogpipe.errors import EmptyStage
    from cogpipe.filter import run_filter
    from cogpipe.workspace import SUCCESS, Workspace, write_table

    upstream = write_captions(tmp_path, {})  # every clip was rejected before captioning
    write_table(Path(upstream["recaption"].path) / "captions.parquet", pd.DataFrame())
    cfg = PipelineConfig(workspace=tmp_path, filter={"max_tokens": 0})
    with pytest.raises(EmptyStage) as e:
        run_filter(Workspace(tmp_path), cfg, upstream)
    assert str(e.value) == "filter: no caption to judge (no clip reached the caption stage)"
    out = next((tmp_path / "filter").iterdir())
    assert not (out / SUCCESS).exists()
    assert "- captions: 0 (0 accepted, 0 selected, 0 rejected)" in (out / "report.md").read_text()


def test_filter_that_selects_nothing_names_the_top_reasons_and_is_not_done(tmp_path):
    from cogpipe.errors import EmptyStage
    from cogpipe.filter import run_filter
    from cogpipe.pipeline import finished
    from cogpipe.workspace import Workspace

    upstream = write_captions(tmp_path, {"a": "Too short.", "b": None, "c": "Also short."})
    gate = {"max_tokens": 0, "min_english": 0, "min_domain_terms": 0}
    cfg = PipelineConfig(workspace=tmp_path, filter=gate)
    with pytest.raises(EmptyStage) as e:
        run_filter(Workspace(tmp_path), cfg, upstream)
    assert str(e.value) == (
        "filter: no caption selected: 3 captions, every one rejected (too few words (2),"
        " empty caption (1))"
    )
    key = next((tmp_path / "filter").iterdir()).name
    assert finished(Workspace(tmp_path), cfg, "filter", key, {"recaption": "k"}) is None


def test_filter_stage_curates_by_category_and_reports_rejections(tmp_path):
    from cogpipe.filter import run_filter
    from cogpipe.workspace import Workspace

    refusal = "I'm sorry, but I cannot help with that | " + GOOD
    upstream = write_captions(
        tmp_path,
        {
            "a-long": LONG,
            "b1": BLOCK,
            "k1": KNOCKOUT,
            "r1": REFEREE,
            "s1": GOOD,
            "s2": "In the second round, " + GOOD,
            "x1": refusal,
            "x2": None,
        },
    )
    cfg = PipelineConfig(workspace=tmp_path, filter={"max_tokens": 0, "select_top": 4})
    result = run_filter(Workspace(tmp_path), cfg, upstream)
    table = read_table(ws_file(result, "curated.parquet")).set_index("clip_id")
    assert list(table.columns) == [
        "caption",
        "score",
        "category",
        "accepted",
        "selected",
        "reasons",
        "attempt",
        "source",
        "truncated",
        "override",
    ]
    assert table.category.to_dict() == {
        "a-long": "strike",
        "b1": "block",
        "k1": "knockout",
        "r1": "referee",
        "s1": "strike",
        "s2": "strike",
        "x1": "strike",
        "x2": "other",
    }
    assert table.accepted.tolist() == [True] * 6 + [False] * 2
    # One per category; the strike with the better score, not the first clip_id.
    assert sorted(table.index[table.selected]) == ["b1", "k1", "r1", "s1"]
    assert result.counts == {
        "captions": 8,
        "accepted": 6,
        "selected": 4,
        "rejected": 2,
        "recaptioned": 0,
        "overrides": 0,
    }
    assert result.stats["categories"] == {"knockout": 1, "block": 1, "strike": 1, "referee": 1}
    assert result.stats["rejections"] == {"refusal phrase": 1, "empty caption": 1}

    report = ws_file(result, "report.md").read_text()
    assert "- captions: 8 (6 accepted, 4 selected, 2 rejected)" in report
    assert "| category | accepted | selected |\n|---|---:|---:|\n| knockout | 1 | 1 |" in report
    assert "| strike | 3 | 1 |" in report
    assert (
        "| x1 | refusal phrase (\"i'm sorry\") | I'm sorry, but I cannot help with that \\| "
        "A tall fighter in black shorts plants\u2026 |" in report
    )
    assert "| x2 | empty caption |  |" in report
    assert ws_file(result, "caption_words.png").is_file()

    # select_top 0 (the default): a new key, and every accepted caption selected.
    every = run_filter(
        Workspace(tmp_path), cfg.model_copy(update={"filter": FilterConfig(max_tokens=0)}), upstream
    )
    table = read_table(ws_file(every, "curated.parquet"))
    assert every.key != result.key
    assert table.selected.tolist() == table.accepted.tolist()
    assert every.counts["selected"] == 6


def test_caption_report_caps_the_rejection_table(tmp_path):
    from cogpipe.report import write_caption_report

    table = pd.DataFrame(
        {
            "clip_id": [f"c{i}" for i in range(5)],
            "caption": ["x"] * 5,
            "category": "other",
            "accepted": False,
            "selected": False,
            "reasons": "empty caption",
        }
    )
    report = write_caption_report(tmp_path, table, max_rows=2).read_text()
    assert "| c1 | empty caption | x |" in report and "| c2 |" not in report
    assert "3 more rejected clips: see curated.parquet." in report
    assert "No accepted captions." in report
