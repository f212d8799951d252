"""The catalog's own filterset (the one GET /api/v1/models uses), dressed for a form: select
boxes with "any" choices, and model size in the buckets people think in."""

import django_filters
from django.db.models import Q

from catalog.filters import ModelFilter
from catalog.models import Model
from console.templatetags.console import LANGUAGES

BILLION = 1_000_000_000
SIZES = {
    "small": ("Small (under 10B parameters)", Q(total_parameters__lt=10 * BILLION)),
    "medium": (
        "Medium (10B to 70B)",
        Q(total_parameters__gte=10 * BILLION, total_parameters__lt=70 * BILLION),
    ),
    "large": ("Large (70B and up)", Q(total_parameters__gte=70 * BILLION)),
}


class ConsoleModelFilter(ModelFilter):
    language = django_filters.ChoiceFilter(
        choices=sorted(LANGUAGES.items(), key=lambda item: item[1]),
        method="filter_language",
        empty_label="Any language",
    )
    license = django_filters.ChoiceFilter(
        choices=[], method="filter_license", empty_label="Any license"
    )
    size = django_filters.ChoiceFilter(
        choices=[(key, label) for key, (label, _q) in SIZES.items()],
        method="filter_size",
        empty_label="Any size",
    )

    class Meta(ModelFilter.Meta):
        fields = ["q", "task", "language", "license", "size", "runtime"]

    def __init__(self, *args, licenses=(), **kwargs):
        super().__init__(*args, **kwargs)
        form_fields = self.form.fields
        form_fields["license"].choices = [("", "Any license"), *[(v, v) for v in licenses]]
        form_fields["q"].label = "Search"
        form_fields["q"].widget.input_type = "search"
        form_fields["q"].widget.attrs["placeholder"] = "Name, publisher or tag"
        form_fields["task"].empty_label = "Any task"
        form_fields["task"].choices = [("", "Any task"), *Model.Task.choices]
        form_fields["runtime"].choices = [("", "Any runtime"), *form_fields["runtime"].choices[1:]]

    def filter_size(self, queryset, name, value):
        return queryset.filter(SIZES[value][1])
