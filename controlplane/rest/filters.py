"""Filter backends that refuse what they don't understand, instead of silently ignoring it.

A typo in `?ordering=prise` or `?publsher=mistral` should be a 400 that names the parameter,
not a full unfiltered list the caller mistakes for an answer.
"""

import re

import django_filters
from django import forms
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework.exceptions import ValidationError
from rest_framework.filters import OrderingFilter

# Query parameters every list endpoint understands besides its filterset's own.
COMMON_QUERY_PARAMS = {"page", "page_size", "ordering", "format"}


class _StrictBooleanField(forms.NullBooleanField):
    widget = forms.TextInput

    def to_python(self, value):
        if value in (None, ""):
            return None
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise forms.ValidationError("Use true or false.")


class StrictBooleanFilter(django_filters.BooleanFilter):
    """A boolean query parameter where `?revoked=maybe` is an error, not "no filter"."""

    field_class = _StrictBooleanField


class StrictOrderingFilter(OrderingFilter):
    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        fields = [f for f in getattr(view, "ordering_fields", None) or () if f != "__all__"]
        if fields:
            # A comma-separated list of the fields, each optionally prefixed with '-'.
            one = "-?(" + "|".join(re.escape(f) for f in fields) + ")"
            for parameter in parameters:
                parameter["schema"]["pattern"] = f"^({one}(,{one})*)?$"
                parameter["description"] = (
                    f"Sort by {', '.join(fields)} (comma-separated; prefix '-' for descending)."
                )
        return parameters

    def get_ordering(self, request, queryset, view):
        params = request.query_params.get(self.ordering_param)
        if not params:
            return self.get_default_ordering(view)
        valid = {
            field for field, _label in self.get_valid_fields(queryset, view, {"request": request})
        }
        fields = [term.strip() for term in params.split(",") if term.strip()]
        unknown = [f for f in fields if f.lstrip("-") not in valid]
        if unknown:
            raise ValidationError(
                {
                    self.ordering_param: [
                        f"Unknown ordering field {unknown[0]!r}. "
                        f"Use one of: {', '.join(sorted(valid))} (prefix '-' for descending)."
                    ]
                }
            )
        return fields


class StrictFilterBackend(DjangoFilterBackend):
    """DjangoFilterBackend that also rejects query parameters no filter declares.

    Views may accept more parameters (a search box, say) by listing them in `extra_query_params`.
    """

    def filter_queryset(self, request, queryset, view):
        filterset_class = self.get_filterset_class(view, queryset)
        known = set(COMMON_QUERY_PARAMS) | set(getattr(view, "extra_query_params", ()))
        if filterset_class is not None:
            for name, declared in filterset_class.base_filters.items():
                # Range filters read two parameters, e.g. price_min and price_max.
                suffixes = getattr(
                    declared.extra.get("widget") or declared.field_class.widget, "suffixes", None
                )
                known |= {f"{name}_{s}" for s in suffixes} if suffixes else {name}
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise ValidationError(
                {
                    unknown[0]: [
                        f"Unknown query parameter {unknown[0]!r}. "
                        f"Use one of: {', '.join(sorted(known))}."
                    ]
                }
            )
        return super().filter_queryset(request, queryset, view)
