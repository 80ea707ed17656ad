"""Run by ``manage.py test`` (tests/e2e/test_django.py): embedfill against the test
database Django creates, migrates (the triggers' operation, the data migration) and
drops."""

from django.db import connection
from django.test import TransactionTestCase

import embedfill
from embedfill.contrib import django as embedfill_django

from .models import Document, Organisation


class EmbedfillInTests(TransactionTestCase):
    def test_backfill_fills_the_test_database(self) -> None:
        db = embedfill_django.database()
        self.assertIn(connection.settings_dict["NAME"], db.url)
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))
        org = Organisation.objects.create(name="acme")
        Document.objects.create(organisation=org, title="One", body="first")
        Document.objects.create(organisation=org, title="Two", body="second")
        report = embedfill.backfill(embedfill_django.config(), target="documents", database=db)
        self.assertEqual(report.embedded, 2)
        self.assertFalse(Document.objects.filter(embedding__isnull=True).exists())

    def test_the_triggers_queue_new_rows(self) -> None:
        org = Organisation.objects.create(name="acme")
        doc = Document.objects.create(organisation=org, title="Queued", body="by the trigger")
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM embedfill.changes WHERE row_key = %s", [str(doc.pk)])
            self.assertEqual(cur.fetchone()[0], 1)
