"""Human-readable summaries of stage results: CLI tables, Prefect table and markdown artifacts."""

from __future__ import annotations

from cogpipe.workspace import StageResult


def stage_rows(result: StageResult) -> list[dict]:
    """One row per count, then one per rejection reason (for a Prefect table artifact)."""
    rows = [{"what": name, "count": value} for name, value in result.counts.items()]
    rejections = result.stats.get("rejections", {})
    rows += [{"what": f"rejected: {reason}", "count": n} for reason, n in rejections.items()]
    return rows


def stage_markdown(result: StageResult) -> str:
    verb = "reused" if result.reused else f"computed in {result.seconds:.1f} s"
    lines = [f"# {result.stage} `{result.key}`", "", f"{verb}; output `{result.path}`", ""]
    lines += ["| what | count |", "| --- | ---: |"]
    lines += [f"| {r['what']} | {r['count']} |" for r in stage_rows(result)]
    return "\n".join(lines) + "\n"


def table(results: list[StageResult], width: int | None = None) -> str:
    """The CLI's summary: one row per stage with its key, state, time and counts, then a
    row per rejection reason (`render`)."""
    rows = []
    for r in results:
        state = "reused" if r.reused else "computed"
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items())
        rows.append([r.stage, r.key, state, f"{r.seconds:.1f}", counts])
        rows += [
            ["", "", "", "", f"rejected {n}: {reason}"]
            for reason, n in r.stats.get("rejections", {}).items()
        ]
    return render(
        ["stage", "key", "state", "seconds", "counts"], rows, width, right=frozenset({"seconds"})
    )


def render(
    columns: list[str],
    rows: list[list[str]],
    width: int | None = None,
    right: frozenset[str] = frozenset(),
) -> str:
    """A plain-text table drawn by rich, at most `width` columns (a long cell wraps); by
    default the terminal's width on a terminal, else as wide as its content, so a log's
    lines are never broken."""
    import io
    import shutil
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table

    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in columns:
        grid.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        grid.add_row(*row)
    if width is None:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 1000
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, markup=False).print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def pipeline_markdown(results: list[StageResult], where: dict[str, str] | None = None) -> str:
    """The pipeline run's own report: one row per stage (key, computed or reused, seconds,
    counts, and where it ran when `where` names it)."""
    where = where or {}
    lines = ["# cogpipe pipeline", "", "| stage | key | state | seconds | ran on | counts |"]
    lines.append("| --- | --- | --- | ---: | --- | --- |")
    for r in results:
        state = "reused" if r.reused else "computed"
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items())
        lines.append(
            f"| {r.stage} | `{r.key}` | {state} | {r.seconds:.1f} | {where.get(r.stage, 'here')} | {counts} |"
        )
    return "\n".join(lines) + "\n"
