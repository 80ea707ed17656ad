"""The admin HTTP service: ``create_app(config)`` or ``admin_router`` to mount."""

from .app import admin_router, admin_secret, create_app
from .service import AdminService

__all__ = ["AdminService", "admin_router", "admin_secret", "create_app"]
