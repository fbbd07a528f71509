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


def table(results: list[StageResult]) -> str:
    """A fixed-width table: one line per stage with its key, state, time and counts."""
    lines = [f"{'stage':<11} {'key':<12} {'state':<9} {'seconds':>8}  counts"]
    for r in results:
        state = "reused" if r.reused else "computed"
        counts = ", ".join(f"{k}={v}" for k, v in r.counts.items())
        lines.append(f"{r.stage:<11} {r.key:<12} {state:<9} {r.seconds:>8.1f}  {counts}")
        for reason, n in r.stats.get("rejections", {}).items():
            lines.append(f"{'':<11} {'':<12} {'':<9} {'':>8}    rejected {n}: {reason}")
    return "\n".join(lines)


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
