"""Deployments: what a customer asked for (desired spec, with a generation number) and what the
cluster answered (observed status, conditions, progress, events, replicas, GPU time).

A deployment's `name` is also the `model` name its organization passes to the gateway.
"""

import uuid

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

# RFC 1035 label (what a Kubernetes Service name must be), kept short enough that the pod names
# Kubernetes derives from it (name-<replicaset hash>-<suffix>) stay within 63 characters.
NAME_MAX_LENGTH = 40
dns_name_validator = RegexValidator(
    r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$",
    f"Use 1-{NAME_MAX_LENGTH} lowercase letters, digits or hyphens, starting with a letter and "
    "ending with a letter or digit (it becomes a DNS name and the model name you call).",
)


class RoutingPolicy(models.TextChoices):
    # The replica most likely to hold the request's prompt prefix in its KV cache, within a
    # load bound; else the least loaded. With one replica both are the same.
    PREFIX_AWARE = "prefix_aware", "Prefix-aware"
    LEAST_IN_FLIGHT = "least_in_flight", "Least in flight"


class Deployment(models.Model):
    class Type(models.TextChoices):
        DEDICATED = "dedicated", "Dedicated (own replicas, billed per GPU-second)"
        SERVERLESS = "serverless", "Serverless (shared pool, billed per token)"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROVISIONING = "provisioning", "Provisioning"
        READY = "ready", "Ready"
        SCALING = "scaling", "Scaling"
        UPDATING = "updating", "Updating"
        FAILED = "failed", "Failed"
        DELETING = "deleting", "Deleting"
        DELETED = "deleted", "Deleted"

    class Phase(models.TextChoices):
        NONE = "", "—"
        SCHEDULING = "scheduling", "Scheduling"
        PULLING_IMAGE = "pulling_image", "Pulling image"
        LOADING_WEIGHTS = "loading_weights", "Loading weights"
        READY = "ready", "Ready"

    # Statuses in which the deployment (still) holds or may hold cluster resources.
    LIVE_STATUSES = (
        Status.PENDING,
        Status.PROVISIONING,
        Status.READY,
        Status.SCALING,
        Status.UPDATING,
        Status.FAILED,
    )

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="deployments"
    )
    # The project that owns it (its dedicated time is attributed there). A shared deployment
    # may be called by every project of the organization; one that is not, only by its own.
    # Filled with the default project by save(); null only for a row the previous release
    # wrote during the upgrade (read as the default project's; NOT NULL a release later).
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.PROTECT, related_name="deployments", null=True
    )
    shared = models.BooleanField(
        default=True, help_text="Callable by the organization's other projects too."
    )
    name = models.CharField(max_length=NAME_MAX_LENGTH, validators=[dns_name_validator])
    model_version = models.ForeignKey(
        "catalog.ModelVersion", on_delete=models.PROTECT, related_name="deployments"
    )
    type = models.CharField(max_length=16, choices=Type.choices, default=Type.DEDICATED)
    hardware_profile = models.ForeignKey(
        "catalog.HardwareProfile",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="deployments",
        help_text="Empty for serverless deployments: the pool's profile applies.",
    )
    serving_runtime = models.ForeignKey(
        "catalog.ServingRuntime",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="deployments",
        help_text="Empty means the model version's runtime.",
    )
    # The shared platform pool a serverless deployment sends its requests to.
    pool = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="members"
    )

    # Desired spec. `generation` increases with every change to it.
    min_replicas = models.PositiveIntegerField(default=1)
    max_replicas = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    desired_replicas = models.PositiveIntegerField(default=1)
    target_in_flight_per_replica = models.PositiveIntegerField(
        default=8,
        validators=[MinValueValidator(1)],
        help_text="Autoscaling target: in-flight requests per replica.",
    )
    scale_to_zero_after_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Idle time before scaling to zero; empty means never."
    )
    routing_policy = models.CharField(
        max_length=16,
        choices=RoutingPolicy.choices,
        default=RoutingPolicy.PREFIX_AWARE,
        help_text="How the gateway picks a ready replica for a request (gateway/routing.py).",
    )
    generation = models.PositiveBigIntegerField(default=1)

    # Observed status.
    observed_generation = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    status_reason = models.TextField(blank=True)
    conditions = models.JSONField(default=list, blank=True)
    progress_phase = models.CharField(
        max_length=16, choices=Phase.choices, default=Phase.NONE, blank=True
    )
    progress_percent = models.PositiveSmallIntegerField(default=0)
    ready_replicas = models.PositiveIntegerField(default=0)

    # Bookkeeping of the reconciler and the autoscaler.
    reconcile_failures = models.PositiveIntegerField(
        default=0, help_text="Transient errors in a row; drives the retry backoff."
    )
    last_reconciled_at = models.DateTimeField(null=True, blank=True)
    # One reconcile at a time per deployment, across worker processes: a pass takes the lease
    # with a conditional UPDATE; a killed worker's lease simply runs out.
    lease_token = models.CharField(max_length=32, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # When the pass chain's next pass is due (None: converged, nothing queued). A chain that
    # misses it by a few seconds was broken by a killed worker; the stalled check resumes it.
    next_reconcile_at = models.DateTimeField(null=True, blank=True)
    last_scaled_at = models.DateTimeField(null=True, blank=True)
    scale_up_requested_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "name"]
        constraints = [
            # A name is free again only once the old deployment is fully torn down: its cluster
            # objects carry the name, so a new one must not be applied over them meanwhile.
            models.UniqueConstraint(
                fields=["organization", "name"],
                condition=~Q(status="deleted"),
                name="deployment_name_unique_in_organization",
            ),
            models.CheckConstraint(
                condition=Q(min_replicas__lte=models.F("max_replicas")),
                name="deployment_min_replicas_lte_max",
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "name"]),
            models.Index(fields=["status"]),
        ]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        if self.project_id is None and self.organization_id is not None:
            from accounts.models import default_project_id

            self.project_id = default_project_id(self.organization_id)
        super().save(*args, **kwargs)

    @property
    def is_converged(self) -> bool:
        return self.observed_generation >= self.generation

    @property
    def is_partner_entry(self) -> bool:
        """A serverless entry of a partner-hosted model: its provider serves it, so it has no
        pool and no replicas and provisions nothing."""
        return self.type == self.Type.SERVERLESS and self.model_version.is_partner


class Replica(models.Model):
    """One running copy of the model server: a pod (kubernetes) or a process (local)."""

    class Phase(models.TextChoices):
        SCHEDULING = "scheduling", "Scheduling"
        PULLING_IMAGE = "pulling_image", "Pulling image"
        LOADING_WEIGHTS = "loading_weights", "Loading weights"
        READY = "ready", "Ready"
        CRASHED = "crashed", "Crashed"
        TERMINATING = "terminating", "Terminating"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="replicas")
    name = models.CharField(max_length=253)
    endpoint = models.CharField(max_length=255, blank=True, help_text="Base URL of the server.")
    ready = models.BooleanField(default=False)
    phase = models.CharField(max_length=16, choices=Phase.choices, default=Phase.SCHEDULING)
    message = models.TextField(blank=True)
    restart_count = models.PositiveIntegerField(default=0)
    # Fingerprint of the pod template / process command this replica runs: during a rolling
    # update it tells the old replicas from the new ones.
    revision = models.CharField(max_length=64, blank=True)
    # Local provisioner only: the runtime process and its port.
    pid = models.PositiveIntegerField(null=True, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    next_restart_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "name"], name="replica_name_unique")
        ]

    def __str__(self):
        return self.name


class DeploymentEvent(models.Model):
    class Type(models.TextChoices):
        NORMAL = "Normal", "Normal"
        WARNING = "Warning", "Warning"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    time = models.DateTimeField(default=timezone.now)
    type = models.CharField(max_length=8, choices=Type.choices, default=Type.NORMAL)
    reason = models.CharField(max_length=64)
    message = models.TextField()

    class Meta:
        ordering = ["-time", "-id"]
        indexes = [models.Index(fields=["deployment", "-time"])]

    def __str__(self):
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.reason}: {self.message}"


class ReplicaUsage(models.Model):
    """GPU time of one dedicated replica: billing reads replica-seconds from these rows.

    A row is one run of the replica's model server, with the provisioner's own timestamps: it
    opens when the server started (the local process's start time; the server container's
    `startedAt`) and closes when it stopped (the process's exit; the container's `finishedAt`;
    the pod's removal or node loss as observed). A restart is a gap between two rows, and the
    rows of one replica never overlap (billing_reconcile checks it). It records the model
    version the replica runs, which is not always the deployment's: during a rolling update the
    old replicas keep running (and are billed as) the previous version.
    """

    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="usage")
    model_version = models.ForeignKey(
        "catalog.ModelVersion", on_delete=models.PROTECT, related_name="replica_usage"
    )
    hardware_profile = models.ForeignKey(
        "catalog.HardwareProfile", on_delete=models.PROTECT, related_name="replica_usage"
    )
    replica_name = models.CharField(max_length=253)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["started_at", "id"]
        constraints = [
            # One open row per replica: reconciling twice never double-counts.
            models.UniqueConstraint(
                fields=["deployment", "replica_name"],
                condition=Q(ended_at__isnull=True),
                name="replica_usage_one_open_row_per_replica",
            )
        ]
        indexes = [
            models.Index(fields=["deployment", "started_at"]),
            models.Index(fields=["ended_at"]),
        ]

    def __str__(self):
        return f"{self.replica_name} {self.started_at:%Y-%m-%d %H:%M:%S} to {self.ended_at or '…'}"

    def seconds(self, *, until=None) -> float:
        end = self.ended_at or until or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds())


class LoadReport(models.Model):
    """What one gateway process last said about a deployment's load; the autoscaler sums these."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.CASCADE, related_name="load_reports"
    )
    source = models.CharField(max_length=200, help_text="Which gateway process reported.")
    in_flight = models.FloatField(help_text="Requests in flight when the report was made.")
    in_flight_average = models.FloatField(
        help_text="Exponential moving average of in_flight over this source's reports."
    )
    requests = models.PositiveBigIntegerField(
        default=0, help_text="Requests the source counted in its last report window."
    )
    last_request_at = models.DateTimeField(null=True, blank=True)
    reported_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "source"], name="load_report_one_per_source"
            )
        ]

    def __str__(self):
        return f"{self.deployment_id} from {self.source}: {self.in_flight} in flight"


class Fallback(models.Model):
    """One of a deployment's fallback targets, in order: another deployment of the same
    organization (self-hosted, serverless, or a partner model's entry) the gateway sends a
    request to when the deployment's own upstream fails before the first byte (gateway/
    fallback.py). Validated by deployments.services (same organization, callable, no cycles,
    at most DEPLOYMENTS_MAX_FALLBACKS)."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="fallbacks")
    target = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="fallback_for")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["deployment", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "position"], name="fallback_position_unique"
            ),
            models.UniqueConstraint(fields=["deployment", "target"], name="fallback_target_unique"),
            models.CheckConstraint(
                condition=~Q(deployment=models.F("target")), name="fallback_not_itself"
            ),
        ]

    def __str__(self):
        return f"{self.deployment_id} → {self.target_id} (#{self.position})"


class UpstreamCircuit(models.Model):
    """What one gateway process last said about the circuit breaker of an upstream a
    deployment's requests go to (a replica's endpoint, or a provider connection): the state
    changes a gateway reports, as it reports unhealthy replicas. Breakers are per gateway
    process (gateway/circuit.py), so each process has its own row; the deployment page shows
    them. Rows are replaced, never accumulated (one per deployment, upstream and source)."""

    class State(models.TextChoices):
        CLOSED = "closed", "Closed"
        OPEN = "open", "Open"
        HALF_OPEN = "half_open", "Half-open"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="circuits")
    upstream = models.CharField(
        max_length=255, help_text="A replica's endpoint, or provider:<connection name>."
    )
    source = models.CharField(max_length=200, help_text="Which gateway process reported.")
    state = models.CharField(max_length=16, choices=State.choices)
    failures = models.PositiveIntegerField(default=0)
    changed_at = models.DateTimeField()

    class Meta:
        ordering = ["upstream", "source"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "upstream", "source"], name="upstream_circuit_one_per_source"
            )
        ]

    def __str__(self):
        return f"{self.upstream} from {self.source}: {self.state}"
