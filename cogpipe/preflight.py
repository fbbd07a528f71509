"""What `cogpipe run` checks at load, before any server or model starts: everything that
can be known without running a stage. Each failure is one ConfigError naming the field."""

from __future__ import annotations

from cogpipe.config import PipelineConfig


def preflight(cfg: PipelineConfig, until: str = "evaluate") -> None:
    """Raise ConfigError naming the first config field that cannot work for stages up to
    `until`."""
