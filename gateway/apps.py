from django.apps import AppConfig


class GatewayConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "gateway"

    def ready(self):
        from accounts.signals import api_key_revoked
        from gateway.revocation import on_api_key_revoked

        api_key_revoked.connect(on_api_key_revoked, dispatch_uid="gateway-drop-revoked-key")
