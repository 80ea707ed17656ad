"""The engine: one run of one target, in stages a reader can hold.

- ``state.py``  what the stages share: options, hooks, a job's chunk, RunState (and stop)
- ``scan.py``   keyset pages -> rendered, measured, de-duplicated rows -> batches
- ``embed.py``  keys, shared rate limits, concurrency, retries, bisection, answer checks
- ``write.py``  guarded bulk UPDATEs on writer connections; rows the app holds locked
- ``tally.py``  every row accounted for once: report, chunks, metrics, audit trail
- ``run.py``    ``_Run``, the stages wired by queues: a dry run or a worker's session

The CLI, the HTTP service and workers call the application layer
(``embedfill.application``), not this package; its functions that lived here
(``abackfill``, ``astatus``, ...) are still importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .run import _Run
from .state import BackfillOptions, Chunk, Observer, ProgressCallback, WorkerSeat, _Hooks

if TYPE_CHECKING:
    from ..application import _prepare, abackfill, adefer_index_plan, astatus

_APPLICATION = ("_prepare", "abackfill", "adefer_index_plan", "astatus")


def __getattr__(name: str) -> Any:
    """The application's functions, on first use: the application imports the engine."""
    if name in _APPLICATION:
        from .. import application

        return getattr(application, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackfillOptions",
    "Chunk",
    "Observer",
    "ProgressCallback",
    "WorkerSeat",
    "_Hooks",
    "_Run",
    "_prepare",
    "abackfill",
    "adefer_index_plan",
    "astatus",
]
