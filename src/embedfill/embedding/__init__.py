"""Calling a provider as embedfill does: keys, shared limits, concurrency, retries, the
probe and answer checks, one client for a run and for ``verify`` (client.py)."""

from .client import PROBE_TEXT, Client, Stopped, Tally

__all__ = ["PROBE_TEXT", "Client", "Stopped", "Tally"]
