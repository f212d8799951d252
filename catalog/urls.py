from django.urls import path

from catalog import apis, partner_apis

version = "models/<str:slug>/versions/<str:version>"

urlpatterns = [
    path("models", apis.ModelListApi.as_view(), name="model-list"),
    path("models/<str:slug>", apis.ModelDetailApi.as_view(), name="model-detail"),
    path("models/<str:slug>/versions", apis.ModelVersionListApi.as_view(), name="version-list"),
    path(version, apis.ModelVersionDetailApi.as_view(), name="version-detail"),
    path(f"{version}/publish", apis.ModelVersionPublishApi.as_view(), name="version-publish"),
    path(f"{version}/deprecate", apis.ModelVersionDeprecateApi.as_view(), name="version-deprecate"),
    path(f"{version}/token-prices", apis.TokenPriceListApi.as_view(), name="token-price-list"),
    path(
        f"{version}/dedicated-prices",
        apis.DedicatedPriceListApi.as_view(),
        name="dedicated-price-list",
    ),
    path(f"{version}/artifacts", apis.ModelArtifactListApi.as_view(), name="artifact-list"),
    path(f"{version}/provider", partner_apis.ProviderModelApi.as_view(), name="provider-model"),
    path(
        f"{version}/provider-costs",
        partner_apis.ProviderCostListApi.as_view(),
        name="provider-cost-list",
    ),
    path(f"{version}/terms", partner_apis.TermsListApi.as_view(), name="terms-list"),
    path(f"{version}/terms/accept", partner_apis.TermsAcceptApi.as_view(), name="terms-accept"),
    path(
        "provider-connections",
        partner_apis.ProviderConnectionListApi.as_view(),
        name="provider-connection-list",
    ),
    path(
        "provider-connections/<str:name>",
        partner_apis.ProviderConnectionDetailApi.as_view(),
        name="provider-connection-detail",
    ),
    path("hardware-profiles", apis.HardwareProfileListApi.as_view(), name="hardware-profile-list"),
]
