"""The demo's deployments (bootstrap_demo): the shared serverless pools for mixtral-tiny and
embed-tiny, and the demo organization's serverless entries to them, so the printed API key can
call `mixtral-tiny` and `embed-tiny`.

The chat pool keeps one replica (min_replicas 1): on a laptop the tiny model costs little, and the
demo's first request answers at once instead of waiting for a start from zero. The embedding
pool starts from zero (min_replicas 0): nothing runs for it until someone asks for a vector.
"""

from django.db import transaction

from accounts.actors import Actor
from catalog.models import HardwareProfile
from catalog.seeds import CPU_PROFILE
from deployments.models import Deployment
from deployments.services import deployment_create, serverless_pool_ensure

DEMO_POOL_MIN_REPLICAS = 1
DEMO_POOL_MAX_REPLICAS = 2
DEMO_EMBEDDING_POOL_MAX_REPLICAS = 1


@transaction.atomic
def ensure_demo_deployments(*, organization, tiny_version) -> tuple[Deployment, Deployment]:
    return _serverless(
        organization,
        tiny_version,
        min_replicas=DEMO_POOL_MIN_REPLICAS,
        max_replicas=DEMO_POOL_MAX_REPLICAS,
    )


@transaction.atomic
def ensure_demo_embeddings(*, organization, version) -> tuple[Deployment, Deployment]:
    return _serverless(
        organization, version, min_replicas=0, max_replicas=DEMO_EMBEDDING_POOL_MAX_REPLICAS
    )


def _serverless(organization, tiny_version, *, min_replicas, max_replicas):
    pool = serverless_pool_ensure(
        model_version=tiny_version,
        hardware_profile=HardwareProfile.objects.get(name=CPU_PROFILE),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
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
