"""Query parameters of GET /api/v1/models and /api/v1/hardware-profiles.

Tasks, languages and tags are JSON lists on the model; they are matched against the model's
derived `facets` text (" task:chat lang:en tag:moe "), which works the same on SQLite and
PostgreSQL. A value the catalog has never heard of is a 400 naming the parameter, so a typo is
not mistaken for "no such models".
"""

import re

import django_filters
from django import forms
from rest_framework.exceptions import ValidationError

from catalog.models import HardwareProfile, Model, ModelVersion, ServingRuntime, facet_token
from catalog.selectors import models_deployable_on

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")
# Each word of a search is one LIKE over every visible model's text (SQLite caps a statement's
# expression depth; PostgreSQL just works hard), so a search is bounded before it is a query.
SEARCH_MAX_LENGTH = 200
SEARCH_MAX_WORDS = 10


class _SearchTermsField(forms.CharField):
    def __init__(self, **kwargs):
        kwargs.setdefault("max_length", SEARCH_MAX_LENGTH)
        super().__init__(**kwargs)

    def validate(self, value):
        super().validate(value)
        if len(value.split()) > SEARCH_MAX_WORDS:
            raise forms.ValidationError(
                f"Search for at most {SEARCH_MAX_WORDS} words (this has {len(value.split())})."
            )


class SearchTermsFilter(django_filters.CharFilter):
    """Free-text search, at most SEARCH_MAX_LENGTH characters and SEARCH_MAX_WORDS words."""

    field_class = _SearchTermsField


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


def _reject(name: str, message: str):
    raise ValidationError({name: [message]})


class ModelFilter(django_filters.FilterSet):
    q = SearchTermsFilter(
        method="filter_q",
        help_text=f"Words to find in the name, description or tags (at most {SEARCH_MAX_WORDS} "
        f"words, {SEARCH_MAX_LENGTH} characters).",
    )
    publisher = django_filters.CharFilter(method="filter_publisher")
    task = django_filters.ChoiceFilter(choices=Model.Task.choices, method="filter_task")
    language = django_filters.CharFilter(
        method="filter_language", help_text="An ISO 639 code such as en or fr."
    )
    tag = django_filters.CharFilter(method="filter_tag")
    license = django_filters.CharFilter(method="filter_license")
    architecture = django_filters.ChoiceFilter(choices=Model.Architecture.choices)
    hosting = django_filters.ChoiceFilter(choices=Model.Hosting.choices)
    visibility = django_filters.ChoiceFilter(choices=Model.Visibility.choices)
    min_context = IntegerFilter(
        field_name="context_length", lookup_expr="gte", min_value=1, help_text="Tokens."
    )
    runtime = django_filters.ChoiceFilter(
        choices=ServingRuntime.Name.choices, method="filter_runtime"
    )
    deployable_on = django_filters.ModelChoiceFilter(
        queryset=HardwareProfile.objects.filter(is_active=True),
        to_field_name="name",
        method="filter_deployable_on",
        help_text="A hardware profile name: models with a published version that fits it.",
    )

    class Meta:
        model = Model
        fields = [
            "q",
            "publisher",
            "task",
            "language",
            "tag",
            "license",
            "architecture",
            "hosting",
            "visibility",
            "min_context",
            "runtime",
            "deployable_on",
        ]

    def filter_q(self, queryset, name, value):
        for word in value.lower().split():
            queryset = queryset.filter(search_text__contains=word)
        return queryset

    def _known_value(self, queryset, field: str, value: str):
        """Match `field` case-insensitively, refusing a value no visible model has."""
        # Only what the caller may see: another organization's private publisher stays unnamed.
        known = sorted(set(self.queryset.order_by().values_list(field, flat=True).distinct()))
        match = next((k for k in known if k.lower() == value.strip().lower()), None)
        if match is None:
            _reject(field, f"Unknown {field} {value!r}. Known: {', '.join(known) or 'none'}.")
        return queryset.filter(**{field: match})

    def filter_publisher(self, queryset, name, value):
        return self._known_value(queryset, "publisher", value)

    def filter_license(self, queryset, name, value):
        return self._known_value(queryset, "license", value)

    def filter_task(self, queryset, name, value):
        return queryset.filter(facets__contains=facet_token("task", value))

    def filter_language(self, queryset, name, value):
        value = value.strip().lower()
        if not LANGUAGE_CODE.match(value):
            _reject(name, f"{value!r} is not an ISO 639 language code; use e.g. en, fr, de.")
        return queryset.filter(facets__contains=facet_token("lang", value))

    def filter_tag(self, queryset, name, value):
        return queryset.filter(facets__contains=facet_token("tag", value))

    def filter_runtime(self, queryset, name, value):
        return queryset.filter(
            pk__in=ModelVersion.objects.filter(
                status=ModelVersion.Status.PUBLISHED, serving_runtime__name=value
            ).values("model_id")
        )

    def filter_deployable_on(self, queryset, name, profile):
        return models_deployable_on(queryset, profile)


class HardwareProfileFilter(django_filters.FilterSet):
    device = django_filters.ChoiceFilter(
        choices=ServingRuntime.Device.choices, method="filter_device"
    )
    gpu_model = django_filters.CharFilter(lookup_expr="icontains")
    min_gpu_count = IntegerFilter(field_name="gpu_count", lookup_expr="gte", min_value=0)
    min_gpu_memory_gb = IntegerFilter(field_name="gpu_memory_gb", lookup_expr="gte", min_value=0)

    class Meta:
        model = HardwareProfile
        fields = ["device", "gpu_model", "min_gpu_count", "min_gpu_memory_gb"]

    def filter_device(self, queryset, name, value):
        if value == ServingRuntime.Device.CPU:
            return queryset.filter(gpu_count=0)
        return queryset.filter(gpu_count__gt=0)
