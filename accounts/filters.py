import django_filters

from accounts.models import APIKey, AuditLogEntry, Membership
from accounts.roles import Role
from controlplane.rest.filters import StrictBooleanFilter


class MembershipFilter(django_filters.FilterSet):
    role = django_filters.ChoiceFilter(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["role"]


class APIKeyFilter(django_filters.FilterSet):
    revoked = StrictBooleanFilter(field_name="revoked_at", lookup_expr="isnull", exclude=True)
    scope = django_filters.ChoiceFilter(choices=APIKey.Scope.choices, method="filter_scope")

    class Meta:
        model = APIKey
        fields = ["revoked", "scope"]

    def filter_scope(self, queryset, name, value):
        # JSON containment is not on SQLite; scopes are a short list, so match the quoted name.
        return queryset.filter(scopes__icontains=f'"{value}"')


class AuditLogFilter(django_filters.FilterSet):
    action = django_filters.CharFilter()
    target_type = django_filters.CharFilter()
    since = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditLogEntry
        fields = ["action", "target_type", "since", "until"]
