"""The catalog's own filterset (the one GET /api/v1/models uses), dressed for a form: select
boxes with "any" choices, and model size in the buckets people think in."""

import django_filters
from django.db.models import Q

from catalog.filters import ModelFilter
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

    # What the console's form offers, in order; the API's other filters are not on the page.
    SHOWN = {
        "q": "Search",
        "task": "Task",
        "language": "Language",
        "license": "License",
        "size": "Size",
        "runtime": "Runtime",
        "deployable_on": "Fits hardware",
    }

    def __init__(self, *args, licenses=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: self.filters[name] for name in self.SHOWN}
        for name, label in self.SHOWN.items():
            self.filters[name].label = label
        for name, empty in (("task", "Any task"), ("runtime", "Any runtime")):
            self.filters[name].extra["empty_label"] = empty
        form_fields = self.form.fields
        form_fields["license"].choices = [(v, v) for v in licenses]
        form_fields["q"].widget.input_type = "search"
        form_fields["q"].widget.attrs["placeholder"] = "Name, publisher or tag"
        form_fields["q"].help_text = ""
        form_fields["deployable_on"].empty_label = "Any hardware"
        form_fields["deployable_on"].help_text = ""

    def filter_size(self, queryset, name, value):
        return queryset.filter(SIZES[value][1])
