from django.db.models.signals import post_save
from django.dispatch import Signal, receiver

# Sent after the transaction that revoked a key commits; the gateway drops it from its caches
# (and tells its other processes) so the key stops working everywhere within a second.
# Arguments: api_key_id, prefix.
api_key_revoked = Signal()


@receiver(post_save, sender="accounts.Organization", dispatch_uid="organization_default_project")
def organization_default_project(sender, instance, created, raw=False, **kwargs):
    """Every organization has a default project, however it was made (service, admin,
    factory): keys and deployments made without naming a project go there."""
    if created and not raw:
        from accounts.models import Project

        Project.objects.get_or_create(
            organization=instance, is_default=True, defaults={"name": Project.DEFAULT_NAME}
        )
