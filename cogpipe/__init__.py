"""cogpipe: a folder of videos in, a CogVideoX LoRA and checkpoint evaluations out.

The library is plain Python: every stage is `run_<stage>(workspace, config, upstream)`
in its own module. Prefect wraps it in `cogpipe_tasks` / `cogpipe_flows`.
"""

__version__ = "0.1.0"
