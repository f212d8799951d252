"""UsageEvent, taken over from the gateway app with its table (`gateway_usageevent`) as it is:
no data moves. The model's state is created here as gateway migration 0002 left it; the
content type (and so the permissions that name it) is renamed to this app."""

import django.db.models.deletion
from django.db import migrations, models


def rename_content_type(apps, schema_editor, *, old, new):
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if not ContentType.objects.using(db).filter(app_label=new, model="usageevent").exists():
        ContentType.objects.using(db).filter(app_label=old, model="usageevent").update(
            app_label=new
        )


def forwards(apps, schema_editor):
    rename_content_type(apps, schema_editor, old="gateway", new="metering")


def backwards(apps, schema_editor):
    rename_content_type(apps, schema_editor, old="metering", new="gateway")


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("accounts", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("gateway", "0003_usage_event_moves_to_metering"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="UsageEvent",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True,
                                primary_key=True,
                                serialize=False,
                                verbose_name="ID",
                            ),
                        ),
                        ("request_id", models.CharField(max_length=128)),
                        (
                            "organization",
                            models.ForeignKey(
                                db_constraint=False,
                                db_index=False,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="usage_events",
                                to="accounts.organization",
                            ),
                        ),
                        (
                            "api_key",
                            models.ForeignKey(
                                blank=True,
                                db_constraint=False,
                                db_index=False,
                                null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="usage_events",
                                to="accounts.apikey",
                            ),
                        ),
                        ("deployment_id", models.UUIDField(blank=True, null=True)),
                        ("model_version_id", models.BigIntegerField(blank=True, null=True)),
                        ("deployment_type", models.CharField(blank=True, max_length=16)),
                        (
                            "model",
                            models.CharField(
                                help_text="The model name as the caller sent it.",
                                max_length=200,
                            ),
                        ),
                        ("prompt_tokens", models.PositiveIntegerField(default=0)),
                        ("completion_tokens", models.PositiveIntegerField(default=0)),
                        ("cached_tokens", models.PositiveIntegerField(default=0)),
                        ("status_code", models.PositiveSmallIntegerField()),
                        ("latency_ms", models.FloatField()),
                        ("ttft_ms", models.FloatField(blank=True, null=True)),
                        (
                            "usage_source",
                            models.CharField(
                                choices=[
                                    ("upstream", "Reported by the replica"),
                                    ("counted", "Counted by the gateway"),
                                ],
                                max_length=16,
                            ),
                        ),
                        ("started_at", models.DateTimeField()),
                        ("finished_at", models.DateTimeField()),
                        ("ingested_at", models.DateTimeField(blank=True, null=True)),
                    ],
                    options={
                        "db_table": "gateway_usageevent",
                        "ordering": ["-started_at", "-id"],
                        "indexes": [
                            models.Index(
                                condition=models.Q(("ingested_at__isnull", True)),
                                fields=["id"],
                                name="usage_not_ingested_idx",
                            )
                        ],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("request_id",), name="usage_request_id_unique"
                            )
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(forwards, backwards, elidable=True),
    ]
