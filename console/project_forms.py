"""Console forms of the projects pages (the services check the rules, as in console.forms)."""

import re
from decimal import Decimal

from django import forms

from accounts.roles import Role
from console.forms import APIKeyCreateForm, PageForm


def _model_names(text: str) -> list[str]:
    """A textarea of model names, one per line or comma-separated."""
    return [name for name in re.split(r"[\s,]+", text or "") if name]


class ModelNamesField(forms.CharField):
    """An allow-list typed as text: one model name per line (or comma-separated)."""

    widget = forms.Textarea(attrs={"rows": 3})

    def clean(self, value):
        return _model_names(super().clean(value))


class ProjectForm(PageForm):
    id_prefix = "project"

    name = forms.CharField(max_length=100)
    description = forms.CharField(max_length=300, required=False)
    rpm_limit = forms.IntegerField(
        label="Requests per minute", min_value=1, required=False, help_text="Empty: no limit."
    )
    tpm_limit = forms.IntegerField(
        label="Tokens per minute", min_value=1, required=False, help_text="Empty: no limit."
    )
    allowed_models = ModelNamesField(
        label="Allowed models",
        required=False,
        help_text="The `model` names the project's keys may call, one per line. Empty: every "
        "model of the organization. Any other name is “not found” for its keys.",
    )


class ProjectBudgetForm(PageForm):
    id_prefix = "project-budget"

    monthly_budget = forms.DecimalField(
        label="Monthly budget",
        max_digits=14,
        decimal_places=2,
        min_value=Decimal("0"),
        required=False,
        help_text="A hard limit for this project's keys; alerts at 50, 80 and 100 %. "
        "Empty: only the organization's limit applies.",
    )


class ProjectMemberForm(PageForm):
    id_prefix = "project-member"

    email = forms.EmailField(help_text="A member of the organization.")
    role = forms.ChoiceField(
        choices=Role.choices,
        initial=Role.DEVELOPER,
        help_text="Adds to their organization role, in this project only.",
    )


class ProjectKeyForm(APIKeyCreateForm):
    """A key made inside a project, optionally narrowed further to some of its models."""

    allowed_models = ModelNamesField(
        label="Allowed models",
        required=False,
        help_text="Narrow this key to some models, one per line. Empty: what the project allows.",
    )

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_id", "project-key-%s")
        super().__init__(*args, **kwargs)
