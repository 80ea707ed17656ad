"""A data migration that fills the embeddings it needs: non-atomic, because embedfill
writes on its own connection, in batches, and must see the rows committed before it."""

from django.db import migrations

import embedfill
from embedfill.contrib import django as embedfill_django


def fill(apps, schema_editor):
    Organisation = apps.get_model("docs", "Organisation")
    Document = apps.get_model("docs", "Document")
    org = Organisation.objects.create(name="seeded")
    Document.objects.create(organisation=org, title="Welcome", body="seeded by a migration")
    embedfill.backfill(
        embedfill_django.config(apps),  # the models as this migration sees them
        target="documents",
        database=embedfill_django.database(schema_editor.connection.alias),
    )


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("docs", "0002_embedfill_triggers")]
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
