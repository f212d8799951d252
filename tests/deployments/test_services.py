"""Deployment services: what customers ask for, and every way to ask wrongly."""

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.actors import Actor
from accounts.models import AuditLogEntry
from accounts.roles import Role
from controlplane.errors import Conflict, PermissionDenied, QuotaExceeded, ValidationFailed
from deployments import services
from deployments.models import Deployment, LoadReport
from tests.catalog.factories import (
    CpuProfileFactory,
    DedicatedPriceFactory,
    HardwareProfileFactory,
    ModelFactory,
    ModelVersionFactory,
)
from tests.deployments.factories import (
    DeploymentFactory,
    LoadReportFactory,
    ServerlessPoolFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def priced_version():
    version = ModelVersionFactory(model=ModelFactory(slug="mixtral-8x7b", moe=True), version="0.1")
    profile = HardwareProfileFactory(name="h100-80gb-x2", gpu_count=2)
    DedicatedPriceFactory(model_version=version, hardware_profile=profile)
    return version, profile


def create(organization, **fields):
    defaults = {"name": "chat", "model": "mixtral-8x7b", "hardware_profile": "h100-80gb-x2"}
    return services.deployment_create(actor=Actor.system(organization), **{**defaults, **fields})


def test_create_records_the_desired_spec_an_event_and_an_audit_entry(organization, priced_version):
    version, profile = priced_version
    deployment = create(organization, min_replicas=1, max_replicas=2)
    assert deployment.status == Deployment.Status.PENDING
    assert deployment.model_version == version
    assert deployment.hardware_profile == profile
    assert deployment.serving_runtime == version.serving_runtime
    assert (deployment.desired_replicas, deployment.generation) == (1, 1)
    assert deployment.events.get().reason == "Created"
    assert AuditLogEntry.objects.filter(action="deployment.create").count() == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "no-such-model"}, "Unknown model 'no-such-model'"),
        ({"hardware_profile": "tpu-v9"}, "Unknown hardware profile 'tpu-v9'"),
        ({"name": "Chat_Bot"}, "lowercase letters"),
        ({"name": "9lives"}, "starting with a letter"),
        ({"name": "x" * 41}, "1-40"),
        ({"version": "9.9"}, "no published version '9.9'"),
        ({"min_replicas": 3, "max_replicas": 2}, "cannot exceed max_replicas"),
        ({"scale_to_zero_after_seconds": 5}, "at least 60"),
        ({"type": "spot"}, "Unknown type 'spot'"),
        ({"hardware_profile": None}, "needs a hardware_profile"),
    ],
)
def test_bad_input_says_what_to_fix(organization, priced_version, fields, message):
    with pytest.raises(ValidationFailed, match=message):
        create(organization, **fields)
    assert not Deployment.objects.exists()


def test_an_incompatible_profile_repeats_the_catalogs_reason(organization, priced_version):
    CpuProfileFactory(name="cpu-small")
    with pytest.raises(ValidationFailed) as error:
        create(organization, hardware_profile="cpu-small")
    assert "does not fit cpu-small" in error.value.message
    assert "runtime needs GPUs" in error.value.message
    assert error.value.field == "hardware_profile"


def test_a_profile_without_a_price_cannot_be_deployed(organization, priced_version):
    HardwareProfileFactory(name="a100-80gb", gpu_count=2)
    with pytest.raises(ValidationFailed, match="no dedicated price on a100-80gb"):
        create(organization, hardware_profile="a100-80gb")


def test_gpu_quota_says_which_quota_and_the_numbers(organization, priced_version):
    organization.max_gpus = 8
    organization.save()
    create(organization, name="first", min_replicas=1, max_replicas=3)  # 6 GPUs
    with pytest.raises(QuotaExceeded) as error:
        create(organization, name="second", min_replicas=1, max_replicas=2)
    assert error.value.message.startswith(
        "max_gpus: this deployment needs 4 GPUs (2 replicas × 2 NVIDIA H100 80GB); "
        "your organization uses 6 of 8."
    )
    assert error.value.status_code == 409


def test_deployment_count_quota(organization, priced_version):
    organization.max_deployments = 1
    organization.save()
    create(organization, name="first")
    with pytest.raises(QuotaExceeded, match="max_deployments: your organization has 1 of 1"):
        create(organization, name="second")


def test_a_name_is_unique_in_the_organization_until_the_old_one_is_gone(
    organization, other_organization, priced_version
):
    first = create(organization)
    with pytest.raises(Conflict, match="already has a deployment named 'chat'"):
        create(organization)
    create(other_organization)  # another tenant may use the same name
    Deployment.objects.filter(pk=first.pk).update(status=Deployment.Status.DELETING)
    with pytest.raises(Conflict):
        create(organization)
    Deployment.objects.filter(pk=first.pk).update(status=Deployment.Status.DELETED)
    assert create(organization).pk != first.pk


def test_viewers_cannot_deploy(organization, priced_version):
    viewer = Actor(organization=organization, role=Role.VIEWER)
    with pytest.raises(PermissionDenied):
        services.deployment_create(
            actor=viewer, name="chat", model="mixtral-8x7b", hardware_profile="h100-80gb-x2"
        )


def test_serverless_points_at_the_platform_pool(organization):
    pool = ServerlessPoolFactory(model_version__model__slug="mixtral-tiny")
    deployment = create(
        organization, name="tiny", model="mixtral-tiny", type="serverless", hardware_profile=None
    )
    assert deployment.pool == pool
    assert deployment.hardware_profile is None
    assert deployment.desired_replicas == 0


def test_serverless_needs_a_pool(organization, priced_version):
    with pytest.raises(ValidationFailed, match="is not offered serverless"):
        create(organization, type="serverless", hardware_profile=None)


def test_scaling_bumps_the_generation_and_a_new_version_rolls_out(organization, priced_version):
    version, profile = priced_version
    deployment = DeploymentFactory(
        organization=organization, model_version=version, hardware_profile=profile
    )
    actor = Actor.system(organization)
    scaled = services.deployment_update(
        actor=actor, deployment=deployment, min_replicas=2, max_replicas=3
    )
    assert (scaled.status, scaled.desired_replicas, scaled.generation) == ("scaling", 2, 2)

    newer = ModelVersionFactory(model=version.model, version="0.2")
    DedicatedPriceFactory(model_version=newer, hardware_profile=profile)
    updated = services.deployment_update(actor=actor, deployment=scaled, version="0.2")
    assert (updated.status, updated.model_version, updated.generation) == ("updating", newer, 3)
    assert "version 0.1 → 0.2" in updated.events.first().message


def test_update_rejects_unknown_fields_and_checks_quota(organization, priced_version):
    version, profile = priced_version
    deployment = DeploymentFactory(
        organization=organization, model_version=version, hardware_profile=profile
    )
    actor = Actor.system(organization)
    with pytest.raises(ValidationFailed, match="name cannot be changed"):
        services.deployment_update(actor=actor, deployment=deployment, name="other")
    with pytest.raises(QuotaExceeded, match="needs 10 GPUs"):
        services.deployment_update(actor=actor, deployment=deployment, max_replicas=5)


def test_delete_is_idempotent_and_keeps_pools_with_members(organization, priced_version):
    deployment = create(organization)
    actor = Actor.system(organization)
    services.deployment_delete(actor=actor, deployment=deployment)
    deleted = services.deployment_delete(actor=actor, deployment=deployment)
    assert (deleted.status, deleted.desired_replicas) == ("deleting", 0)
    assert deleted.events.filter(reason="Deleting").count() == 1

    pool = ServerlessPoolFactory()
    from tests.deployments.factories import ServerlessDeploymentFactory

    ServerlessDeploymentFactory(pool=pool)
    with pytest.raises(Conflict, match="still use this pool"):
        services.deployment_delete(actor=Actor.system(pool.organization), deployment=pool)


def test_scale_up_from_zero_is_idempotent(organization):
    deployment = DeploymentFactory(
        organization=organization, min_replicas=0, max_replicas=2, desired_replicas=0
    )
    services.deployment_request_scale_up(deployment_id=deployment.pk)
    services.deployment_request_scale_up(deployment_id=deployment.pk)
    deployment.refresh_from_db()
    assert (deployment.desired_replicas, deployment.generation, deployment.status) == (
        1,
        2,
        "scaling",
    )
    assert deployment.events.filter(reason="ScaledUpFromZero").count() == 1


def test_scale_up_of_a_serverless_entry_scales_its_pool(organization):
    from tests.deployments.factories import ServerlessDeploymentFactory

    entry = ServerlessDeploymentFactory(organization=organization, pool__desired_replicas=0)
    services.deployment_request_scale_up(deployment_id=entry.pk)
    entry.pool.refresh_from_db()
    assert entry.pool.desired_replicas == 1


def test_load_reports_keep_a_moving_average_per_source(organization):
    deployment = DeploymentFactory(organization=organization)
    services.load_report(
        deployment_id=deployment.pk, source="gw-1", in_flight=10, requests=5, last_request_at=None
    )
    report = LoadReport.objects.get()
    assert (report.in_flight, report.in_flight_average) == (10, 10)
    LoadReport.objects.filter(pk=report.pk).update(
        reported_at=timezone.now() - timedelta(seconds=30)
    )
    now = timezone.now()
    services.load_report(
        deployment_id=deployment.pk, source="gw-1", in_flight=0, requests=0, last_request_at=now
    )
    report.refresh_from_db()
    # One time constant later the average has moved ~63% of the way to the new value.
    assert report.in_flight == 0
    assert 3.0 < report.in_flight_average < 4.5
    assert report.last_request_at == now
    LoadReportFactory(deployment=deployment, source="gw-2", in_flight=4)
    assert LoadReport.objects.filter(deployment=deployment).count() == 2
