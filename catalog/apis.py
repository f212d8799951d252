"""REST endpoints of the catalog. Members of any organization browse; operators also write
(see catalog.permissions). Drafts are visible to operators only."""

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.response import Response

from accounts.models import Organization
from catalog import selectors, services
from catalog.artifacts import get_store
from catalog.filters import HardwareProfileFilter, ModelFilter
from catalog.models import DedicatedPrice, Model, ModelVersion, TokenPrice
from catalog.permissions import CatalogAccess, is_operator
from catalog.serializers import (
    DedicatedPriceCreateSerializer,
    DedicatedPriceSerializer,
    HardwareProfileSerializer,
    ModelArtifactSerializer,
    ModelCreateSerializer,
    ModelDetailSerializer,
    ModelListSerializer,
    ModelUpdateSerializer,
    ModelVersionCreateSerializer,
    ModelVersionSerializer,
    ModelVersionUpdateSerializer,
    TokenPriceCreateSerializer,
    TokenPriceSerializer,
)
from controlplane.errors import PermissionDenied, ValidationFailed


class CatalogApi(generics.GenericAPIView):
    permission_classes = [CatalogAccess]

    @property
    def operator(self) -> bool:
        return is_operator(self.request.actor)

    def get_model(self) -> Model:
        if self.operator:
            model = Model.objects.filter(slug=self.kwargs["slug"]).first()
            if model is None:
                raise Http404
            return model
        return selectors.model_by_slug(
            organization=self.request.actor.organization, slug=self.kwargs["slug"]
        )

    def get_version(self) -> ModelVersion:
        versions = selectors.model_versions_for_detail(
            model=self.get_model(), include_unpublished=self.operator
        )
        version = versions.filter(version=self.kwargs["version"]).first()
        if version is None:
            raise Http404
        return version

    def version_response(self, version: ModelVersion, status_code=status.HTTP_200_OK):
        version = selectors.model_versions_for_detail(
            model=version.model, include_unpublished=True
        ).get(pk=version.pk)
        context = {"profiles": list(selectors.hardware_profile_list())}
        return Response(ModelVersionSerializer(version, context=context).data, status=status_code)


class ModelListApi(CatalogApi, generics.ListAPIView):
    """The catalog: public models, your organization's private ones, and (for operators)
    drafts. Search with `q`; unknown parameters or values are a 400 naming them."""

    queryset = Model.objects.none()  # for the OpenAPI schema: get_queryset needs a caller
    serializer_class = ModelListSerializer
    filterset_class = ModelFilter
    ordering_fields = [
        "slug",
        "display_name",
        "publisher",
        "context_length",
        "total_parameters",
        "active_parameters",
        "created_at",
    ]
    ordering = ["slug"]

    def get_queryset(self):
        return selectors.model_list_for_api(
            organization=self.request.actor.organization, operator=self.operator
        )

    @extend_schema(request=ModelCreateSerializer, responses={201: ModelDetailSerializer})
    def post(self, request):
        serializer = ModelCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        organization = None
        if "organization" in fields:
            slug = fields.pop("organization")
            organization = Organization.objects.filter(slug=slug).first()
            if organization is None:
                raise ValidationFailed(f"No organization {slug!r}.", field="organization")
        model = services.model_create(actor=request.actor, organization=organization, **fields)
        return Response(self.detail_data(model), status=status.HTTP_201_CREATED)

    def detail_data(self, model):
        context = {
            "profiles": list(selectors.hardware_profile_list()),
            "versions": selectors.model_versions_for_detail(model=model, include_unpublished=True),
        }
        return ModelDetailSerializer(model, context=context).data


class ModelDetailApi(CatalogApi):
    """A model with its card, its versions, and for each version every hardware profile: does
    it fit (and if not, why) and its dedicated price."""

    serializer_class = ModelDetailSerializer

    def get(self, request, slug):
        model = self.get_model()
        context = {
            "profiles": list(selectors.hardware_profile_list()),
            "versions": selectors.model_versions_for_detail(
                model=model, include_unpublished=self.operator
            ),
        }
        return Response(ModelDetailSerializer(model, context=context).data)

    @extend_schema(request=ModelUpdateSerializer, responses=ModelDetailSerializer)
    def patch(self, request, slug):
        serializer = ModelUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        model = services.model_update(
            actor=request.actor, model=self.get_model(), **serializer.validated_data
        )
        return self.get(request, model.slug)


class ModelVersionListApi(CatalogApi):
    queryset = ModelVersion.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = ModelVersionSerializer
    pagination_class = None

    @extend_schema(operation_id="models_versions_list", responses=ModelVersionSerializer(many=True))
    def get(self, request, slug):
        versions = selectors.model_versions_for_detail(
            model=self.get_model(), include_unpublished=self.operator
        )
        context = {"profiles": list(selectors.hardware_profile_list())}
        return Response(ModelVersionSerializer(versions, many=True, context=context).data)

    @extend_schema(request=ModelVersionCreateSerializer, responses={201: ModelVersionSerializer})
    def post(self, request, slug):
        serializer = ModelVersionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        version = services.model_version_create(
            actor=request.actor, model=self.get_model(), **serializer.validated_data
        )
        return self.version_response(version, status.HTTP_201_CREATED)


class ModelVersionDetailApi(CatalogApi):
    serializer_class = ModelVersionSerializer

    def get(self, request, slug, version):
        return self.version_response(self.get_version())

    @extend_schema(request=ModelVersionUpdateSerializer, responses=ModelVersionSerializer)
    def patch(self, request, slug, version):
        serializer = ModelVersionUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        updated = services.model_version_update(
            actor=request.actor, version=self.get_version(), **serializer.validated_data
        )
        return self.version_response(updated)


class ModelVersionPublishApi(CatalogApi):
    serializer_class = ModelVersionSerializer

    @extend_schema(request=None, responses=ModelVersionSerializer)
    def post(self, request, slug, version):
        published = services.model_version_publish(actor=request.actor, version=self.get_version())
        return self.version_response(published)


class ModelVersionDeprecateApi(CatalogApi):
    serializer_class = ModelVersionSerializer

    @extend_schema(request=None, responses=ModelVersionSerializer)
    def post(self, request, slug, version):
        deprecated = services.model_version_deprecate(
            actor=request.actor, version=self.get_version()
        )
        return self.version_response(deprecated)


class TokenPriceListApi(CatalogApi):
    """Every serverless price of a version, newest first (past, current and scheduled)."""

    queryset = ModelVersion.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = TokenPriceSerializer
    pagination_class = None

    @extend_schema(
        operation_id="models_versions_token_prices_list", responses=TokenPriceSerializer(many=True)
    )
    def get(self, request, slug, version):
        prices = TokenPrice.objects.filter(model_version=self.get_version()).order_by(
            "-effective_from", "-id"
        )
        return Response(TokenPriceSerializer(prices, many=True).data)

    @extend_schema(request=TokenPriceCreateSerializer, responses={201: TokenPriceSerializer})
    def post(self, request, slug, version):
        serializer = TokenPriceCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        price = services.token_price_set(
            actor=request.actor, version=self.get_version(), **serializer.validated_data
        )
        return Response(TokenPriceSerializer(price).data, status=status.HTTP_201_CREATED)


class DedicatedPriceListApi(CatalogApi):
    queryset = ModelVersion.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = DedicatedPriceSerializer
    pagination_class = None

    @extend_schema(
        operation_id="models_versions_dedicated_prices_list",
        responses=DedicatedPriceSerializer(many=True),
    )
    def get(self, request, slug, version):
        prices = (
            DedicatedPrice.objects.filter(model_version=self.get_version())
            .select_related("hardware_profile")
            .order_by("hardware_profile__name", "-effective_from", "-id")
        )
        return Response(DedicatedPriceSerializer(prices, many=True).data)

    @extend_schema(
        request=DedicatedPriceCreateSerializer, responses={201: DedicatedPriceSerializer}
    )
    def post(self, request, slug, version):
        serializer = DedicatedPriceCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        price = services.dedicated_price_set(
            actor=request.actor,
            version=self.get_version(),
            profile=fields.pop("hardware_profile"),
            **fields,
        )
        return Response(DedicatedPriceSerializer(price).data, status=status.HTTP_201_CREATED)


class ModelArtifactListApi(CatalogApi):
    """Operators: the files of a version, each with a download URL valid for an hour."""

    queryset = ModelVersion.objects.none()  # for the OpenAPI schema (path parameter types)
    serializer_class = ModelArtifactSerializer
    pagination_class = None

    @extend_schema(
        operation_id="models_versions_artifacts_list", responses=ModelArtifactSerializer(many=True)
    )
    def get(self, request, slug, version):
        if not self.operator:
            raise PermissionDenied("Only operators may download model weights.")
        model_version = self.get_version()
        context = {"store": get_store(), "prefix": services.artifact_prefix(model_version)}
        return Response(
            ModelArtifactSerializer(
                model_version.artifacts.order_by("path"), many=True, context=context
            ).data
        )


class HardwareProfileListApi(CatalogApi, generics.ListAPIView):
    """The replica shapes deployments choose from, with their hourly price."""

    serializer_class = HardwareProfileSerializer
    filterset_class = HardwareProfileFilter
    ordering_fields = ["name", "gpu_count", "gpu_memory_gb", "price_per_hour"]

    def get_queryset(self):
        return selectors.hardware_profile_list()
