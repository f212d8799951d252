from django.urls import path

from catalog import apis, partner_apis, publisher_apis

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
    path("publishers", publisher_apis.PublisherListApi.as_view(), name="publisher-list"),
    path(
        "publishers/<str:slug>",
        publisher_apis.PublisherDetailApi.as_view(),
        name="publisher-detail",
    ),
    path(
        "publishers/<str:slug>/listings",
        publisher_apis.ListingListApi.as_view(),
        name="listing-list",
    ),
    path(
        "publishers/<str:slug>/listings/<str:listing>/changes",
        publisher_apis.ListingChangeListApi.as_view(),
        name="listing-change-list",
    ),
    path(
        "publishers/<str:slug>/terms-acceptances",
        publisher_apis.TermsAcceptanceExportApi.as_view(),
        name="publisher-terms-acceptances",
    ),
    path("listing-changes", publisher_apis.ReviewQueueApi.as_view(), name="review-queue"),
    path(
        "listing-changes/<int:change_id>",
        publisher_apis.ListingChangeDetailApi.as_view(),
        name="listing-change-detail",
    ),
    *[
        path(
            f"listing-changes/<int:change_id>/{action}",
            publisher_apis.ListingChangeActionApi.as_view(decision=action),
            name=f"listing-change-{action}",
        )
        for action in ("submit", "withdraw", "approve", "request-changes")
    ],
    path(
        "listing-changes/<int:change_id>/comments",
        publisher_apis.ReviewCommentListApi.as_view(),
        name="listing-change-comments",
    ),
    path("private-offers", publisher_apis.PrivateOfferListApi.as_view(), name="private-offer-list"),
    *[
        path(
            f"private-offers/<int:offer_id>/{decision}",
            publisher_apis.PrivateOfferActionApi.as_view(decision=decision),
            name=f"private-offer-{decision}",
        )
        for decision in ("approve", "withdraw")
    ],
    path("hardware-profiles", apis.HardwareProfileListApi.as_view(), name="hardware-profile-list"),
]
