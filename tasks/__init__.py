"""Prefect tasks: one module per stage, each a thin `@task` around `cogpipe.pipeline.run_stage`.

Installed as `cogpipe_tasks` (the folder is `tasks/`), so it cannot clash with another
distribution's generic `tasks` package.
"""
