"""The admin HTTP service: ``create_app(config)`` or ``admin_router`` to mount.

Its names load on first use, so that ``embedfill.http.metrics`` (a worker's own
``/metrics``) needs no FastAPI: the service itself is the ``server`` extra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import admin_router, admin_secret, create_app
    from .service import AdminService

__all__ = ["AdminService", "admin_router", "admin_secret", "create_app"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..extras import require

    require("server")
    from . import app, service

    return getattr(service if name == "AdminService" else app, name)
