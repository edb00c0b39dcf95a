"""Launchers: the pipeline plan and its executors (local processes, Kubernetes)."""
