class DocsOnDefault:
    """The apps with vectors live on the default database only."""

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        if app_label in ("docs", "shapes"):
            return db == "default"
        return None
