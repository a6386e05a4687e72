"""Sandbox backends: where a sandbox's files live and how its processes are started."""
