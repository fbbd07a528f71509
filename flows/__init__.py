"""Prefect flows that compose the stage tasks. Installed as `cogpipe_flows` (folder `flows/`)."""
