"""The registry of an organization's usage tags (metering.UsageTag), written by the gateway
(gateway/attribution.py) in a DB thread."""

from django.db import transaction

from accounts.models import Organization
from metering.models import UsageTag


@transaction.atomic
def usage_tags_register(
    *, organization_id: int, pairs: list[tuple[str, str]], max_keys: int, max_values: int
) -> str | None:
    """Register the pairs the organization has not used yet, unless they would take it past
    `max_keys` distinct keys or `max_values` distinct pairs. Returns None when they are all
    registered, else why not (the request is refused). The organization's row is locked, so
    concurrent gateways never admit past a bound together."""
    list(Organization.objects.select_for_update().filter(pk=organization_id).values_list("pk"))
    tags = UsageTag.objects.filter(organization_id=organization_id)
    wanted = set(pairs)
    known = set(tags.filter(key__in={key for key, _ in wanted}).values_list("key", "value"))
    fresh = wanted - known
    if not fresh:
        return None
    keys = set(tags.values_list("key", flat=True).distinct())
    new_keys = {key for key, _ in fresh} - keys
    if len(keys) + len(new_keys) > max_keys:
        return (
            f"Your organization's requests already used {len(keys)} distinct `metadata` keys; "
            f"the most is {max_keys}. Reuse an existing key (GET /api/v1/usage?group_by=tag "
            f"lists them) rather than adding {sorted(new_keys)[0]!r}."
        )
    count = tags.count()
    if count + len(fresh) > max_values:
        return (
            f"Your organization's requests already used {count} distinct `metadata` "
            f"key=value pairs; the most is {max_values}. Put unbounded values (request or "
            "trace ids) in `user` or X-Client-Request-Id instead of metadata."
        )
    UsageTag.objects.bulk_create(
        [UsageTag(organization_id=organization_id, key=k, value=v) for k, v in sorted(fresh)],
        ignore_conflicts=True,
    )
    return None
