"""factory_boy factories for deployments. Other apps' tests (gateway, billing, console) use them.

`DeploymentFactory()` is a ready dedicated deployment with a priced GPU profile and no replicas;
`ReplicaFactory(deployment=d)` adds a ready replica with an endpoint; `ServerlessPoolFactory()` is
the platform organization's shared pool; `ServerlessDeploymentFactory(organization=o)` is an
organization's serverless entry pointing at a pool of the same model version.
"""

from datetime import timedelta

import factory
from django.utils import timezone

from accounts.models import Organization
from deployments.models import Deployment, DeploymentEvent, LoadReport, Replica, ReplicaUsage
from deployments.selectors import PLATFORM_ORGANIZATION_SLUG
from tests.catalog.factories import (
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelVersionFactory,
    TokenPriceFactory,
)
from tests.factories import OrganizationFactory


class DeploymentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Deployment
        skip_postgeneration_save = True

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"deployment-{n}")
    model_version = factory.SubFactory(ModelVersionFactory)
    type = Deployment.Type.DEDICATED
    hardware_profile = factory.SubFactory(HardwareProfileFactory)
    serving_runtime = factory.LazyAttribute(lambda d: d.model_version.serving_runtime)
    min_replicas = 1
    max_replicas = 1
    desired_replicas = 1
    status = Deployment.Status.READY
    generation = 1
    observed_generation = factory.LazyAttribute(
        lambda d: d.generation if d.status == Deployment.Status.READY else 0
    )
    progress_phase = factory.LazyAttribute(
        lambda d: Deployment.Phase.READY if d.status == Deployment.Status.READY else ""
    )
    progress_percent = factory.LazyAttribute(
        lambda d: 100 if d.status == Deployment.Status.READY else 0
    )

    @factory.post_generation
    def priced(self, create, extracted, **kwargs):
        """A dedicated price for the version on the profile (pass priced=False to skip)."""
        if create and extracted is not False and self.hardware_profile_id:
            DedicatedPriceFactory(
                model_version=self.model_version, hardware_profile=self.hardware_profile
            )


def platform_organization() -> Organization:
    organization, _ = Organization.objects.get_or_create(
        slug=PLATFORM_ORGANIZATION_SLUG, defaults={"name": "Sirocco platform"}
    )
    return organization


class ServerlessPoolFactory(DeploymentFactory):
    """The platform's shared pool for a model version (with a per-token price)."""

    organization = factory.LazyFunction(platform_organization)
    name = factory.Sequence(lambda n: f"pool-{n}")
    type = Deployment.Type.SERVERLESS
    min_replicas = 0
    max_replicas = 2

    @factory.post_generation
    def priced(self, create, extracted, **kwargs):
        if create and extracted is not False:
            TokenPriceFactory(model_version=self.model_version)


class ServerlessDeploymentFactory(DeploymentFactory):
    """An organization's serverless entry: no replicas of its own, its pool serves it."""

    type = Deployment.Type.SERVERLESS
    pool = factory.SubFactory(ServerlessPoolFactory)
    model_version = factory.LazyAttribute(lambda d: d.pool.model_version)
    hardware_profile = None
    min_replicas = 0
    max_replicas = 1
    desired_replicas = 0

    @factory.post_generation
    def priced(self, create, extracted, **kwargs):
        return None  # the pool's token price applies


class ReplicaFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Replica

    deployment = factory.SubFactory(DeploymentFactory)
    name = factory.Sequence(lambda n: f"replica-{n}")
    endpoint = factory.Sequence(lambda n: f"http://127.0.0.1:{20000 + n % 40000}")
    ready = True
    phase = Replica.Phase.READY
    started_at = factory.LazyFunction(lambda: timezone.now() - timedelta(minutes=5))
    last_seen_at = factory.LazyFunction(timezone.now)


class DeploymentEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DeploymentEvent

    deployment = factory.SubFactory(DeploymentFactory)
    reason = "Created"
    message = "Someone asked for it."


class ReplicaUsageFactory(factory.django.DjangoModelFactory):
    """One hour of GPU time of a dedicated replica (pass ended_at=None for a running one)."""

    class Meta:
        model = ReplicaUsage

    deployment = factory.SubFactory(DeploymentFactory)
    model_version = factory.LazyAttribute(lambda u: u.deployment.model_version)
    hardware_profile = factory.LazyAttribute(lambda u: u.deployment.hardware_profile)
    replica_name = factory.Sequence(lambda n: f"replica-{n}")
    started_at = factory.LazyFunction(lambda: timezone.now() - timedelta(hours=2))
    ended_at = factory.LazyAttribute(lambda u: u.started_at + timedelta(hours=1))


class LoadReportFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LoadReport

    deployment = factory.SubFactory(DeploymentFactory)
    source = factory.Sequence(lambda n: f"gateway-{n}")
    in_flight = 0.0
    in_flight_average = factory.LazyAttribute(lambda r: r.in_flight)
    requests = 0
    last_request_at = None
    reported_at = factory.LazyFunction(timezone.now)
