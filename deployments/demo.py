"""The demo's deployments (bootstrap_demo): the shared serverless pool for mixtral-tiny, and the
demo organization's serverless entry to it, so the printed API key can call `mixtral-tiny`.

The pool keeps one replica (min_replicas 1): on a laptop the tiny model costs little, and the
demo's first request answers at once instead of waiting for a start from zero.
"""

from django.db import transaction

from accounts.actors import Actor
from catalog.models import HardwareProfile
from catalog.seeds import CPU_PROFILE
from deployments.models import Deployment
from deployments.services import deployment_create, serverless_pool_ensure

DEMO_POOL_MIN_REPLICAS = 1
DEMO_POOL_MAX_REPLICAS = 2


@transaction.atomic
def ensure_demo_deployments(*, organization, tiny_version) -> tuple[Deployment, Deployment]:
    pool = serverless_pool_ensure(
        model_version=tiny_version,
        hardware_profile=HardwareProfile.objects.get(name=CPU_PROFILE),
        min_replicas=DEMO_POOL_MIN_REPLICAS,
        max_replicas=DEMO_POOL_MAX_REPLICAS,
    )
    slug = tiny_version.model.slug
    entry = (
        Deployment.objects.filter(organization=organization, name=slug)
        .exclude(status=Deployment.Status.DELETED)
        .first()
    )
    if entry is None:
        entry = deployment_create(
            actor=Actor.system(organization),
            name=slug,
            model=slug,
            version=tiny_version.version,
            type=Deployment.Type.SERVERLESS,
        )
    return pool, entry
