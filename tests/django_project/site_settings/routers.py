class DocsOnDefault:
    """The docs app lives on the default database only."""

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        if app_label == "docs":
            return db == "default"
        return None
