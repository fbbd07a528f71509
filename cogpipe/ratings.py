"""Human A/B ratings of checkpoints against the base model: storage and statistics.

A rater compares a checkpoint's video with the base model's video of the same prompt and
seed (`cogpipe rate CONFIG`, see `cogpipe.rate`) and answers four questions. Each
judgment is one row, appended as its own Parquet part file, written atomically:

    evaluate/ratings.parquet/part-20261122T101502123456-3f2a9c1b.parquet   one judgment each

so two raters at once never lose a rating and nothing is rewritten in place. The folder
is a Parquet dataset: `pd.read_parquet("evaluate/ratings.parquet")` reads it as well
(temporary `.tmp-*` files are ignored). Columns: rater, ekey, run, checkpoint,
prompt_index, prompt, seed, video, base_side ('left' | 'right': where the base model's
video was shown), one column per question holding 'checkpoint' | 'base' | 'tie' (which
model the rater preferred), rated_at (UTC timestamp).

The statistic is the checkpoint's win rate against the base, ties counted as half a win,
with a 95% Wilson score interval on it (n = every rating, ties included):

    table = win_rates(read_ratings(ws, ekey=ekey, run=run))
    print(ratings_markdown(table))
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from cogpipe.workspace import Workspace, atomic_path, read_parts, write_table

QUESTIONS = {  # column -> what the rater is asked
    "motion_accuracy": "Motion accuracy",
    "impact_realism": "Impact realism",
    "prompt_adherence": "Prompt adherence",
    "overall": "Overall",
}
ANSWERS = ("checkpoint", "base", "tie")  # as stored: which model won the question
COLUMNS = [
    "rater",
    "ekey",
    "run",
    "checkpoint",
    "prompt_index",
    "prompt",
    "seed",
    "video",
    "base_side",
    *QUESTIONS,
    "rated_at",
]
TABLE_COLUMNS = [
    "ekey",
    "run",
    "checkpoint",
    "question",
    "wins",
    "losses",
    "ties",
    "n",
    "win_rate",
    "ci_low",
    "ci_high",
    "raters",
]
Z95 = 1.959964  # standard normal quantile of a two-sided 95% interval


def ratings_dir(ws: Workspace) -> Path:
    """`evaluate/ratings.parquet/`: the dataset folder of one part file per judgment."""
    return ws.root / "evaluate" / "ratings.parquet"


def append_rating(ws: Workspace, row: dict[str, Any]) -> Path:
    """Commit one judgment as its own part file (written to a temporary name, renamed).

    Args:
        ws: the workspace.
        row: a value for every column of `COLUMNS` but `rated_at` (set here, UTC).

    Returns:
        The part file.

    Raises:
        ValueError: a column is missing or an answer is not checkpoint / base / tie.
    """
    missing = [c for c in COLUMNS if c != "rated_at" and c not in row]
    bad = {q: row[q] for q in QUESTIONS if q in row and row[q] not in ANSWERS}
    if missing or bad:
        raise ValueError(f"rating row: missing {missing}, bad answers {bad}")
    now = pd.Timestamp.now(tz="UTC")
    record = {c: row.get(c) for c in COLUMNS} | {"rated_at": now}
    path = ratings_dir(ws) / f"part-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    write_table(path, pd.DataFrame([record], columns=COLUMNS))
    return path


def read_ratings(ws: Workspace, ekey: str | None = None, run: str | None = None) -> pd.DataFrame:
    """Every committed judgment, oldest first; empty (with the columns) before the first.

    Args:
        ws: the workspace.
        ekey: keep only this eval key's ratings (None: all).
        run: keep only this run's ratings (None: all).

    Returns:
        One row per judgment, columns `COLUMNS`.
    """
    df = read_parts(ratings_dir(ws))
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    keep = pd.Series(True, index=df.index)
    if ekey is not None:
        keep &= df.ekey == ekey
    if run is not None:
        keep &= df.run == run
    return df[keep].sort_values("rated_at", kind="stable").reset_index(drop=True)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) for n = 0.

    `successes` may be fractional (ties as half a win): the interval is then the one of
    the proportion p = successes / n, which is conservative, as ties lower the variance.
    """
    if n == 0:
        return math.nan, math.nan
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per (ekey, run, checkpoint, question): the checkpoint's record against the base.

    Args:
        ratings: judgments as `read_ratings` returns them.

    Returns:
        Columns `TABLE_COLUMNS`: wins, losses, ties (counts), n (ratings), win_rate
        ((wins + ties / 2) / n), ci_low / ci_high (95% Wilson score interval of the win
        rate), raters (distinct rater names). Sorted by run, checkpoint, question order.
    """
    rows = []
    for (ekey, run, checkpoint), group in ratings.groupby(["ekey", "run", "checkpoint"]):
        for question in QUESTIONS:
            counts = group[question].value_counts()
            wins, losses, ties = (int(counts.get(a, 0)) for a in ANSWERS)
            n = wins + losses + ties
            low, high = wilson(wins + ties / 2, n)
            rows.append(
                {
                    "ekey": ekey,
                    "run": run,
                    "checkpoint": checkpoint,
                    "question": question,
                    "wins": wins,
                    "losses": losses,
                    "ties": ties,
                    "n": n,
                    "win_rate": (wins + ties / 2) / n if n else math.nan,
                    "ci_low": low,
                    "ci_high": high,
                    "raters": group.rater.nunique(),
                }
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def table_cells(r: Any) -> list[str]:
    """One row of `win_rates` as display cells (shared by the markdown and the web page)."""
    return [
        r.checkpoint,
        QUESTIONS.get(r.question, r.question),
        f"{r.win_rate:.2f}",
        f"{r.ci_low:.2f}–{r.ci_high:.2f}",
        f"{r.wins} / {r.losses} / {r.ties}",
        str(r.n),
        str(r.raters),
    ]


HEADER = ["checkpoint", "question", "win rate", "95% CI", "W / L / T", "ratings", "raters"]


def ratings_markdown(table: pd.DataFrame) -> str:
    """A markdown section of `win_rates`' table for an evaluation report.

    Args:
        table: `win_rates(...)`, usually of one run.

    Returns:
        A heading, the table (one row per checkpoint and question) and how to read it; a
        one-line note when there are no ratings.
    """
    lines = ["## Human A/B ratings against the base model", ""]
    if table.empty:
        return "\n".join(
            lines + ["No ratings yet: `cogpipe rate CONFIG` serves the rating page.", ""]
        )
    lines += ["| " + " | ".join(HEADER) + " |", "| --- | --- | ---: | --- | --- | ---: | ---: |"]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in table.itertuples(index=False)]
    lines += [
        "",
        "Win rate: the checkpoint preferred over the base model at the same prompt and "
        "seed, ties as half; W / L / T: wins, losses, ties; 95% CI: Wilson score interval; "
        "above 0.5 the checkpoint is better.",
        "",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- ratings -->", "<!-- /ratings -->"  # around the section in report.md


def ratings_section(ws: Workspace, ekey: str, run: str) -> str:
    """The run's ratings section for its evaluation report, between markers that
    `refresh_report` finds again."""
    table = win_rates(read_ratings(ws, ekey=ekey, run=run))
    return f"{BEGIN}\n{ratings_markdown(table)}{END}\n"


def report_lock(ws: Workspace, ekey: str, run: str):
    """The lock of a run's report.md: evaluation rewrites it whole, the rating page its
    ratings section (read, modify, rename); one at a time, so neither loses the other's."""
    return ws.hold(f"evaluate-{ekey}-{run}-report")


def refresh_report(ws: Workspace, ekey: str, run: str, report: Path) -> bool:
    """Rewrite the ratings section of an evaluation's report.md with every rating so far
    (atomically, under `report_lock`); False when there is no report or no section."""
    with report_lock(ws, ekey, run):
        try:
            text = report.read_text()
        except OSError:
            return False
        head, begin, rest = text.partition(BEGIN)
        _, end, tail = rest.partition(END)
        if not begin or not end:
            return False
        with atomic_path(report) as tmp:
            tmp.write_text(head + ratings_section(ws, ekey, run).rstrip("\n") + tail)
    return True
