from django.core.management.base import BaseCommand

from catalog.seeds import ensure_catalog_seeds
from catalog.tiny import ensure_tiny_embedding, ensure_tiny_moe
from controlplane.demo import DEMO_EMAIL, ensure_demo_organization
from deployments.demo import ensure_demo_deployments, ensure_demo_embeddings


class Command(BaseCommand):
    help = (
        "Create (or bring up to date) the demo: organization `demo`, its owner "
        f"{DEMO_EMAIL}, the catalog seeds, the tiny MoE and the tiny embedding model. Safe to "
        "run any number of times."
    )

    def handle(self, *args, **options):
        organization, user, password = ensure_demo_organization()
        self.stdout.write(f"Organization: {organization.slug}")
        if password:
            self.stdout.write(f"Login: {user.email} / {password}")
        else:
            self.stdout.write(f"Login: {user.email} (password unchanged)")
        seeded = ensure_catalog_seeds()
        tiny = ensure_tiny_moe()
        embedding = ensure_tiny_embedding()
        self.stdout.write(
            f"Catalog: {len(seeded) + 2} models; {tiny} and {embedding} served by the builtin "
            f"runtime from {tiny.artifact_uri} and {embedding.artifact_uri}"
        )
        pool, entry = ensure_demo_deployments(organization=organization, tiny_version=tiny)
        self.stdout.write(
            f"Serverless: the platform pool {pool.name} ({pool.min_replicas}-"
            f"{pool.max_replicas} replicas, {pool.status}); {organization.slug} calls it as "
            f"model {entry.name!r}"
        )
        pool, entry = ensure_demo_embeddings(organization=organization, version=embedding)
        self.stdout.write(
            f"Embeddings: the platform pool {pool.name} (from zero, at most {pool.max_replicas} "
            f"replica); {organization.slug} calls it as model {entry.name!r}"
        )
