"""The engine: one run of one target, in stages a reader can hold.

- ``state.py``  what the stages share: options, hooks, a job's chunk, RunState (and stop)
- ``scan.py``   keyset pages -> rendered, measured, de-duplicated rows -> batches
- ``embed.py``  keys, shared rate limits, concurrency, retries, bisection, answer checks
- ``write.py``  guarded bulk UPDATEs on writer connections; rows the app holds locked
- ``tally.py``  every row accounted for once: report, chunks, metrics, audit trail
- ``run.py``    ``Run``, the stages wired by queues: a dry run or a worker's session
- ``prepare.py`` a run's start: options and the target checked against the live table

The CLI, the HTTP service and workers call the application layer
(``embedfill.application``), not this package.
"""

from __future__ import annotations

from .prepare import prepare
from .run import Run
from .state import BackfillOptions, Chunk, Hooks, Observer, ProgressCallback, WorkerSeat

__all__ = [
    "BackfillOptions",
    "Chunk",
    "Hooks",
    "Observer",
    "ProgressCallback",
    "Run",
    "WorkerSeat",
    "prepare",
]
