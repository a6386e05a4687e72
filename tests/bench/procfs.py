"""What the benchmark reads about the daemon process from /proc (Linux only, no psutil)."""

from __future__ import annotations

import os
from pathlib import Path

_MB = 1024  # /proc/<pid>/status counts kB


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident set size now (VmRSS), in MiB."""
    return _status(pid, "VmRSS") / _MB


def peak_mb(pid: int) -> float:
    """Peak resident set size since the start or the last `reset_peak` (VmHWM), in MiB."""
    return _status(pid, "VmHWM") / _MB


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (`5` into clear_refs); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (/proc/<pid>/stat, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> int:
    return _status(pid, "Threads")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def descendants(pid: int) -> int:
    """How many processes descend from `pid` (children, grandchildren...)."""
    return len(descendant_pids(pid))


def descendant_pids(pid: int) -> list[int]:
    """The processes that descend from `pid` (children, grandchildren...)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        try:
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
        except OSError:  # the process ended meanwhile
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the thread ended meanwhile
                continue
            found += children
            todo.extend(children)
    return found
