from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from controlplane.rest.serializers import StrictSerializer
from deployments.models import (
    NAME_MAX_LENGTH,
    Deployment,
    DeploymentEvent,
    Replica,
    RoutingPolicy,
    UpstreamCircuit,
    dns_name_validator,
)


class ReplicaSerializer(serializers.ModelSerializer):
    """A replica as its tenant sees it: name, state and age. Its endpoint (a pod address in
    the cluster, a local port) is the platform's business, not the tenant's: it is only for
    platform operators (`OperatorReplicaSerializer`)."""

    class Meta:
        model = Replica
        fields = ["name", "ready", "phase", "message", "restart_count", "started_at"]
        read_only_fields = fields


class OperatorReplicaSerializer(ReplicaSerializer):
    class Meta(ReplicaSerializer.Meta):
        fields = [*ReplicaSerializer.Meta.fields, "endpoint"]
        read_only_fields = fields


def is_platform_operator(request) -> bool:
    """Staff of the platform, signed in to the console (API keys belong to tenants)."""
    user = getattr(request, "user", None)
    return bool(user is not None and getattr(user, "is_staff", False) and user.is_authenticated)


class ProgressSerializer(serializers.Serializer):
    phase = serializers.CharField(help_text="scheduling, pulling_image, loading_weights, ready")
    percent = serializers.IntegerField()


class FallbackSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The target deployment (the model name you call).")
    model = serializers.CharField(help_text="Its catalog model slug.")
    status = serializers.CharField(help_text="Its status; only callable targets are tried.")


class CircuitSerializer(serializers.ModelSerializer):
    """A circuit breaker of one of the deployment's upstreams, as one gateway process last
    reported it. Upstreams are named without addresses: `replica <name>` or `provider`."""

    upstream = serializers.SerializerMethodField()

    class Meta:
        model = UpstreamCircuit
        fields = ["upstream", "source", "state", "failures", "changed_at"]
        read_only_fields = fields

    def get_upstream(self, circuit) -> str:
        return circuit_label(circuit, self.context.get("replica_names", {}))


def circuit_label(circuit, replica_names: dict) -> str:
    """A tenant-facing name of an upstream: its replica's name, or its provider (endpoints
    and connection names are the platform's business)."""
    if circuit.upstream.startswith("provider:"):
        return "provider"
    return f"replica {replica_names.get(circuit.upstream, '(gone)')}"


class DeploymentSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_version.model.slug", read_only=True)
    version = serializers.CharField(source="model_version.version", read_only=True)
    served_model_name = serializers.CharField(
        source="model_version.served_model_name", read_only=True
    )
    hardware_profile = serializers.SerializerMethodField()
    runtime = serializers.CharField(source="serving_runtime.name", read_only=True, default=None)
    progress = serializers.SerializerMethodField()
    replicas = serializers.SerializerMethodField()
    fallbacks = serializers.SerializerMethodField()
    circuits = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = [
            "id",
            "name",
            "model",
            "version",
            "served_model_name",
            "type",
            "project",
            "shared",
            "hardware_profile",
            "runtime",
            "min_replicas",
            "max_replicas",
            "desired_replicas",
            "ready_replicas",
            "target_in_flight_per_replica",
            "scale_to_zero_after_seconds",
            "routing_policy",
            "fallbacks",
            "circuits",
            "generation",
            "observed_generation",
            "status",
            "status_reason",
            "conditions",
            "progress",
            "replicas",
            "created_at",
            "updated_at",
            "deleted_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_hardware_profile(self, deployment):
        profile = deployment.pool.hardware_profile if deployment.pool_id else None
        profile = profile or deployment.hardware_profile
        return profile.name if profile else None

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, deployment):
        return {"phase": deployment.progress_phase, "percent": deployment.progress_percent}

    @extend_schema_field(FallbackSerializer(many=True))
    def get_fallbacks(self, deployment):
        return [
            {
                "name": fallback.target.name,
                "model": fallback.target.model_version.model.slug,
                "status": fallback.target.status,
            }
            for fallback in deployment.fallbacks.all()  # prefetched by deployment_list
        ]

    @extend_schema_field(CircuitSerializer(many=True))
    def get_circuits(self, deployment):
        names = {replica.endpoint: replica.name for replica in deployment.replicas.all()}
        return CircuitSerializer(
            deployment.circuits.all(), many=True, context={"replica_names": names}
        ).data

    @extend_schema_field(ReplicaSerializer(many=True))
    def get_replicas(self, deployment):
        # A serverless deployment's replicas are the platform's shared pool: not shown.
        if deployment.pool_id:
            return []
        serializer = (
            OperatorReplicaSerializer
            if is_platform_operator(self.context.get("request"))
            else ReplicaSerializer
        )
        return serializer(deployment.replicas.all(), many=True).data


class DeploymentCreateSerializer(StrictSerializer):
    name = serializers.CharField(
        max_length=NAME_MAX_LENGTH,
        validators=[dns_name_validator],
        help_text="DNS-safe and unique in your organization: the `model` name you call.",
    )
    model = serializers.CharField(max_length=100, help_text="A catalog model slug.")
    version = serializers.CharField(
        max_length=50, required=False, help_text="Default: the newest published version."
    )
    type = serializers.ChoiceField(choices=Deployment.Type.choices, default="dedicated")
    hardware_profile = serializers.CharField(
        max_length=64, required=False, help_text="Required for dedicated deployments."
    )
    project = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="The owning project's id (its dedicated time is attributed there); "
        "default: the organization's default project.",
    )
    shared = serializers.BooleanField(
        default=True,
        help_text="Callable by the organization's other projects too; false: only by the "
        "owning project's keys.",
    )
    min_replicas = serializers.IntegerField(min_value=0, default=1)
    max_replicas = serializers.IntegerField(min_value=1, required=False)
    target_in_flight_per_replica = serializers.IntegerField(min_value=1, default=8)
    scale_to_zero_after_seconds = serializers.IntegerField(
        min_value=60, required=False, allow_null=True
    )
    routing_policy = serializers.ChoiceField(
        choices=RoutingPolicy.choices,
        default=RoutingPolicy.PREFIX_AWARE,
        help_text="prefix_aware: the replica likely to hold the prompt's prefix in its cache, "
        "within a load bound; least_in_flight: the least loaded replica.",
    )
    fallbacks = serializers.ListField(
        child=serializers.CharField(max_length=NAME_MAX_LENGTH),
        required=False,
        help_text="Other deployments of your organization (or partner models you enabled), by "
        "name, tried in order when this deployment's upstream refuses the connection, answers "
        "429 or 5xx, or sends nothing before the first-byte timeout; never once the answer has "
        "started. At most DEPLOYMENTS_MAX_FALLBACKS (3 by default), no cycles.",
    )


class DeploymentUpdateSerializer(StrictSerializer):
    version = serializers.CharField(
        max_length=50, required=False, help_text="A new version rolls out replica by replica."
    )
    hardware_profile = serializers.CharField(max_length=64, required=False)
    min_replicas = serializers.IntegerField(min_value=0, required=False)
    max_replicas = serializers.IntegerField(min_value=1, required=False)
    target_in_flight_per_replica = serializers.IntegerField(min_value=1, required=False)
    scale_to_zero_after_seconds = serializers.IntegerField(
        min_value=60, required=False, allow_null=True
    )
    routing_policy = serializers.ChoiceField(choices=RoutingPolicy.choices, required=False)
    fallbacks = serializers.ListField(
        child=serializers.CharField(max_length=NAME_MAX_LENGTH),
        required=False,
        help_text="Other deployments of your organization (or partner models you enabled), by "
        "name, tried in order (replacing the list; [] for none) when this deployment's upstream refuses the connection, answers "
        "429 or 5xx, or sends nothing before the first-byte timeout; never once the answer has "
        "started. At most DEPLOYMENTS_MAX_FALLBACKS (3 by default), no cycles.",
    )


class DeploymentEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeploymentEvent
        fields = ["time", "type", "reason", "message"]
        read_only_fields = fields
