from django.urls import path

from catalog import apis

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
    path("hardware-profiles", apis.HardwareProfileListApi.as_view(), name="hardware-profile-list"),
]
