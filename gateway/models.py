from django.db import models


class UsageEvent(models.Model):
    """One request that reached a replica, with the tokens it used. Written by the gateway
    (group-committed before the response ends), read and ingested by billing.

    `request_id` is unique, so writing an event twice (a retried batch) or ingesting it twice
    never double-counts. The organization and key are foreign keys without database
    constraints, and the deployment and model version are plain ids: a usage record must
    outlive whatever it refers to (a deleted key still owes its tokens), and a batch insert
    must never fail because one row's key was deleted a moment before.

    Every row is written once and updated once (billing marks it ingested; the update cannot
    be HOT, since the partial index's predicate column changes), so each index costs on both
    writes. The table has only the indexes something reads: the primary key (billing takes
    its batches by id), the unique `request_id` (the gateway's ON CONFLICT), and the partial
    index of what billing has not ingested yet. Per-organization or per-deployment usage is
    read from billing's ledger, never from here.
    """

    class Source(models.TextChoices):
        UPSTREAM = "upstream", "Reported by the replica"
        COUNTED = "counted", "Counted by the gateway"

    # Unique by the constraint below: `unique=True` would add a varchar_pattern_ops index on
    # PostgreSQL, for LIKE queries nobody makes.
    request_id = models.CharField(max_length=128)
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="usage_events",
    )
    api_key = models.ForeignKey(
        "accounts.APIKey",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="usage_events",
    )
    deployment_id = models.UUIDField(null=True, blank=True)
    model_version_id = models.BigIntegerField(null=True, blank=True)
    deployment_type = models.CharField(max_length=16, blank=True)
    model = models.CharField(max_length=200, help_text="The model name as the caller sent it.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField()
    latency_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True)
    usage_source = models.CharField(max_length=16, choices=Source.choices)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ingested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="usage_request_id_unique"),
        ]
        indexes = [
            # Billing's ingestion scans only what it has not taken yet.
            models.Index(
                fields=["id"],
                condition=models.Q(ingested_at__isnull=True),
                name="usage_not_ingested_idx",
            ),
        ]

    def __str__(self):
        return f"{self.request_id} {self.model} {self.prompt_tokens}+{self.completion_tokens}"
