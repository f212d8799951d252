"""UsageEvent now belongs to the metering app (metering migration 0001 takes it over). Only
Django's state changes: the table, its rows and its indexes stay as they are."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0002_only_the_indexes_something_reads"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="UsageEvent")],
            database_operations=[],
        ),
    ]
