"""REST endpoints of publishers: their listings, the changes they propose (drafts, submitted
for review, approved or sent back with comments), the operators' review queue, and the export
of who accepted their terms. A publisher's objects are its members' and the operators'; anyone
else gets 404. The services (catalog.publishers) decide every permission."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from accounts.actors import Actor
from accounts.models import Organization
from accounts.permissions import IsOrganizationMember, actor_for_request
from accounts.roles import Role
from catalog import offers, publishers
from catalog.models import (
    Listing,
    ListingChange,
    ModelVersion,
    PrivateOffer,
    Publisher,
    ReviewComment,
)
from catalog.permissions import is_operator, require_operator
from controlplane.errors import NotFound, PermissionDenied, ValidationFailed
from controlplane.rest.renderers import CSVRenderer, ErrorsAsJSONMixin
from controlplane.rest.serializers import StrictSerializer


class PublisherAccess(permissions.BasePermission):
    """Authenticated members of an organization, or staff; the services check the rest."""

    def has_permission(self, request, view):
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_staff", False) and user.is_authenticated:
            request.actor = actor_for_request(request) or Actor(
                organization=None, role=Role.OWNER, user=user
            )
            return True
        return IsOrganizationMember().has_permission(request, view)


# --- serializers -----------------------------------------------------------------------------


class PublisherSerializer(serializers.ModelSerializer):
    organization = serializers.CharField(source="organization.slug", read_only=True)
    payouts_linked = serializers.SerializerMethodField()

    class Meta:
        model = Publisher
        fields = ["organization", "display_name", "payouts_linked", "created_at"]
        read_only_fields = fields

    def get_payouts_linked(self, publisher) -> bool:
        """Whether a Stripe Connect account receives this publisher's payouts."""
        return bool(publisher.stripe_account_id)


class PublisherCreateSerializer(StrictSerializer):
    organization = serializers.CharField(max_length=40, help_text="The organization's slug.")
    display_name = serializers.CharField(max_length=100)


class ListingSerializer(serializers.ModelSerializer):
    publisher = serializers.CharField(source="publisher.organization.slug", read_only=True)
    model = serializers.SerializerMethodField()
    public = serializers.SerializerMethodField()

    class Meta:
        model = Listing
        fields = ["slug", "publisher", "model", "public", "created_at"]
        read_only_fields = fields

    def get_model(self, listing) -> str | None:
        """The catalog model's slug once its card was approved."""
        return listing.model.slug if listing.model_id else None

    def get_public(self, listing) -> bool:
        """Whether customers see it: an approved card and a published version."""
        return bool(listing.model_id and listing.model.is_listed)


class ListingCreateSerializer(StrictSerializer):
    slug = serializers.CharField(max_length=100, help_text="The catalog model's slug to be.")


class ReviewCommentSerializer(serializers.ModelSerializer):
    class Meta:
        model = ReviewComment
        fields = ["author_label", "by_operator", "body", "created_at"]
        read_only_fields = fields


class ListingChangeSerializer(serializers.ModelSerializer):
    listing = serializers.CharField(source="listing.slug", read_only=True)
    publisher = serializers.CharField(source="listing.publisher.organization.slug", read_only=True)
    payload = serializers.DictField(read_only=True)
    comments = ReviewCommentSerializer(many=True, read_only=True)

    class Meta:
        model = ListingChange
        fields = [
            "id",
            "listing",
            "publisher",
            "kind",
            "payload",
            "status",
            "created_by_label",
            "submitted_at",
            "reviewed_at",
            "reviewed_by_label",
            "comments",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ListingChangeCreateSerializer(StrictSerializer):
    kind = serializers.ChoiceField(choices=ListingChange.Kind.choices)
    payload = serializers.DictField(
        help_text="card: model fields; version: version and its fields; price: version, "
        'input_per_million and output_per_million as decimal strings ("0.25"), currency, '
        "effective_from; terms: version, terms_version, title, body, url, customers_named, "
        "effective_from."
    )


class ListingChangeUpdateSerializer(StrictSerializer):
    payload = serializers.DictField()


class ReviewCommentCreateSerializer(StrictSerializer):
    body = serializers.CharField(max_length=5000)


class ReviewDecisionSerializer(StrictSerializer):
    comment = serializers.CharField(max_length=5000, required=False, allow_blank=True)


class TermsAcceptanceRowSerializer(serializers.Serializer):
    model = serializers.CharField()
    model_version = serializers.CharField()
    terms_version = serializers.CharField()
    customer = serializers.CharField(
        help_text="The organization's slug where its terms name customers, else a pseudonym."
    )
    accepted_by = serializers.CharField()
    accepted_at = serializers.DateTimeField()


# --- views -----------------------------------------------------------------------------------


class PublisherApi(generics.GenericAPIView):
    permission_classes = [PublisherAccess]
    pagination_class = None

    def get_publisher(self) -> Publisher:
        return publishers.publisher_by_slug(actor=self.request.actor, slug=self.kwargs["slug"])

    def get_listing(self) -> Listing:
        return publishers.listing_by_slug(
            publisher=self.get_publisher(), slug=self.kwargs["listing"]
        )

    def get_change(self) -> ListingChange:
        return publishers.listing_change_get(
            actor=self.request.actor, change_id=self.kwargs["change_id"]
        )

    def change_response(self, change, status_code=status.HTTP_200_OK) -> Response:
        change = ListingChange.objects.prefetch_related("comments").get(pk=change.pk)
        return Response(ListingChangeSerializer(change).data, status=status_code)


class PublisherListApi(PublisherApi):
    """Publishers: all of them for operators, your organization's for its members.
    Operators make an organization a publisher with POST."""

    serializer_class = PublisherSerializer
    queryset = Publisher.objects.none()

    @extend_schema(operation_id="publishers_list", responses=PublisherSerializer(many=True))
    def get(self, request):
        return Response(
            PublisherSerializer(publishers.publisher_list(actor=request.actor), many=True).data
        )

    @extend_schema(request=PublisherCreateSerializer, responses={201: PublisherSerializer})
    def post(self, request):
        require_operator(request.actor)
        serializer = PublisherCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        organization = Organization.objects.filter(
            slug=serializer.validated_data["organization"]
        ).first()
        if organization is None:
            raise ValidationFailed("No such organization.", field="organization")
        publisher = publishers.publisher_create(
            actor=request.actor,
            organization=organization,
            display_name=serializer.validated_data["display_name"],
        )
        return Response(PublisherSerializer(publisher).data, status=status.HTTP_201_CREATED)


class PublisherDetailApi(PublisherApi):
    serializer_class = PublisherSerializer
    queryset = Publisher.objects.none()

    def get(self, request, slug):
        return Response(PublisherSerializer(self.get_publisher()).data)


class ListingListApi(PublisherApi):
    """A publisher's listings. Its members add one with POST (the model card follows as a
    proposed change)."""

    serializer_class = ListingSerializer
    queryset = Listing.objects.none()

    @extend_schema(operation_id="publishers_listings_list", responses=ListingSerializer(many=True))
    def get(self, request, slug):
        listings = self.get_publisher().listings.select_related("model", "publisher__organization")
        return Response(ListingSerializer(listings, many=True).data)

    @extend_schema(request=ListingCreateSerializer, responses={201: ListingSerializer})
    def post(self, request, slug):
        publisher = self.get_publisher()
        serializer = ListingCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        listing = publishers.listing_create(
            actor=request.actor,
            publisher=publisher,
            slug=serializer.validated_data["slug"],
        )
        return Response(ListingSerializer(listing).data, status=status.HTTP_201_CREATED)


class ListingChangeListApi(PublisherApi):
    """The changes proposed for a listing, oldest first. Its publisher's members add a draft
    with POST, then submit it for review."""

    serializer_class = ListingChangeSerializer
    queryset = ListingChange.objects.none()

    @extend_schema(
        operation_id="publishers_listings_changes_list",
        responses=ListingChangeSerializer(many=True),
    )
    def get(self, request, slug, listing):
        changes = publishers.listing_change_list(
            actor=request.actor, publisher=self.get_publisher()
        ).filter(listing=self.get_listing())
        return Response(
            ListingChangeSerializer(changes.prefetch_related("comments"), many=True).data
        )

    @extend_schema(request=ListingChangeCreateSerializer, responses={201: ListingChangeSerializer})
    def post(self, request, slug, listing):
        target = self.get_listing()
        serializer = ListingChangeCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        change = publishers.listing_change_create(
            actor=request.actor, listing=target, **serializer.validated_data
        )
        return self.change_response(change, status.HTTP_201_CREATED)


class ReviewQueueApi(PublisherApi):
    """Proposed changes you may see: for operators, every publisher's (the review queue:
    `status=submitted`); for a publisher's members, their own. Oldest submission first."""

    serializer_class = ListingChangeSerializer
    queryset = ListingChange.objects.none()

    @extend_schema(
        operation_id="listing_changes_list",
        parameters=[OpenApiParameter("status", enum=ListingChange.Status.values, required=False)],
        responses=ListingChangeSerializer(many=True),
    )
    def get(self, request):
        wanted = request.query_params.get("status")
        if wanted is not None and wanted not in ListingChange.Status.values:
            raise ValidationFailed(
                f"status must be one of {', '.join(ListingChange.Status.values)}.", field="status"
            )
        changes = publishers.listing_change_list(actor=request.actor, status=wanted)
        return Response(
            ListingChangeSerializer(changes.prefetch_related("comments"), many=True).data
        )


class ListingChangeDetailApi(PublisherApi):
    serializer_class = ListingChangeSerializer
    queryset = ListingChange.objects.none()

    def get(self, request, change_id):
        return self.change_response(self.get_change())

    @extend_schema(request=ListingChangeUpdateSerializer, responses=ListingChangeSerializer)
    def patch(self, request, change_id):
        change = self.get_change()
        serializer = ListingChangeUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        change = publishers.listing_change_update(
            actor=request.actor, change=change, **serializer.validated_data
        )
        return self.change_response(change)


class ListingChangeActionApi(PublisherApi):
    """submit, withdraw (the publisher); approve, request-changes (operators, with a
    comment: required to send a change back)."""

    serializer_class = ListingChangeSerializer
    queryset = ListingChange.objects.none()
    decision = ""

    @extend_schema(request=ReviewDecisionSerializer, responses=ListingChangeSerializer)
    def post(self, request, change_id):
        change, actor = self.get_change(), request.actor
        serializer = ReviewDecisionSerializer(data=request.data or {})
        serializer.is_valid(raise_exception=True)
        comment = serializer.validated_data.get("comment", "")
        if self.decision == "submit":
            change = publishers.listing_change_submit(actor=actor, change=change)
        elif self.decision == "withdraw":
            change = publishers.listing_change_withdraw(actor=actor, change=change)
        elif self.decision == "approve":
            change = publishers.listing_change_approve(actor=actor, change=change, comment=comment)
        else:
            change = publishers.listing_change_request_changes(
                actor=actor, change=change, comment=comment
            )
        return self.change_response(change)


class ReviewCommentListApi(PublisherApi):
    serializer_class = ReviewCommentSerializer
    queryset = ReviewComment.objects.none()

    @extend_schema(request=ReviewCommentCreateSerializer, responses={201: ReviewCommentSerializer})
    def post(self, request, change_id):
        change = self.get_change()
        serializer = ReviewCommentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        comment = publishers.review_comment_add(
            actor=request.actor, change=change, body=serializer.validated_data["body"]
        )
        return Response(ReviewCommentSerializer(comment).data, status=status.HTTP_201_CREATED)


class TermsAcceptanceExportApi(ErrorsAsJSONMixin, PublisherApi):
    """Who accepted which terms of the publisher's models, oldest first; `?format=csv` (or
    Accept: text/csv) for a spreadsheet. Customers appear by name where the terms they
    accepted say so (operators see every name), as a stable pseudonym otherwise."""

    serializer_class = TermsAcceptanceRowSerializer
    renderer_classes = [JSONRenderer, CSVRenderer]
    queryset = Publisher.objects.none()

    @extend_schema(
        operation_id="publishers_terms_acceptances_list",
        responses=TermsAcceptanceRowSerializer(many=True),
    )
    def get(self, request, slug):
        rows = publishers.terms_acceptance_rows(actor=request.actor, publisher=self.get_publisher())
        response = Response(TermsAcceptanceRowSerializer(rows, many=True).data)
        if getattr(request.accepted_renderer, "format", "") == "csv":
            response["Content-Disposition"] = f'attachment; filename="{slug}-terms-acceptances.csv"'
        return response

    def get_renderer_context(self):
        context = super().get_renderer_context()
        context["csv_columns"] = list(TermsAcceptanceRowSerializer().fields)
        return context


# --- private offers --------------------------------------------------------------------------


class PrivateOfferSerializer(serializers.ModelSerializer):
    organization = serializers.CharField(source="organization.slug", read_only=True)
    model = serializers.CharField(source="model_version.model.slug", read_only=True)
    version = serializers.CharField(source="model_version.version", read_only=True)
    publisher = serializers.SerializerMethodField()

    class Meta:
        model = PrivateOffer
        fields = [
            "id",
            "organization",
            "model",
            "version",
            "publisher",
            "currency",
            "input_per_million",
            "output_per_million",
            "discount_percent",
            "committed_monthly_spend",
            "starts_at",
            "expires_at",
            "status",
            "proposed_by_label",
            "approved_by_label",
            "approved_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_publisher(self, offer) -> str | None:
        """The publisher that proposed it (its organization's slug); null for an operator's."""
        return offer.publisher.organization.slug if offer.publisher_id else None


class PrivateOfferCreateSerializer(StrictSerializer):
    organization = serializers.CharField(max_length=40, help_text="The customer's slug.")
    model = serializers.CharField(max_length=100)
    version = serializers.CharField(max_length=50)
    input_per_million = serializers.DecimalField(max_digits=12, decimal_places=6, required=False)
    output_per_million = serializers.DecimalField(max_digits=12, decimal_places=6, required=False)
    discount_percent = serializers.DecimalField(max_digits=5, decimal_places=2, required=False)
    committed_monthly_spend = serializers.DecimalField(
        max_digits=14,
        decimal_places=2,
        required=False,
        help_text="The least the customer pays for the model in each billing period the offer "
        "covers whole; the invoice adds the shortfall.",
    )
    starts_at = serializers.DateTimeField(required=False)
    expires_at = serializers.DateTimeField(required=False)


class PrivateOfferListApi(PublisherApi):
    """Private offers: operators see all; an organization those made to it and, for a
    publisher, those it proposed. Operators make offers (in force as made); a publisher's
    members propose them for their models (in force once an operator approves)."""

    serializer_class = PrivateOfferSerializer
    queryset = PrivateOffer.objects.none()

    @extend_schema(operation_id="private_offers_list", responses=PrivateOfferSerializer(many=True))
    def get(self, request):
        return Response(
            PrivateOfferSerializer(offers.private_offer_list(actor=request.actor), many=True).data
        )

    @extend_schema(request=PrivateOfferCreateSerializer, responses={201: PrivateOfferSerializer})
    def post(self, request):
        if (
            not is_operator(request.actor)
            and not Publisher.objects.filter(organization=request.actor.organization).exists()
        ):
            raise PermissionDenied("Only operators and publishers make private offers.")
        serializer = PrivateOfferCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        organization = Organization.objects.filter(slug=fields.pop("organization")).first()
        if organization is None:
            raise ValidationFailed("No such organization.", field="organization")
        version = ModelVersion.objects.filter(
            model__slug=fields.pop("model"), version=fields.pop("version")
        ).first()
        if version is None:
            raise ValidationFailed("No such model version.", field="model")
        offer = offers.private_offer_create(
            actor=request.actor, organization=organization, version=version, **fields
        )
        return Response(PrivateOfferSerializer(offer).data, status=status.HTTP_201_CREATED)


class PrivateOfferActionApi(PublisherApi):
    """approve (operators) or withdraw (operators, or the publisher that proposed it)."""

    serializer_class = PrivateOfferSerializer
    queryset = PrivateOffer.objects.none()
    decision = ""

    @extend_schema(request=None, responses=PrivateOfferSerializer)
    def post(self, request, offer_id):
        offer = offers.private_offer_list(actor=request.actor).filter(pk=offer_id).first()
        if offer is None:
            raise NotFound("No such offer.")
        if self.decision == "approve":
            offer = offers.private_offer_approve(actor=request.actor, offer=offer)
        else:
            offer = offers.private_offer_withdraw(actor=request.actor, offer=offer)
        return Response(PrivateOfferSerializer(offer).data)
