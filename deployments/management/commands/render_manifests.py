"""`manage.py render_manifests`: the Kubernetes objects a deployment would get, as YAML.

Touches neither the database nor a cluster: the model, runtime and hardware profile come from
the catalog's seeds (catalog/seeds.py), built into unsaved objects and passed through the same
code the reconciler uses (build_spec, then the manifest renderer).
"""

import sys
import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization
from catalog import seeds
from catalog.fit import fit
from catalog.models import HardwareProfile, Model, ModelVersion, ServingRuntime
from deployments.models import Deployment
from deployments.provisioners import PermanentError
from deployments.provisioners.manifests import ClusterOptions, render_all, to_yaml
from deployments.reconciler import build_spec


class Command(BaseCommand):
    help = (
        "Print the multi-document YAML of the Kubernetes objects for a deployment of a seeded "
        "catalog model on a hardware profile (no database, no cluster)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="organization slug")
        parser.add_argument("--model", required=True, help="catalog model slug")
        parser.add_argument("--profile", required=True, help="hardware profile name")
        parser.add_argument("--name", required=True, help="deployment name")
        parser.add_argument("--replicas", type=int, default=1)
        parser.add_argument(
            "--max-gpus", type=int, default=8, help="the organization's GPU quota (default 8)"
        )
        parser.add_argument(
            "--weights-uri",
            default="",
            help="s3:// folder of the weights (default: under ARTIFACT_STORE_URL, or "
            "s3://sirocco-artifacts when that is not S3)",
        )

    def handle(self, *args, org, model, profile, name, replicas, max_gpus, weights_uri, **_):
        model_seed = next((m for m in seeds.MODELS if m["slug"] == model), None)
        if model_seed is None:
            known = ", ".join(m["slug"] for m in seeds.MODELS)
            raise CommandError(f"Unknown model {model!r}. Seeded models: {known}.")
        profile_seed = next((p for p in seeds.HARDWARE_PROFILES if p["name"] == profile), None)
        if profile_seed is None:
            known = ", ".join(p["name"] for p in seeds.HARDWARE_PROFILES)
            raise CommandError(f"Unknown hardware profile {profile!r}. Seeded profiles: {known}.")
        runtime = ServingRuntime(**next(r for r in seeds.RUNTIMES if r["name"] == "vllm"))
        catalog_model = Model(
            **{k: v for k, v in model_seed.items() if k not in ("version", "token_price")}
        )
        version = ModelVersion(
            model=catalog_model,
            serving_runtime=runtime,
            dtype=ModelVersion.Dtype.BFLOAT16,
            served_model_name=catalog_model.slug,
            **model_seed["version"],
        )
        # Until imported, a version's size is its parameters in bf16 (as the catalog assumes).
        version.size_bytes = catalog_model.total_parameters * 2
        hardware = HardwareProfile(**profile_seed)
        verdict = fit(version=version, profile=hardware)
        if not verdict.fits:
            raise CommandError(f"{model} does not fit {profile}: {verdict.reason}.")
        version.artifact_uri = weights_uri or self._default_weights_uri(version)
        deployment = Deployment(
            # A stable id, so that rendering twice prints the same YAML.
            id=uuid.uuid5(uuid.NAMESPACE_URL, f"sirocco:{org}/{name}"),
            organization=Organization(slug=org, name=org, max_gpus=max_gpus),
            name=name,
            model_version=version,
            hardware_profile=hardware,
            serving_runtime=runtime,
            desired_replicas=replicas,
            max_replicas=max(replicas, 1),
        )
        try:
            # Field checks only: uniqueness would need the database.
            deployment.clean_fields(
                exclude=[
                    "organization",
                    "project",
                    "model_version",
                    "hardware_profile",
                    "serving_runtime",
                ]
            )
        except ValidationError as error:
            raise CommandError(f"Invalid deployment: {'; '.join(error.messages)}") from error
        spec = build_spec(deployment, headroom=hardware.gpu_count)
        try:
            objects = render_all(spec, ClusterOptions.from_settings())
        except PermanentError as error:
            raise CommandError(error.message) from error
        self.stdout.write(to_yaml(objects), ending="")

    def _default_weights_uri(self, version: ModelVersion) -> str:
        store = settings.ARTIFACT_STORE_URL
        base = store.rstrip("/") if store.startswith("s3://") else "s3://sirocco-artifacts"
        if not store.startswith("s3://"):
            sys.stderr.write(
                f"note: ARTIFACT_STORE_URL is not S3; the weights are assumed under {base} "
                "(pass --weights-uri to choose)\n"
            )
        return f"{base}/models/{version.model.slug}/{version.version}"
