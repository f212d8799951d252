"""Provisioners make deployments real: `local` (processes on this machine) or `kubernetes`.

SIROCCO_PROVISIONER chooses; `get_provisioner()` builds one per process and configuration.
"""

from deployments.provisioners.base import (
    DeploymentSpec,
    Observation,
    ObservedReplica,
    PermanentError,
    ProfileSpec,
    Provisioner,
    ProvisionerError,
    RuntimeSpec,
    TransientError,
)

__all__ = [
    "DeploymentSpec",
    "Observation",
    "ObservedReplica",
    "PermanentError",
    "ProfileSpec",
    "Provisioner",
    "ProvisionerError",
    "RuntimeSpec",
    "TransientError",
    "get_provisioner",
]

_provisioners: dict[tuple, Provisioner] = {}


def get_provisioner() -> Provisioner:
    from django.conf import settings

    name = settings.SIROCCO_PROVISIONER
    key = (
        name,
        settings.SIROCCO_KUBECONFIG,
        settings.SIROCCO_KUBE_CONTEXT,
        str(settings.VAR_DIR),
    )
    provisioner = _provisioners.get(key)
    if provisioner is None:
        if name == "local":
            from deployments.provisioners.local import LocalProvisioner

            provisioner = LocalProvisioner(
                settings.VAR_DIR / "replicas", base_dir=settings.BASE_DIR
            )
        elif name == "kubernetes":
            from deployments.provisioners.kubernetes import (
                KubeClient,
                KubernetesProvisioner,
                api_client_from_settings,
            )
            from deployments.provisioners.manifests import ClusterOptions

            provisioner = KubernetesProvisioner(
                KubeClient(
                    api_client_from_settings(), timeout=settings.SIROCCO_K8S_REQUEST_TIMEOUT
                ),
                ClusterOptions.from_settings(),
            )
        else:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"SIROCCO_PROVISIONER is {name!r}; use 'local' or 'kubernetes'."
            )
        if not settings.CELERY_TASK_ALWAYS_EAGER:
            # A change the provisioner learns of by itself gets a pass at once. (Eager runs,
            # the tests', drive their passes themselves.)
            from deployments.tasks import replica_changed

            provisioner.on_change = replica_changed
        _provisioners[key] = provisioner
    return provisioner
