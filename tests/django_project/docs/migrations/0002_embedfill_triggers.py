from django.db import migrations

from embedfill.contrib.django.operations import InstallEmbedfillTriggers


class Migration(migrations.Migration):
    dependencies = [("docs", "0001_initial")]
    operations = [InstallEmbedfillTriggers(target="documents")]
