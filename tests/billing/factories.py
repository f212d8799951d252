"""Factories for billing tests: the gateway's usage events as billing receives them."""

from datetime import timedelta

import factory
from django.utils import timezone

from metering.models import UsageEvent
from tests.factories import OrganizationFactory


class UsageEventFactory(factory.django.DjangoModelFactory):
    """A finished serverless request of 1000 prompt and 500 completion tokens, not ingested."""

    class Meta:
        model = UsageEvent

    request_id = factory.Sequence(lambda n: f"req-{n:08d}")
    organization = factory.SubFactory(OrganizationFactory)
    api_key = None
    deployment_id = None
    model_version_id = None
    deployment_type = "serverless"
    model = "test-model"
    prompt_tokens = 1000
    completion_tokens = 500
    cached_tokens = 0
    status_code = 200
    latency_ms = 120.0
    ttft_ms = 30.0
    usage_source = UsageEvent.Source.UPSTREAM
    finished_at = factory.LazyFunction(timezone.now)
    started_at = factory.LazyAttribute(lambda e: e.finished_at - timedelta(seconds=1))
    ingested_at = None
