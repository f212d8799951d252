"""REST endpoints of partner-hosted models: provider connections (operators only, read and
write: even a connection's URL and quota are the platform's business), the provider model and
cost behind a partner version (operators), and terms of use (everyone who sees the model reads
them; organizations accept them; operators publish them).

No response of these (or any other) endpoints carries a credential: the serializers have no
field for it but the write-only input, which the schema marks `writeOnly`."""

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.response import Response

from accounts.permissions import IsOrganizationMember
from accounts.roles import Permission
from catalog import providers, terms
from catalog.apis import CatalogApi
from catalog.models import ProviderConnection, ProviderCost, TermsAcceptance, TermsOfUse
from catalog.permissions import OperatorsOnly
from catalog.serializers import (
    ProviderConnectionCreateSerializer,
    ProviderConnectionSerializer,
    ProviderConnectionUpdateSerializer,
    ProviderCostCreateSerializer,
    ProviderCostSerializer,
    ProviderModelDetailSerializer,
    ProviderModelWriteSerializer,
    TermsAcceptanceSerializer,
    TermsAcceptSerializer,
    TermsCreateSerializer,
    TermsSerializer,
)
from controlplane.errors import ValidationFailed


class ProviderConnectionListApi(generics.ListAPIView):
    """Our accounts with providers' APIs. Credentials are write-only: stored encrypted, never
    returned (`has_credential` says whether one is set)."""

    permission_classes = [OperatorsOnly]
    serializer_class = ProviderConnectionSerializer
    queryset = ProviderConnection.objects.none()  # for the OpenAPI schema

    def get_queryset(self):
        return providers.provider_connection_list()

    @extend_schema(
        request=ProviderConnectionCreateSerializer, responses={201: ProviderConnectionSerializer}
    )
    def post(self, request):
        serializer = ProviderConnectionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        connection = providers.provider_connection_create(
            actor=request.actor, **serializer.validated_data
        )
        return Response(
            ProviderConnectionSerializer(connection).data, status=status.HTTP_201_CREATED
        )


class ProviderConnectionDetailApi(generics.GenericAPIView):
    permission_classes = [OperatorsOnly]
    serializer_class = ProviderConnectionSerializer
    queryset = ProviderConnection.objects.none()  # for the OpenAPI schema

    def get_connection(self) -> ProviderConnection:
        connection = ProviderConnection.objects.filter(name=self.kwargs["name"]).first()
        if connection is None:
            raise Http404
        return connection

    def get(self, request, name):
        return Response(ProviderConnectionSerializer(self.get_connection()).data)

    @extend_schema(
        request=ProviderConnectionUpdateSerializer, responses=ProviderConnectionSerializer
    )
    def patch(self, request, name):
        serializer = ProviderConnectionUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        connection = providers.provider_connection_update(
            actor=request.actor, connection=self.get_connection(), **serializer.validated_data
        )
        return Response(ProviderConnectionSerializer(connection).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name):
        providers.provider_connection_delete(actor=request.actor, connection=self.get_connection())
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProviderModelApi(CatalogApi):
    """Which provider model serves a partner version, on which connection (operators)."""

    permission_classes = [OperatorsOnly]
    serializer_class = ProviderModelDetailSerializer

    def get(self, request, slug, version):
        mapping = getattr(self.get_version(), "provider_model", None)
        if mapping is None:
            raise Http404
        return Response(ProviderModelDetailSerializer(mapping).data)

    @extend_schema(request=ProviderModelWriteSerializer, responses=ProviderModelDetailSerializer)
    def put(self, request, slug, version):
        serializer = ProviderModelWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        name = fields.pop("connection", None)
        connection = None
        if name:
            connection = ProviderConnection.objects.filter(name=name).first()
            if connection is None:
                raise ValidationFailed(
                    f"No provider connection {name!r} (GET /api/v1/provider-connections).",
                    field="connection",
                )
        mapping = providers.provider_model_set(
            actor=request.actor, version=self.get_version(), connection=connection, **fields
        )
        return Response(ProviderModelDetailSerializer(mapping).data)


class ProviderCostListApi(CatalogApi):
    """What the provider charges us for a partner version, newest first (operators)."""

    permission_classes = [OperatorsOnly]
    queryset = ProviderCost.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = ProviderCostSerializer
    pagination_class = None

    @extend_schema(
        operation_id="models_versions_provider_costs_list",
        responses=ProviderCostSerializer(many=True),
    )
    def get(self, request, slug, version):
        costs = ProviderCost.objects.filter(model_version=self.get_version()).order_by(
            "-effective_from", "-id"
        )
        return Response(ProviderCostSerializer(costs, many=True).data)

    @extend_schema(request=ProviderCostCreateSerializer, responses={201: ProviderCostSerializer})
    def post(self, request, slug, version):
        serializer = ProviderCostCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        cost = providers.provider_cost_set(
            actor=request.actor, version=self.get_version(), **serializer.validated_data
        )
        return Response(ProviderCostSerializer(cost).data, status=status.HTTP_201_CREATED)


class TermsListApi(CatalogApi):
    """A version's terms of use, in force first then older ones; `accepted` says whether your
    organization accepted each. Operators publish a new version with POST."""

    queryset = TermsOfUse.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = TermsSerializer
    pagination_class = None

    @extend_schema(operation_id="models_versions_terms_list", responses=TermsSerializer(many=True))
    def get(self, request, slug, version):
        model_version = self.get_version()
        documents = terms.terms_list(version_id=model_version.pk, operator=self.operator)
        organization = request.actor.organization
        accepted = set()
        if organization is not None:
            accepted = set(
                TermsAcceptance.objects.filter(
                    organization=organization, terms__model_version=model_version
                ).values_list("terms_id", flat=True)
            )
        context = {"accepted_ids": accepted}
        return Response(TermsSerializer(documents, many=True, context=context).data)

    @extend_schema(request=TermsCreateSerializer, responses={201: TermsSerializer})
    def post(self, request, slug, version):
        serializer = TermsCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        document = terms.terms_publish(
            actor=request.actor,
            version=self.get_version(),
            terms_version=fields.pop("version"),
            **fields,
        )
        return Response(TermsSerializer(document).data, status=status.HTTP_201_CREATED)


class TermsAcceptApi(CatalogApi):
    """Accept, for your organization, the terms in force (name the version you read). Needed
    before enabling or calling the model; a new version of the terms asks again."""

    serializer_class = TermsAcceptanceSerializer
    # Accepting is a customer's write, not a catalog change: any member whose role may deploy.
    permission_classes = [IsOrganizationMember]
    required_permissions = {"POST": Permission.DEPLOYMENTS_WRITE}

    @extend_schema(request=TermsAcceptSerializer, responses={201: TermsAcceptanceSerializer})
    def post(self, request, slug, version):
        serializer = TermsAcceptSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        acceptance = terms.terms_accept(
            actor=request.actor,
            version=self.get_version(),
            terms_version=serializer.validated_data["version"],
        )
        return Response(TermsAcceptanceSerializer(acceptance).data, status=status.HTTP_201_CREATED)
