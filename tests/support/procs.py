"""The processes a command starts, as /proc shows them (Linux)."""

from __future__ import annotations

from pathlib import Path


def worker_children(pid: int) -> set[int]:
    """This process's `embedfill worker --job` children (started by any of its threads).
    Not every child: importing procrastinate imports croniter, whose is_32bit() calls
    platform.architecture(), which runs `file -b <python>` in a subprocess. That
    short-lived child of any command that touches the job queue (a dry run included) is
    no worker, and a poll saw it about one run in three."""
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:
            continue
        for child in pids:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone already
            if b"worker" in argv and b"--job" in argv:
                found.add(int(child))
    return found


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
