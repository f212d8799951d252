"""Usage events, owned here so that the gateway (which writes them) and billing (which ingests
them) both depend on this app and not on each other."""

from django.db import models


class UsageEvent(models.Model):
    """One request that reached a replica, with the tokens it used. Written by the gateway
    (group-committed before the response ends), read and ingested by billing, which marks
    `ingested_at`: this table is billing's inbox, and nothing else writes to it.

    `request_id` is minted by the gateway (128 random bits) and unique, so writing an event twice
    (a retried batch) or ingesting it twice never double-counts, and since no client chooses it,
    no client can merge its requests into one row or suppress another tenant's. What a client
    sends as `X-Client-Request-Id` / `X-Request-ID` is kept in `client_request_id`, a correlation
    field that is never unique: ten requests with one client id are ten rows.

    The organization and key are foreign keys without database constraints, and the deployment,
    model version and provider connection are plain ids: a usage record must outlive whatever
    it refers to (a deleted key still owes its tokens), and a batch insert must never fail
    because one row's key was deleted a moment before.

    Every row is written once and updated once (billing marks it ingested; the update cannot
    be HOT, since the partial index's predicate column changes), so each index costs on both
    writes. The table has only the indexes something reads: the primary key (billing takes
    its batches by id), the unique `request_id` (the gateway's ON CONFLICT), the partial index
    of what billing has not ingested yet, and the partial index of (organization, client id)
    for a tenant looking up its own correlation id, which only rows that carry one pay for.
    Per-organization or per-deployment usage is read from billing's ledger, never from here.

    The table keeps the name it had when the gateway owned the model (`gateway_usageevent`):
    moving the model (metering migration 0001) moved no data.
    """

    class Source(models.TextChoices):
        UPSTREAM = "upstream", "Reported by the replica"
        # The stream was cut (client gone, replica broke, idle timeout) after the replica had
        # reported usage on its chunks: the last figure it reported is billed.
        UPSTREAM_PARTIAL = "upstream_partial", "Last figure the replica reported before a cut"
        COUNTED = "counted", "Counted by the gateway"

    # Unique by the constraint below: `unique=True` would add a varchar_pattern_ops index on
    # PostgreSQL, for LIKE queries nobody makes.
    request_id = models.CharField(max_length=128)
    # Null when the client sent none: a nullable column is added without copying the table on
    # SQLite, and the partial index below skips it.
    client_request_id = models.CharField(
        max_length=128,
        null=True,
        blank=True,
        help_text="The client's X-Client-Request-Id or X-Request-ID (correlation only).",
    )
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
    # The caller's project (its key's), for attribution; a plain id like the deployment's.
    project_id = models.BigIntegerField(null=True, blank=True)
    # OpenAI's `user` field and the request's `metadata` tags, bounded by the gateway
    # (gateway/attribution.py); null when the request carried none.
    end_user = models.CharField(max_length=256, null=True, blank=True)
    tags = models.JSONField(null=True, blank=True)
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
    # The provider connection that served a partner-hosted model's request (a plain id, like
    # the deployment's: the connection may be deleted, its cost recorded on the ledger stays);
    # None for our own replicas. Billing records the provider's cost per connection from it.
    provider_connection_id = models.BigIntegerField(null=True, blank=True)
    # When a fallback target served the request (gateway/fallback.py): the deployment the caller
    # named, whose upstream failed before the first byte. `deployment_id`, `model_version_id`,
    # `deployment_type` and `provider_connection_id` are then the target's, so the request is
    # rated at the target's price. None when the named deployment served it.
    fallback_from_deployment_id = models.UUIDField(null=True, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ingested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "gateway_usageevent"
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
            # A tenant finding its requests by its own correlation id.
            models.Index(
                fields=["organization", "client_request_id"],
                condition=models.Q(client_request_id__isnull=False),
                name="usage_client_request_id_idx",
            ),
        ]

    def __str__(self):
        return f"{self.request_id} {self.model} {self.prompt_tokens}+{self.completion_tokens}"


class UsageTag(models.Model):
    """A `metadata` tag (key and value) an organization's requests have carried. The gateway
    registers a pair the first time it sees it and refuses a request whose new pairs would
    take the organization past its cardinality bound (GATEWAY_TAG_VALUES_PER_ORGANIZATION), so
    that grouping usage by tag stays a bounded report."""

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="usage_tags"
    )
    key = models.CharField(max_length=64)
    value = models.CharField(max_length=512)
    first_seen_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "key", "value"], name="usage_tag_unique"
            )
        ]

    def __str__(self):
        return f"{self.organization_id} {self.key}={self.value}"
