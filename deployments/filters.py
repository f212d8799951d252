import django_filters

from deployments.models import Deployment, DeploymentEvent


class DeploymentFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(
        choices=Deployment.Status.choices,
        help_text="Repeat for several. Default: every status but deleted.",
    )
    type = django_filters.ChoiceFilter(choices=Deployment.Type.choices)
    name = django_filters.CharFilter()
    model = django_filters.CharFilter(field_name="model_version__model__slug")

    class Meta:
        model = Deployment
        fields = ["status", "type", "name", "model"]


class DeploymentEventFilter(django_filters.FilterSet):
    type = django_filters.ChoiceFilter(choices=DeploymentEvent.Type.choices)
    since = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="gte")

    class Meta:
        model = DeploymentEvent
        fields = ["type", "since"]
