"""A later change of the model's table: the migrations before it (the triggers'
operation, the data migration) must still see the table as it was then."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("docs", "0003_fill_embeddings")]
    operations = [migrations.AlterModelTable(name="document", table="docs_documents")]
