from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect
from django.utils.cache import add_never_cache_headers

from accounts import selectors, services
from accounts.roles import Permission
from console.forms import APIKeyCreateForm
from console.views.base import ConsoleView, apply_domain_error
from controlplane.errors import DomainError

PAGE_SIZE = 50


# The new secret waits here between the POST and the page that shows it (post/redirect/get, so
# a reload cannot create a second key); that page takes it out, so it is shown exactly once.
NEW_SECRET_SESSION_KEY = "console.new_api_key"  # noqa: S105 - a session key name


class APIKeyListView(ConsoleView):
    """Keys of the organization, and the form that makes one."""

    section = "api-keys"
    required_permissions = {"GET": Permission.API_KEYS_READ, "POST": Permission.API_KEYS_WRITE}

    def get(self, request):
        created = request.session.pop(NEW_SECRET_SESSION_KEY, None)
        if created and created["organization_id"] == request.actor.organization.pk:
            response = self.show(APIKeyCreateForm(), created=created)
            add_never_cache_headers(response)  # nor may "back" bring the secret up again
            return response
        return self.show(APIKeyCreateForm())

    def post(self, request):
        form = APIKeyCreateForm(request.POST)
        if form.is_valid():
            try:
                key, secret = services.api_key_create(actor=request.actor, **form.cleaned_data)
            except DomainError as error:
                apply_domain_error(form, error)
            else:
                request.session[NEW_SECRET_SESSION_KEY] = {
                    "organization_id": key.organization_id,
                    "name": key.name,
                    "secret": secret,
                }
                return redirect("console:api-keys")
        return self.show(form, status=400)

    def show(self, form, *, created=None, status=200):
        keys = selectors.api_key_list(organization=self.request.actor.organization)
        page = Paginator(keys, PAGE_SIZE).get_page(self.request.GET.get("page"))
        return self.render(
            "console/keys/list.html",
            {"form": form, "page": page, "created": created},
            status=status,
        )


class APIKeyRevokeView(ConsoleView):
    section = "api-keys"
    required_permissions = {"POST": Permission.API_KEYS_WRITE}

    def post(self, request, pk):
        key = get_object_or_404(
            selectors.api_key_list(organization=request.actor.organization), pk=pk
        )
        services.api_key_revoke(actor=request.actor, api_key=key)
        messages.success(
            request, f"Revoked {key.name} ({key.display_prefix}…). It stops working now."
        )
        return redirect("console:api-keys")
