"""The engine: one run of one target, in stages a reader can hold.

- ``state.py``  what the stages share: options, hooks, a job's chunk, RunState (and stop)
- ``scan.py``   ``Scanner``: keyset pages -> rendered, measured, de-duplicated rows -> batches
- ``embed.py``  ``Embedder``: keys, shared limits, concurrency, retries, bisection, checks
- ``write.py``  ``Writer``: guarded bulk UPDATEs on writer lanes; rows the app holds locked
- ``tally.py``  ``Ledger``: every row accounted for once: report, chunks, metrics, audit
- ``run.py``    ``Run``, the stage objects wired by queues: a worker's session of a job
- ``plan.py``   ``Planner``, a dry run: the scanner and the ledger alone

Each stage is an object given the run's ``RunState`` and the ledger it reports to;
none inherits another or holds a reference to the ``Run``.
- ``prepare.py`` a run's start: options and the target checked against the live table

The CLI, the HTTP service and workers call the application layer
(``embedfill.application``), not this package.
"""

from __future__ import annotations

from .plan import Planner
from .prepare import prepare
from .run import Run
from .state import (
    BackfillOptions,
    Chunk,
    Hooks,
    Observer,
    ProgressCallback,
    RunState,
    WorkerSeat,
)

__all__ = [
    "BackfillOptions",
    "Chunk",
    "Hooks",
    "Observer",
    "Planner",
    "ProgressCallback",
    "Run",
    "RunState",
    "WorkerSeat",
    "prepare",
]
