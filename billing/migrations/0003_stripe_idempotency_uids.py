import uuid

from django.db import migrations, models


def fill(apps, schema_editor):
    for name in ("BillingAccount", "Invoice"):
        model = apps.get_model("billing", name)
        for row in model.objects.filter(uid__isnull=True).only("pk"):
            model.objects.filter(pk=row.pk).update(uid=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_ledger_immutable_in_postgresql")]

    operations = [
        migrations.AddField("billingaccount", "uid", models.UUIDField(null=True, editable=False)),
        migrations.AddField("invoice", "uid", models.UUIDField(null=True, editable=False)),
        migrations.RunPython(fill, migrations.RunPython.noop),
        migrations.AlterField(
            "billingaccount",
            "uid",
            models.UUIDField(default=uuid.uuid4, unique=True, editable=False),
        ),
        migrations.AlterField(
            "invoice", "uid", models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
        ),
    ]
