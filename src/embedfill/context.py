"""What the log lines of a job carry, whichever process or task writes them."""

from __future__ import annotations

import contextvars

#: the job (run id) the current task works for; the JSON log formatter adds it
job_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("job_id", default=None)
