from django.db import migrations

IMMUTABLE_TABLES = ("billing_usagerecord", "billing_dedicatedusagerecord", "billing_invoiceline")


def create_triggers(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return  # the models refuse updates and deletes on every database; this adds the database
    schema_editor.execute(
        "CREATE OR REPLACE FUNCTION billing_refuse_change() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME; END $$ LANGUAGE plpgsql",
        params=None,  # the % is PL/pgSQL's, not a query parameter
    )
    for table in IMMUTABLE_TABLES:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION billing_refuse_change()"
        )


def drop_triggers(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in IMMUTABLE_TABLES:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
    schema_editor.execute("DROP FUNCTION IF EXISTS billing_refuse_change()")


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
