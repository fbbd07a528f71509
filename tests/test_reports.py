"""Reports people can read: the plots' axes and labels, the filter report's headline, and the
demo path free of library warnings that mean nothing to the user.

Plots are checked on the matplotlib figure itself (captured as it is saved): tick values,
bar positions, axis limits; tables are built small by hand, no stage is run.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest

from cogpipe import plots
from cogpipe.config import PipelineConfig


@pytest.fixture
def figures(monkeypatch):
    """{png name: figure} of every plot saved during the test (then saved as usual)."""
    saved, real = {}, plots.save

    def capture(fig, path):
        saved[path.name] = fig
        return real(fig, path)

    monkeypatch.setattr(plots, "save", capture)
    return saved


def ticks_are_whole(axis) -> bool:
    ticks = axis.get_ticklocs()
    return len(ticks) > 0 and np.allclose(ticks, np.round(ticks))


def check_tables(width=(128.0, 128.0, 160.0, np.nan), status=("ok", "ok", "ok", "bad")):
    """A manifest with float sizes (a rejected file has none) and 4 clips, one rejected."""
    manifest = pd.DataFrame(
        {
            "path": [f"v{i}.mp4" for i in range(len(width))],
            "status": list(status),
            "reason": ["" if s == "ok" else "not a video file (extension '.txt')" for s in status],
            "width": list(width),
            "height": [96.0, 96.0, 120.0, np.nan][: len(width)],
        }
    )
    clips = pd.DataFrame(
        {
            "clip_id": ["a", "b", "c", "d"],
            "keep": [True, True, True, False],
            "split": ["train", "train", "heldout", "train"],
            "duration": [3.0, 3.0, 2.5, 3.0],
            "trimmed": False,
            "reasons": ["", "", "", "frozen"],
        }
    )
    return manifest, clips


def test_check_report_counts_on_integers_and_durations_side_by_side(tmp_path, figures):
    from cogpipe.report import write_check_report

    write_check_report(tmp_path, *check_tables())
    assert set(figures) == {"rejections.png", "durations.png", "resolutions.png"}
    for fig in figures.values():
        fig.canvas.draw()
    assert ticks_are_whole(figures["rejections.png"].axes[0].xaxis)  # counts of 1
    durations = figures["durations.png"].axes[0]
    assert ticks_are_whole(durations.yaxis)
    # Kept and rejected clips of 3.0 s: their bars stand side by side, meeting at 3.0.
    kept, rejected = (c.patches for c in durations.containers)
    at_3 = [p for p in [*kept, *rejected] if abs(p.get_center()[0] - 3.0) < p.get_width()]
    assert [p.get_height() for p in at_3] == [2, 1]
    assert at_3[0].get_x() + at_3[0].get_width() <= at_3[1].get_x() + 1e-9
    assert list(durations.get_xticks()) == [2.5, 3.0]
    labels = [t.get_text() for t in durations.get_legend().get_texts()]
    assert labels == ["kept (3)", "rejected (1)"]


def test_histogram_of_many_values_puts_groups_side_by_side(tmp_path, figures):
    rng = np.random.default_rng(0)
    groups = {"kept": rng.normal(4, 1, 60), "rejected": rng.normal(4, 1, 20)}
    plots.histogram(tmp_path / "h.png", groups, "seconds", "Clip durations")
    ax = figures["h.png"].axes[0]
    first, second = (c.patches for c in ax.containers)
    for a, b in zip(first, second, strict=True):  # the two groups' bars of one bin
        assert a.get_x() + a.get_width() <= b.get_x() + 1e-9
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kept (60)", "rejected (20)"]


def test_resolutions_read_as_whole_pixels(tmp_path, figures):
    from cogpipe.report import write_check_report

    report = write_check_report(tmp_path, *check_tables()).read_text()
    assert "| 128x96 | 2 |" in report and "| 160x120 | 1 |" in report
    assert ".0x" not in report
    ax = figures["resolutions.png"].axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["128x96 (2)", "160x120 (1)"]
    assert plots.dims(np.float64(720.0), 480) == "720x480"


def test_caption_length_histogram_counts_on_integers(tmp_path, figures):
    from cogpipe.report import write_caption_report

    table = pd.DataFrame(
        {
            "clip_id": list("abc"),
            "caption": ["one two three four", "one two", "x y z"],
            "category": "other",
            "accepted": [True, True, False],
            "selected": [True, False, False],
            "reasons": ["", "", "too few words (3 < 5)"],
        }
    )
    write_caption_report(tmp_path, table)
    ax = figures["caption_words.png"].axes[0]
    figures["caption_words.png"].canvas.draw()
    assert ticks_are_whole(ax.yaxis)
    assert len(ax.containers) == 3  # selected, accepted not selected, rejected: one each


def judged(truncated: list[bool], reasons: list[str]) -> pd.DataFrame:
    n = len(truncated)
    return pd.DataFrame(
        {
            "clip_id": [f"c{i}" for i in range(n)],
            "caption": ["a fighter throws a punch"] * n,
            "category": "other",
            "accepted": [not r for r in reasons],
            "selected": False,
            "reasons": reasons,
            "truncated": truncated,
            "override": False,
        }
    )


def test_filter_report_says_when_most_captions_were_truncated(tmp_path):
    from cogpipe.filter import headline
    from cogpipe.report import write_caption_report

    cfg = PipelineConfig(caption={"max_new_tokens": 40}, filter={"reject_truncated": False})
    table = judged([True] * 5 + [False], [""] * 6)
    notes = headline(table, cfg)
    assert notes[0].startswith("**5 of 6 captions (83%) were truncated**")
    assert "caption.max_new_tokens = 40" in notes[0] and "reject_truncated is off" in notes[0]
    report = write_caption_report(tmp_path, table, notes=notes).read_text()
    assert report.index("were truncated") < report.index("## Selection by category")

    assert headline(judged([True] * 3 + [False] * 3, [""] * 6), cfg) == []  # half is not most
    # A caption a person wrote (an override) is not cut, whatever the captioner did.
    assert headline(table.assign(override=[True] * 3 + [False] * 3), cfg) == []


def test_filter_report_names_a_dominant_rejection_and_its_setting():
    from cogpipe.filter import headline

    cfg = PipelineConfig()
    many = "too many words (90 > 80)"
    table = judged(
        [False] * 5,
        [
            many,
            many,
            f"{many}; off-domain (0 of 1 domain terms)",
            "not English (10% common English words)",
            "",
        ],
    )
    assert headline(table, cfg) == [
        "**3 of 4 rejected captions (75%) were rejected as too many words**; "
        "the setting behind it: filter.max_words."
    ]
    split = judged(
        [False] * 4, [many, "not English (1%)", "repetitive (50% of trigrams repeat)", ""]
    )
    assert headline(split, cfg) == []  # no kind holds most of the rejections
    assert headline(judged([False] * 2, [many, many]), cfg) == []  # too few to call it a pattern


def metric_scores(values, spread, metric="temporal_consistency") -> pd.DataFrame:
    names = ["base", "checkpoint-000003", "checkpoint-000006"]
    rows = {
        "checkpoint": names,
        "step": [0, 3, 6],
        metric: values,
        f"{metric}_low": [v - spread for v in values],
        f"{metric}_high": [v + spread for v in values],
    }
    return pd.DataFrame(rows)


def test_metrics_plot_shows_intervals_at_the_metrics_scale():
    from cogpipe.eval_report import metrics_figure

    # Differences of 0.0003 inside intervals of +-0.0005: not a panel of noise.
    scores = metric_scores([0.9948, 0.9947, 0.9945], 0.0005)
    fig = metrics_figure(scores, ["temporal_consistency"])
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0.9945 - 0.0005 and hi >= 0.9948 + 0.0005  # every interval inside
    assert hi - lo >= 0.05 * 2 and hi <= 1.0  # 5% of the metric's range [-1, 1], within it
    fig.canvas.draw()
    assert ticks_are_whole(ax.xaxis)  # steps
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"base", "base 95% interval", "checkpoint"} <= set(labels)

    # Wide intervals are never cut: the y-range covers them with room to spare.
    wide = metric_scores([23.85, 23.89, 23.9], 12.2, "clip_score")
    lo, hi = metrics_figure(wide, ["clip_score"]).axes[0].get_ylim()
    assert lo < 23.85 - 12.2 and hi > 23.9 + 12.2


def test_metric_limits_keep_a_frechet_distance_nonnegative():
    from cogpipe.eval_report import metric_limits

    lo, hi = metric_limits("fd_videomae", np.array([1.0, 1.01, np.nan]))
    assert lo >= 0 and hi - lo >= 0.05 * 1.01 and lo <= 1.0 and hi >= 1.01


class Recorder(logging.Handler):
    """Every record the transformers loggers emit (they do not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    recorder = Recorder()
    logger = logging.getLogger("transformers")
    logger.addHandler(recorder)
    yield recorder.messages
    logger.removeHandler(recorder)


def test_counting_a_long_captions_tokens_warns_nothing(tiny_models, transformers_log):
    from transformers import AutoTokenizer

    from cogpipe.filter import token_counter

    caption = " ".join(["fighter"] * 300)
    cfg = PipelineConfig(model=str(tiny_models["cogvideox"]))
    count = token_counter(cfg)
    assert count(caption) > 226  # longer than the model reads
    assert not [m for m in transformers_log if "sequence length is longer" in m]
    # The same tokenizer called plainly does warn: the check above can fail.
    plain = AutoTokenizer.from_pretrained(cfg.model, subfolder="tokenizer")
    plain(caption)
    assert [m for m in transformers_log if "sequence length is longer" in m]


def test_loading_the_video_model_warns_nothing_about_torch_dtype(tiny_models):
    import torch

    from cogpipe.eval_models import load_pipeline
    from cogpipe.models import cogvideox

    model = str(tiny_models["cogvideox"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(model, "cpu")
        cogvideox.load_vae(model, "cpu", torch.float32)
        cogvideox.load_transformer(model, "cpu", torch.float32)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_demo_model_writing_is_quiet_and_restores_logging(transformers_log):
    from transformers.utils import logging as hf_logging

    from cogpipe.demo import quiet_model_writing

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_model_writing():
        hf_logging.get_logger("transformers.demo").warning("falling back to PIL")
        assert not hf_logging.is_progress_bar_enabled()
    assert transformers_log == []
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
